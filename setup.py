"""Build hook: generate relayq/v1 from protos/ before packages are collected.

See protos/generate.py.
"""

import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithProtos(build_py):
    def run(self) -> None:
        runpy.run_path(str(Path(__file__).parent / "protos" / "generate.py"))["generate"]()
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
