"""Every service in docker-compose.yml that runs the relayq image must run a console script
that pyproject.toml declares, and whose entry point imports: a renamed script or module
would otherwise surface only when someone runs `docker-compose up`.

Run with the Debian python3 that docker-compose itself runs on (it has PyYAML):
    /usr/bin/python3 .ci/compose_commands.py .venv/bin/python
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    venv_python = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / ".venv/bin/python")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    problems = []
    checked = 0
    for name, service in compose["services"].items():
        if "build" not in service:
            continue  # a third-party image (postgres)
        command = service.get("command")
        if isinstance(command, str):
            command = command.split()
        if not command:
            problems.append(f"{name}: no command (the image's default would run)")
            continue
        script = command[0]
        if script not in scripts:
            problems.append(f"{name}: {script!r} is not in pyproject's [project.scripts]")
            continue
        module, _, function = scripts[script].partition(":")
        probe = f"import {module} as m; assert callable(getattr(m, {function!r}))"
        result = subprocess.run([venv_python, "-c", probe], capture_output=True, text=True,
                                check=False)
        if result.returncode != 0:
            problems.append(f"{name}: {script} -> {scripts[script]} does not import:"
                            f" {result.stderr.strip().splitlines()[-1:]}")
            continue
        checked += 1
    for problem in problems:
        print(f"compose: {problem}", file=sys.stderr)
    if not problems:
        print(f"compose: {checked} services run declared console scripts")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
