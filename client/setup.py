"""Build hook: generate relayq.v1 (src/relayq/v1) from protos/ before packages are collected.

protos/ is the repository's protos/ folder (a link here; a copy in an sdist), so this
distribution builds from its own folder alone. See protos/generate.py.
"""

import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithProtos(build_py):
    def run(self) -> None:
        here = Path(__file__).absolute().parent
        runpy.run_path(str(here / "protos" / "generate.py"))["generate"](here / "src")
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
