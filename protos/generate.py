"""Generate relayq's Python gRPC code from protos/. The one command: python protos/generate.py

The output is the package relayq.v1 of the relayq-client distribution (client/src/relayq/v1/),
never edited by hand or committed; client/setup.py runs this on every build of the client
(editable installs included), so `pip install -e client` leaves working code behind. The
client's build finds this file as client/protos/generate.py (client/protos is a link to this
folder, which an sdist turns into a copy), so the client builds from its own folder alone.
Type stubs come from mypy-protobuf (a build requirement), so the services type-check against
the real messages and service stubs.
"""

from __future__ import annotations

import pathlib
import shutil
import sys

# Not resolved: through client/protos this is the client's own copy (in an sdist, a real one).
PROTO_ROOT = pathlib.Path(__file__).absolute().parent
# Where `python protos/generate.py` writes in a checkout: the client's sources.
OUT = PROTO_ROOT.parent / "client" / "src"


def _plugin(name: str) -> str | None:
    beside = pathlib.Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def generate(out: pathlib.Path = OUT) -> None:
    from grpc_tools import protoc  # imported late: only builds and developers need it

    include = pathlib.Path(protoc.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT}")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
    ]
    mypy, mypy_grpc = _plugin("protoc-gen-mypy"), _plugin("protoc-gen-mypy_grpc")
    if mypy and mypy_grpc:
        args += [
            f"--plugin=protoc-gen-mypy={mypy}",
            f"--plugin=protoc-gen-mypy_grpc={mypy_grpc}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
        ]
    else:  # plain stubs for messages only; enough to run, not to type-check the services
        print("protos/generate.py: mypy-protobuf not found, generating plain .pyi",
              file=sys.stderr)
        args.append(f"--pyi_out={out}")
    args += protos
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed: " + " ".join(args))


if __name__ == "__main__":
    generate()
