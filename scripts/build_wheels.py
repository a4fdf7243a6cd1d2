"""Build stockhold's sdist and wheel, plus a wheel of every dependency, into one folder that
installs offline. The Dockerfile and tests/test_wheel.py both build with this script and
install with the same line, so the test installs what the image installs:

    python scripts/build_wheels.py --out dist/wheels .
    pip install --no-index --find-links=dist/wheels stockhold

Steps:
1. Dependency wheels: `pip wheel` of [project].dependencies, [build-system].requires and the
   `build` frontend, into CACHE/KEY/wheels. KEY hashes that list, the Python version and the
   platform, so the network is used once per dependency list; later runs reuse the folder.
2. A build environment: the venv CACHE/KEY/buildenv with [build-system].requires and
   `build`, installed from those wheels only (no index).
3. `python -m build --no-isolation SOURCE`: the sdist from the source tree, then the wheel
   from the unpacked sdist, which proves that the sdist holds everything a build needs.
4. A check that the wheel holds every module, Lua script, .pyi stub and py.typed of the built
   src/stockhold, and a compiled module for every native/*.pyx.
5. Hard links (or copies) of the dependency wheels into OUT, beside stockhold's own.

`--deps-only` stops after step 2 (the Dockerfile's cached layer). A lock file per KEY lets
builds share one cache; making a new KEY removes the other keys' folders that no build uses.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The PEP 517 frontend that builds sdist and wheel inside the build environment.
FRONTEND = ["build>=1.2"]
# Files of the package that must reach the wheel (besides compiled modules).
PACKAGE_FILES = ("*.py", "*.pyi", "*.lua", "py.typed")
PACKAGE = "stockhold"


def requirements(source: Path) -> tuple[list[str], list[str]]:
    """(runtime dependencies, build requirements + frontend) from SOURCE/pyproject.toml."""
    with open(source / "pyproject.toml", "rb") as f:
        pyproject = tomllib.load(f)
    runtime = list(pyproject["project"]["dependencies"])
    build = list(pyproject["build-system"]["requires"]) + FRONTEND
    return runtime, build


def cache_key(reqs: list[str]) -> str:
    """Names one wheelhouse: the requirement list, the interpreter and the platform."""
    ident = [sorted(reqs), platform.python_implementation(), sys.version_info[:2]]
    ident.append(sysconfig.get_platform())
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    """Run a command, echoing it; stop the script when it fails."""
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    result = subprocess.run(cmd, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"build_wheels: failed ({result.returncode}): {' '.join(cmd)}")


def clean_env() -> dict[str, str]:
    """The environment for builds: no STOCKHOLD_* (e.g. a traced or pure-Python build)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("STOCKHOLD_")}


def venv_python(venv: Path) -> Path:
    """The interpreter of a venv."""
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


