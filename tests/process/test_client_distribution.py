"""relayq-client on its own, as a service that only sends events would install it.

Built from client/ and installed into a fresh virtual environment (pip, from the package
index), it pulls in grpcio, protobuf and what they depend on, and nothing else; it carries no
server code; and the README's producer snippet runs from it against a real ingest, on the
standard library's JSON and event loop (no orjson, no uvloop there).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from psycopg import AsyncConnection

from tests import factories, readme
from tests.services import ingest

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[2]

# Run by the fresh environment's Python: every installed distribution, and the names each
# requires (extras and requirements whose markers do not apply left out).
_INSTALLED = """
import json
from importlib import metadata
from pip._vendor.packaging.requirements import Requirement
found = {}
for dist in metadata.distributions():
    needs = []
    for text in dist.requires or ():
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            needs.append(req.name)
    found[dist.metadata["Name"]] = needs
print(json.dumps(found))
"""

# What a fresh virtual environment has before anything is installed into it.
_BOOTSTRAP = {"pip", "setuptools"}


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _closure(roots: set[str], requires: dict[str, list[str]]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_normal(n) for n in requires.get(name, []))
    return seen


def producer_snippet() -> str:
    """The README's send.py: the producer library as a service uses it."""
    return next(b.code for b in readme.blocks("by-hand") if b.file == "send.py")


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with `pip install client/` and nothing else.

    From a copy of client/ with its links followed, as an sdist has it: so the build leaves
    nothing in the checkout, and shows the client builds from its own folder alone."""
    here = tmp_path_factory.mktemp("client")
    source = here / "client"
    shutil.copytree(ROOT / "client", source, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "*_pb2*", "__pycache__"))
    venv = here / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    done = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
         str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return venv / "bin" / "python"


def test_the_client_pulls_in_grpcio_protobuf_and_their_dependencies_only(
    client_venv: Path
) -> None:
    out = subprocess.run([str(client_venv), "-c", _INSTALLED], check=True, cwd="/",
                         capture_output=True, text=True).stdout
    requires = {_normal(name): needs for name, needs in json.loads(out).items()}
    assert set(requires["relayq-client"]) == {"grpcio", "protobuf"}
    allowed = _closure({"relayq-client"}, requires) | _BOOTSTRAP
    assert set(requires) <= allowed, set(requires) - allowed


def test_the_client_carries_no_server_code(client_venv: Path) -> None:
    """relayq is a namespace package: here it holds the client's two packages alone, and
    the optional speedups are absent, so the snippet below runs on the standard library."""
    check = "\n".join([
        "import importlib.util, pathlib, relayq, relayq.client, relayq.v1.ingest_pb2",
        "print(sorted(p.name for path in relayq.__path__",
        "             for p in pathlib.Path(path).iterdir() if not p.name.startswith('__')))",
        "print([m for m in ('relayq.config', 'relayq.cli', 'jobsdb', 'psycopg', 'orjson',",
        "                   'uvloop', 'backoff', 'google.rpc')",
        "       if importlib.util.find_spec(m) is not None])",
    ])
    out = subprocess.run([str(client_venv), "-c", check], check=True, cwd="/", capture_output=True,
                         text=True).stdout.splitlines()
    assert out == ["['client', 'v1']", "[]"]


async def test_the_readme_producer_snippet_runs_from_the_client_alone(
    client_venv: Path, database: str, conn: AsyncConnection[Any]
) -> None:
    web = await factories.source(conn, await factories.tenant(conn))
    async with ingest(database) as service:
        child = await asyncio.create_subprocess_exec(
            str(client_venv), "-c", producer_snippet(), cwd="/",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={"RELAYQ_INGEST_ADDRESS": f"127.0.0.1:{service.app.port}",
                 "RELAYQ_WRITE_KEY": web.write_key})
        out, err = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == 0, err.decode()
    assert out.decode().strip() == "ACCEPTED", out.decode()
