"""Build hooks: generate gRPC stubs from proto/ before the package is built."""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithStubs(build_py):
    """build_py that first regenerates src/stockhold/v1 from proto/."""

    def run(self) -> None:
        sys.path.insert(0, str(ROOT / "scripts"))
        import gen_protos

        gen_protos.generate()
        super().run()


setup(
    cmdclass={"build_py": BuildPyWithStubs},
    package_dir={"": "src"},
    packages=["stockhold", "stockhold.scripts", "stockhold.v1"],
)
