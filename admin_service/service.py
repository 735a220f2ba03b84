"""The relayq.v1.Admin servicer: authenticate the call, then hand it to the service layer.

Each RPC reads the caller from the call's metadata (relayq/auth.py) and runs the operation of
the same meaning in admin_service.ops, which checks, authorizes, transacts and audits; errors
leave through relayq.rpc.handle_errors, the one place that maps them to gRPC statuses.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from admin_service.ops import Operations
from relayq.auth import Authenticator, Caller
from relayq.rpc import handle_errors
from relayq.v1 import admin_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]
Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
Operation = Callable[[Caller, Req], Awaitable[Resp]]


def _rpc(pick: Callable[[Operations], Operation[Req, Resp]]) -> Any:
    """An RPC method that authenticates and runs the operation `pick` chooses. (Typed Any
    for the class body: the generated base declares each method with its own context type.)"""

    @handle_errors
    async def method(self: AdminServicer, request: Req, context: Context) -> Resp:
        caller = await self._auth.caller(context)
        return await pick(self._ops)(caller, request)

    return method


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, ops: Operations, auth: Authenticator) -> None:
        self._ops = ops
        self._auth = auth

    CreateTenant = _rpc(lambda ops: ops.tenants.create)
    GetTenant = _rpc(lambda ops: ops.tenants.get)
    ListTenants = _rpc(lambda ops: ops.tenants.list)

    CreateSource = _rpc(lambda ops: ops.sources.create)
    GetSource = _rpc(lambda ops: ops.sources.get)
    ListSources = _rpc(lambda ops: ops.sources.list)
    RotateWriteKey = _rpc(lambda ops: ops.sources.rotate_write_key)
    UpdateSource = _rpc(lambda ops: ops.sources.update)

    CreateDestination = _rpc(lambda ops: ops.destinations.create)
    UpdateDestination = _rpc(lambda ops: ops.destinations.update)
    GetDestination = _rpc(lambda ops: ops.destinations.get)
    ListDestinations = _rpc(lambda ops: ops.destinations.list)
    SetCircuit = _rpc(lambda ops: ops.destinations.set_circuit)
    RotateSigningSecret = _rpc(lambda ops: ops.destinations.rotate_signing_secret)

    ConnectSource = _rpc(lambda ops: ops.connections.connect)
    UpdateConnection = _rpc(lambda ops: ops.connections.update)
    DisconnectSource = _rpc(lambda ops: ops.connections.disconnect)
    ListConnections = _rpc(lambda ops: ops.connections.list)

    CreateAdminToken = _rpc(lambda ops: ops.tokens.create)
    ListAdminTokens = _rpc(lambda ops: ops.tokens.list)
    RevokeAdminToken = _rpc(lambda ops: ops.tokens.revoke)

    ListJobs = _rpc(lambda ops: ops.jobs.list)
    GetJob = _rpc(lambda ops: ops.jobs.get)
    PeekJobs = _rpc(lambda ops: ops.jobs.peek)
    RetryJobs = _rpc(lambda ops: ops.jobs.retry)
    AbortJobs = _rpc(lambda ops: ops.jobs.abort)
    GetStats = _rpc(lambda ops: ops.stats.get)

    ListEvents = _rpc(lambda ops: ops.events.list)
    GetEvent = _rpc(lambda ops: ops.events.get)
    ReplayEvents = _rpc(lambda ops: ops.replays.replay)
    ListReplays = _rpc(lambda ops: ops.replays.list)
    GetReplay = _rpc(lambda ops: ops.replays.get)
    CancelReplay = _rpc(lambda ops: ops.replays.cancel)