@contextmanager
def dependencies(cache: Path, source: Path) -> Iterator[tuple[Path, Path]]:
    """Steps 1 and 2: (wheel folder, build environment) for SOURCE's requirement list.

    Made under an exclusive lock on CACHE/KEY.lock, used under a shared one: a build that
    makes a new KEY then removes the stores of other keys that nobody is using.
    """
    runtime, build = requirements(source)
    key = cache_key(runtime + build)
    store = cache.absolute() / key
    wheels, buildenv = store / "wheels", store / "buildenv"
    cache.mkdir(parents=True, exist_ok=True)
    with open(store.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        made = not (buildenv / ".ready").exists()
        if not wheels.is_dir():
            make_wheels(store, runtime + build)
        if made:
            shutil.rmtree(buildenv, ignore_errors=True)
            run([sys.executable, "-m", "venv", str(buildenv)])
            pip = [str(venv_python(buildenv)), "-m", "pip", "install", "-q"]
            run([*pip, "--no-index", f"--find-links={wheels}", *build], env=clean_env())
            (buildenv / ".ready").touch()
        fcntl.flock(lock, fcntl.LOCK_SH)
        if made:
            prune(cache.absolute(), keep=key)
        yield wheels, buildenv


def make_wheels(store: Path, reqs: list[str]) -> None:
    """Step 1: `pip wheel` of reqs into STORE/wheels, complete or not there at all."""
    # One resolve for every requirement: grpcio-tools (build) and grpcio (runtime) agree, so
    # the stubs it generates accept the grpcio that gets installed.
    tmp = Path(tempfile.mkdtemp(prefix="wheels.", dir=store.parent))
    try:
        listing = tmp / "requirements.txt"
        listing.write_text("\n".join(reqs) + "\n")
        pip = [sys.executable, "-m", "pip", "wheel", "--progress-bar", "off", "-q"]
        run([*pip, "--wheel-dir", str(tmp), "-r", str(listing)])
        listing.unlink()
        store.mkdir(parents=True, exist_ok=True)
        tmp.rename(store / "wheels")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prune(cache: Path, keep: str) -> None:
    """Remove the stores of other keys (an older dependency list) that no build is using."""
    for lock_path in cache.glob("*.lock"):
        if lock_path.stem == keep:
            continue
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # in use
            shutil.rmtree(cache / lock_path.stem, ignore_errors=True)


def build_package(source: Path, out: Path, buildenv: Path) -> tuple[Path, Path]:
    """Step 3: (sdist, wheel) of SOURCE in OUT, the wheel built from the sdist."""
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob(f"{PACKAGE}-*.whl"), *out.glob(f"{PACKAGE}-*.tar.gz")]:
        old.unlink()  # an older build of the same version would make the install ambiguous
    cmd = [str(venv_python(buildenv)), "-m", "build", "--no-isolation", "--outdir", str(out)]
    run([*cmd, str(source)], env=clean_env())
    (wheel,) = out.glob(f"{PACKAGE}-*.whl")
    (sdist,) = out.glob(f"{PACKAGE}-*.tar.gz")
    return sdist, wheel


def missing_from_wheel(source: Path, wheel: Path) -> list[str]:
    """Step 4: what the built source has and the wheel lacks (empty when complete)."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    root = source / "src"
    wanted = sorted(
        p.relative_to(root).as_posix()
        for pattern in PACKAGE_FILES
        for p in (root / PACKAGE).rglob(pattern)
        if "__pycache__" not in p.parts
    )
    missing = [name for name in wanted if name not in names]
    for pyx in sorted((source / "native").glob("*.pyx")):
        prefix = f"{PACKAGE}/{pyx.stem}."
        if not any(n.startswith(prefix) and n.endswith((".so", ".pyd")) for n in names):
            missing.append(f"{prefix}*.so (compiled from native/{pyx.name})")
    return missing


def link_into(wheels: Path, out: Path) -> None:
    """Step 5: the dependency wheels into OUT (hard links where the filesystem allows)."""
    for whl in wheels.glob("*.whl"):
        target = out / whl.name
        if target.exists():
            continue
        try:
            os.link(whl, target)
        except OSError:
            shutil.copy2(whl, target)


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("source", nargs="?", default=".", type=Path, help="source tree")
    parser.add_argument("--out", type=Path, help="folder for every wheel and the sdist")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path("build/wheelhouse"),
        help="dependency wheels and build environments, one per KEY (default build/wheelhouse)",
    )
    parser.add_argument("--deps-only", action="store_true", help="steps 1 and 2 only")
    args = parser.parse_args(argv)
    source: Path = args.source.resolve()
    if args.out is None and not args.deps_only:
        parser.error("--out is required (unless --deps-only)")

    started = time.monotonic()
    with dependencies(args.cache, source) as (wheels, buildenv):
        if args.deps_only:
            print(f"build_wheels: dependency wheels in {wheels}", file=sys.stderr)
            return 0
        out: Path = args.out.absolute()
        sdist, wheel = build_package(source, out, buildenv)
        missing = missing_from_wheel(source, wheel)
        if missing:
            print(f"build_wheels: {wheel.name} lacks:", *missing, sep="\n  ", file=sys.stderr)
            return 1
        link_into(wheels, out)
    took = time.monotonic() - started
    print(f"build_wheels: {sdist.name}, {wheel.name} and dependencies in {out} ({took:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
