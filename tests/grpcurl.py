"""What grpcurl does with -plaintext, -H, -d and list / describe / a method call, through
server reflection alone (no generated code: descriptors come from the server).

grpcurl has no Debian package; the tests that run the README's grpcurl commands run them
through this instead when it is not installed, so the documented commands keep working.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf import descriptor_pool, json_format
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def grpcurl(argv: list[str], stdin: str | None, addresses: Mapping[str, str],
            env: Mapping[str, str]) -> Any:
    """Run one grpcurl command line (argv[0] is "grpcurl"): `addresses` maps the address the
    command names to the one to call, `env` fills $VARIABLES in -H values, `stdin` is what
    `-d @` reads. Returns what grpcurl would print, as Python data."""
    args = iter(argv[1:])
    headers: list[tuple[str, str]] = []
    data = None
    rest = []
    for arg in args:
        if arg == "-plaintext":
            continue
        if arg == "-H":
            name, _, value = next(args).partition(":")
            # As the shell would: the longest names first, so $AB is not read as $A then B.
            for key, val in sorted(env.items(), key=lambda item: -len(item[0])):
                value = value.replace(f"${key}", val)
            headers.append((name.strip().lower(), value.strip()))
        elif arg == "-d":
            data = next(args)
        else:
            rest.append(arg)
    documented, *command = rest
    with grpc.insecure_channel(addresses[documented]) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        if command == ["list"]:
            return sorted(database.get_services())
        if command[0] == "describe":
            return sorted(pool.FindServiceByName(command[1]).methods_by_name)
        service_name, method_name = command[0].rsplit("/", 1)
        method = pool.FindServiceByName(service_name).methods_by_name[method_name]
        request_class = GetMessageClass(method.input_type)
        response_class = GetMessageClass(method.output_type)
        body = stdin if data == "@" else data
        request = json_format.Parse(body or "{}", request_class())
        call = channel.unary_unary(f"/{service_name}/{method_name}",
                                   request_serializer=request_class.SerializeToString,
                                   response_deserializer=response_class.FromString)
        return json_format.MessageToDict(call(request, metadata=headers, timeout=10))
