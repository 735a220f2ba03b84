"""Generate relayq's Python gRPC code from protos/. The one command: python protos/generate.py

The output lands in relayq/v1/ and is never edited by hand or committed; setup.py runs this
on every build (editable installs included), so `pip install -e .` leaves working code behind.
Type stubs come from mypy-protobuf (a build requirement), so the services type-check against
the real messages and service stubs.
"""

from __future__ import annotations

import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT


def _plugin(name: str) -> str | None:
    beside = pathlib.Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def generate() -> None:
    from grpc_tools import protoc  # imported late: only builds and developers need it

    include = pathlib.Path(protoc.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT}")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
    ]
    mypy, mypy_grpc = _plugin("protoc-gen-mypy"), _plugin("protoc-gen-mypy_grpc")
    if mypy and mypy_grpc:
        args += [
            f"--plugin=protoc-gen-mypy={mypy}",
            f"--plugin=protoc-gen-mypy_grpc={mypy_grpc}",
            f"--mypy_out={OUT}",
            f"--mypy_grpc_out={OUT}",
        ]
    else:  # plain stubs for messages only; enough to run, not to type-check the services
        print("protos/generate.py: mypy-protobuf not found, generating plain .pyi",
              file=sys.stderr)
        args.append(f"--pyi_out={OUT}")
    args += protos
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed: " + " ".join(args))


if __name__ == "__main__":
    generate()
