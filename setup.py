"""Build hooks: generate gRPC stubs from proto/ before the package is built, and compile the
optional native hot path (native/*.pyx, Cython) into stockhold._resolver_c.

The extension is optional: without Cython or without a working C compiler the build still
succeeds, with a warning, and stockhold runs on its pure-Python twin (stockhold._resolver_py).
STOCKHOLD_CYTHON_TRACE=1 compiles it with line tracing (for coverage and profilers).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError

try:
    from Cython.Build import cythonize
except ImportError:  # a pure-Python build (see native_extensions)
    cythonize = None

ROOT = Path(__file__).resolve().parent
TRACE = os.environ.get("STOCKHOLD_CYTHON_TRACE", "") not in ("", "0")

# Anything that can go wrong compiling an optional extension: no compiler, a failing one, no
# Python headers, a linker error.
BUILD_ERRORS = (CCompilerError, CompileError, ExecError, LinkError, PlatformError, OSError)


def warn(message: str) -> None:
    """A build warning that stands out in the log."""
    bar = "*" * 76
    print(f"\n{bar}\nWARNING: {message}\n{bar}\n", file=sys.stderr, flush=True)


def generate_stubs() -> None:
    """Generate src/stockhold/v1 from proto/ (grpcio-tools is a build requirement)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import gen_protos

    gen_protos.generate()


# Packages are discovered (pyproject.toml, [tool.setuptools.packages.find]) when setup() runs
# below: stockhold.v1 must exist by then, also on a fresh clone or in an unpacked sdist (which
# leaves the generated stubs out).
if not (ROOT / "src" / "stockhold" / "v1" / "inventory_pb2.py").exists():
    generate_stubs()


class BuildPyWithStubs(build_py):
    """build_py that first regenerates src/stockhold/v1 from proto/."""

    def run(self) -> None:
        generate_stubs()
        super().run()


class OptionalBuildExt(build_ext):
    """build_ext that cythonizes native/, and whose failure leaves a working pure package.

    Cythonizing here, rather than when this file is imported, keeps metadata-only commands
    (egg_info, dist_info, sdist) fast.
    """

    def finalize_options(self) -> None:
        # Cythonize before the base class: it annotates the Extension objects it finds. Once
        # per build: bdist_wheel may finalize a second build_ext.
        dist = self.distribution
        if not getattr(dist, "stockhold_cythonized", False):
            dist.stockhold_cythonized = True  # type: ignore[attr-defined]
            dist.ext_modules = self._cythonize(dist.ext_modules or [])
        super().finalize_options()
        if self.parallel is None:
            # Each extension is one large C file: compile them side by side (a wheel build
            # runs in make test, through tests/test_wheel.py).
            self.parallel = os.cpu_count() or 1
        if TRACE:
            self.force = True  # a traced build must not keep an untraced .so

    @staticmethod
    def _cythonize(extensions: list[Extension]) -> list[Extension]:
        if cythonize is None or not extensions:
            return []
        # One Cython process per extension and core (0: in this process).
        workers = min(len(extensions), os.cpu_count() or 1)
        built: list[Extension] = cythonize(
            extensions,
            nthreads=workers if workers > 1 else 0,
            compiler_directives={"language_level": 3, "linetrace": TRACE, "embedsignature": True},
            # Traced C sources live apart so that neither build reuses the other's.
            build_dir="build/cython-trace" if TRACE else None,
            force=TRACE,
            quiet=True,
        )
        return built

    def run(self) -> None:
        try:
            super().run()
        except BUILD_ERRORS as exc:
            self._fallback(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except BUILD_ERRORS as exc:
            self._fallback(exc, ext.name)

    @staticmethod
    def _fallback(exc: BaseException, name: str = "the native extensions") -> None:
        warn(
            f"could not compile {name} ({exc.__class__.__name__}: {exc}).\n"
            "stockhold will run on its pure-Python resolver: correct, but slower."
        )


NATIVE = [
    Extension(
        "stockhold._resolver_c",
        ["native/_resolver_c.pyx"],
        extra_compile_args=["-O2"] if os.name != "nt" else [],
        define_macros=[("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if TRACE else [],
    ),
    # Contention statistics' live sketch (pure twin: stockhold.contention.Sketch).
    Extension(
        "stockhold._contention_c",
        ["native/_contention_c.pyx"],
        extra_compile_args=["-O2"] if os.name != "nt" else [],
        define_macros=[("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if TRACE else [],
    ),
]


def native_extensions() -> list[Extension]:
    """The extensions to build: none, with a warning, without Cython (the wheel is then pure)."""
    if cythonize is None:
        warn(
            "Cython is not installed: the native extensions are not built.\n"
            "stockhold will run on its pure-Python resolver: correct, but slower."
        )
        return []
    return NATIVE


# Packages and package data are in pyproject.toml.
setup(
    cmdclass={"build_py": BuildPyWithStubs, "build_ext": OptionalBuildExt},
    ext_modules=native_extensions(),
)
