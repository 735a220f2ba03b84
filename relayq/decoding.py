"""Requests that cannot be decoded get INVALID_ARGUMENT, not UNKNOWN and a logged traceback.

grpc.aio decodes a request with the deserializer of its method handler (the generated
`FromString`) before any servicer code runs; when that raises (invalid UTF-8 in a string
field, corrupt wire bytes, a Struct nested past protobuf's recursion limit) the server logs
an error with a traceback and answers `UNKNOWN: Unexpected <class 'DecodeError'>`, for anyone,
before authentication. The generated `add_*_to_server` functions are handed a `Registrar`
instead of the server: it registers the same handlers with a deserializer that returns an
`Undecodable` marker in place of raising, and a behaviour that answers the marker with
INVALID_ARGUMENT. Failures are counted in `relayq_rpc_undecodable_requests_total{method}` and
logged at most once per 10 seconds.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
from prometheus_client import Counter

from relayq.logs import Throttled

log = logging.getLogger(__name__)

UNDECODABLE = Counter("relayq_rpc_undecodable_requests_total",
                      "Requests refused because they could not be decoded.", ["method"])

_MAX_DETAIL = 200

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Generic: TypeAlias = "grpc.GenericRpcHandler[Any, Any]"


@dataclass(frozen=True, slots=True)
class Undecodable:
    """Stands where a request message would be: the bytes did not decode."""

    method: str
    error: str

    @property
    def message(self) -> str:
        return f"the request to {self.method} could not be decoded: {self.error}"


class Registrar:
    """What a generated add_*_to_server function registers on: the server, with guarded
    request decoding. Only the two methods those functions call."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server
        self._logged = Throttled(log, 10.0)

    def add_generic_rpc_handlers(self, handlers: Sequence[Generic]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_GuardedGeneric(handler, self._guard) for handler in handlers))

    def add_registered_method_handlers(self, service: str,
                                       handlers: Mapping[str, Handler]) -> None:
        # grpc-stubs does not know this method yet (grpcio >= 1.62).
        self._server.add_registered_method_handlers(  # type: ignore[attr-defined]
            service, {name: self._guard(f"/{service}/{name}", handler)
                      for name, handler in handlers.items()})

    def _guard(self, method: str, handler: Handler) -> Handler:
        """The same handler, answering undecodable requests itself. Streaming requests are
        left as they are: relayq serves none (reflection's, registered elsewhere, is one)."""
        if handler.request_streaming or handler.request_deserializer is None:
            return handler
        decode = self._decoder(method, handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _answer_unary(handler.unary_unary), request_deserializer=decode,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                _answer_stream(handler.unary_stream), request_deserializer=decode,
                response_serializer=handler.response_serializer)
        return handler

    def _decoder(self, method: str, deserialize: Callable[[bytes], Any]
                 ) -> Callable[[bytes], Any]:
        def decode(raw: bytes) -> Any:
            try:
                return deserialize(raw)
            except Exception as exc:  # whatever the parser raises, the bytes are the cause
                detail = str(exc) or type(exc).__name__
                UNDECODABLE.labels(method).inc()
                self._logged.warning("a request could not be decoded",
                                     extra={"method": method, "error": detail[:_MAX_DETAIL]})
                return Undecodable(method, detail[:_MAX_DETAIL])

        return decode


def _answer_unary(behaviour: Callable[..., Any]
                  ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Any]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        result = behaviour(request, context)
        return await result if inspect.isawaitable(result) else result

    return guarded


def _answer_stream(behaviour: Callable[..., AsyncIterator[Any]]
                   ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]
                      ) -> AsyncIterator[Any]:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        async for item in behaviour(request, context):
            yield item

    return guarded


class _GuardedGeneric(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """A generic handler whose method handlers are guarded (built once per method served:
    names of methods not served are not remembered, whatever a client sends)."""

    def __init__(self, inner: Generic,
                 guard: Callable[[str, Handler], Handler]) -> None:
        self._inner = inner
        self._guard = guard
        self._guarded: dict[str, Handler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails
                ) -> Handler | None:
        method = handler_call_details.method
        guarded = self._guarded.get(method)
        if guarded is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None
            guarded = self._guarded[method] = self._guard(method, handler)
        return guarded
