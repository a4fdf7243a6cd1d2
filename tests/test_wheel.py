"""What users install is what the suite tests: the wheel, built and installed as the image does.

Every other test runs against the editable install. This one builds the sdist and the wheel
(from the sdist) with scripts/build_wheels.py, from the files a `docker build .` of this tree
would send (.dockerignore applied), installs the wheel into a fresh venv outside the source
tree with the Dockerfile's own install line, then: every module of src/stockhold imports from
the venv, the compiled resolver is the one in use, and the installed `stockhold serve` serves
an AdjustStock and a Reserve from the installed CLI on a private Redis, then exits 0 on SIGTERM.

The dependency wheels are cached in build/wheelhouse (one folder per dependency list; `make
clean` drops it): the first run downloads them, later runs only build stockhold itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis_proc import free_port

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "build" / "wheelhouse"

# The build and the install, word for word as the Dockerfile runs them (see
# test_the_dockerfile_builds_and_installs_as_this_test_does); {cache} and {wheels} are folders.
BUILD = "python scripts/build_wheels.py --cache {cache} --out {wheels} ."
INSTALL = "pip install --no-index --find-links={wheels} stockhold"
DOCKER_CACHE, DOCKER_WHEELS = "/wheelhouse", "/wheels"

START_TIMEOUT = 60.0  # two workers importing grpc on a loaded 2-core box
STOP_TIMEOUT = 30.0  # SIGTERM to exit: drain, workers, supervisor
CLI_TIMEOUT = 60.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


# -- the Docker build context -------------------------------------------------------------------


def dockerignore_patterns(root: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, regex) for each .dockerignore line, in order (the last match wins)."""
    rules = []
    for raw in (root / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        rules.append((exclude, re.compile(_glob_regex(pattern))))
    return rules


def _glob_regex(pattern: str) -> str:
    """Docker's glob: `**` spans folders, `*` and `?` stay within one, `[...]` a class."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            out.append("[" + pattern[i + 1 : end].replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def ignored(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker leaves rel out: a pattern matching it or one of its parent folders."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for exclude, rx in rules:
        if any(rx.fullmatch(p) for p in prefixes):
            verdict = exclude
    return verdict


def docker_context(root: Path, dest: Path) -> Path:
    """Copy what `docker build root` would send (regular files, .dockerignore applied)."""
    rules = dockerignore_patterns(root)
    prunable = all(exclude for exclude, _ in rules)  # no `!` rule can bring a file back
    for folder, dirs, files in os.walk(root):
        base = Path(folder).relative_to(root)
        if prunable:
            dirs[:] = [d for d in dirs if not ignored((base / d).as_posix(), rules)]
        for name in files:
            rel = (base / name).as_posix()
            src = Path(folder) / name
            if ignored(rel, rules) or not src.is_file():
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def test_the_dockerignore_matcher_follows_docker_globs(tmp_path: Path) -> None:
    (tmp_path / ".dockerignore").write_text("# c\n.git\n**/__pycache__\n**/*.py[cod]\nsrc/x\n")
    rules = dockerignore_patterns(tmp_path)
    assert ignored(".git/HEAD", rules)
    assert ignored("src/a/__pycache__/m.cpython-311.pyc", rules)
    assert ignored("__pycache__/m", rules)
    assert ignored("a/b.pyc", rules) and ignored("b.pyo", rules)
    assert ignored("src/x/y.py", rules)
    assert not ignored("src/xy.py", rules)
    assert not ignored("a/b.py", rules)
    assert not ignored("src/.git", rules)


def build_inputs(root: Path) -> list[str]:
    """The files of root that a build of stockhold reads (not those it generates)."""
    top = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md"]
    top += ["scripts/gen_protos.py", "scripts/build_wheels.py"]
    found = [p for p in (root / "src" / "stockhold").rglob("*") if p.is_file()]
    found += [*(root / "proto").rglob("*.proto"), *(root / "native").glob("*.pyx")]
    generated = re.compile(r"src/stockhold/v1/.*|.*(/__pycache__/.*|\.so|\.c|\.py[cod])")
    rels = [p.relative_to(root).as_posix() for p in found]
    return top + [rel for rel in rels if not generated.fullmatch(rel)]


def test_the_docker_context_holds_every_build_input() -> None:
    # The context the image (and the build below) starts from: .dockerignore must not drop a
    # source file, e.g. a new subpackage or native module.
    rules = dockerignore_patterns(ROOT)
    assert [rel for rel in build_inputs(ROOT) if ignored(rel, rules)] == []


# -- the Dockerfile -----------------------------------------------------------------------------


def test_the_dockerfile_builds_and_installs_as_this_test_does() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    # Join continuation lines so that each RUN reads as one command.
    flat = re.sub(r"\s*\\\n\s*", " ", dockerfile)
    build = BUILD.format(cache=DOCKER_CACHE, wheels=DOCKER_WHEELS)
    install = INSTALL.format(wheels=DOCKER_WHEELS)
    assert build in flat, f"the Dockerfile must build with `{build}`"
    assert install in flat, f"the Dockerfile must install with `{install}`"
    # The dependency layer runs the same script on the same cache before the source arrives.
    assert f"python scripts/build_wheels.py --cache {DOCKER_CACHE} --deps-only" in flat
    # Nothing else may put a wheel where the install looks.
    assert flat.count("pip wheel") == 0, "wheels come from scripts/build_wheels.py only"


# -- build and install --------------------------------------------------------------------------


@dataclass
class Built:
    """A Docker-like build: the context, and the folder with every wheel and the sdist."""

    context: Path
    wheels: Path
    wheel: Path
    sdist: Path
    seconds: float


@dataclass
class Installed:
    """A fresh venv with the wheel installed, and a working folder outside the source tree."""

    venv: Path
    cwd: Path
    env: dict[str, str]
    seconds: float

    def bin(self, name: str) -> str:
        """A console script or interpreter of the venv."""
        return str(self.venv / "bin" / name)


def clean_env() -> dict[str, str]:
    """The environment without STOCKHOLD_* (defaults apply) or Python path overrides."""
    drop = ("STOCKHOLD_", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def run(cmd: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None) -> str:
    """Run cmd; its stdout, or a test failure with all it printed."""
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The Dockerfile's build, in a copy of its context: the sdist, then the wheel from it."""
    started = time.monotonic()
    context = docker_context(ROOT, tmp_path_factory.mktemp("context"))
    wheels = tmp_path_factory.mktemp("wheels")
    command = BUILD.format(cache=CACHE, wheels=wheels).split()
    run([sys.executable, *command[1:]], cwd=context, timeout=800)
    (wheel,) = wheels.glob("stockhold-*.whl")
    (sdist,) = wheels.glob("stockhold-*.tar.gz")
    return Built(context, wheels, wheel, sdist, time.monotonic() - started)


@pytest.fixture(scope="module")
def installed(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """A fresh venv (no pip of its own) with stockhold installed by the Dockerfile's line.

    The test's pip runs the install for the venv's interpreter (`pip --python`): same
    arguments, same wheels, and no ensurepip, which would double the time.
    """
    started = time.monotonic()
    venv = tmp_path_factory.mktemp("venv")
    cwd = tmp_path_factory.mktemp("cwd")
    assert not venv.is_relative_to(ROOT) and not cwd.is_relative_to(ROOT)
    run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(venv)], cwd, 120)
    pip, *args = INSTALL.format(wheels=built.wheels).split()
    python = str(venv / "bin" / "python")
    run([sys.executable, "-m", pip, "--python", python, "-q", *args], cwd, 600)
    env = clean_env()
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return Installed(venv, cwd, env, time.monotonic() - started)


# -- what the sdist and the wheel hold ---------------------------------------------------------


def package_files(root: Path) -> set[str]:
    """stockhold/... paths of every module, stub, Lua script and marker under root."""
    return {
        p.relative_to(root.parent).as_posix()
        for pattern in ("*.py", "*.pyi", "*.lua", "py.typed")
        for p in root.rglob(pattern)
        if "__pycache__" not in p.parts
    }


def expected_modules(tree: Path) -> set[str]:
    """Every module a source tree has: each .py of src/stockhold, each native/*.pyx."""
    names = set()
    for path in (tree / "src" / "stockhold").rglob("*.py"):
        if "__pycache__" in path.parts:
            continue
        parts = path.relative_to(tree / "src").with_suffix("").parts
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    names |= {f"stockhold.{pyx.stem}" for pyx in (tree / "native").glob("*.pyx")}
    return names


def test_the_sdist_holds_what_a_build_needs_and_nothing_generated(built: Built) -> None:
    with tarfile.open(built.sdist) as tf:
        top = f"{built.sdist.name.removesuffix('.tar.gz')}/"
        members = {m.name.removeprefix(top) for m in tf.getmembers() if m.isfile()}
    # What was built: the copied context, where the build generated src/stockhold/v1.
    tree = built.context
    needed = {"pyproject.toml", "setup.py", "README.md", "scripts/gen_protos.py"}
    needed |= {p.relative_to(tree).as_posix() for p in (tree / "proto").rglob("*.proto")}
    needed |= {p.relative_to(tree).as_posix() for p in (tree / "native").glob("*.pyx")}
    needed |= {
        f"src/{f}"
        for f in package_files(tree / "src" / "stockhold")
        if not f.startswith("stockhold/v1/")
    }
    assert sorted(needed - members) == []
    generated = [
        m for m in members if m.startswith("src/stockhold/v1/") or m.endswith((".so", ".c", ".pyc"))
    ]
    assert generated == [], "the build generates these: the sdist must not carry stale ones"


def test_the_wheel_holds_every_module_script_and_stub_and_the_extension(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as zf:
        names = set(zf.namelist())
    # The generated stubs: the .py and their .pyi (mypy-protobuf is a build requirement).
    for stub in ("inventory_pb2", "inventory_pb2_grpc"):
        assert {f"stockhold/v1/{stub}.py", f"stockhold/v1/{stub}.pyi"} <= names
    assert sorted(package_files(built.context / "src" / "stockhold") - names) == []
    for pyx in (built.context / "native").glob("*.pyx"):
        compiled = [n for n in names if re.fullmatch(rf"stockhold/{pyx.stem}\..+\.so", n)]
        assert compiled, f"no compiled stockhold.{pyx.stem} in {built.wheel.name}"


# -- the installed package ----------------------------------------------------------------------

PROBE = """
import importlib, json, pkgutil, sys
import stockhold, stockhold.resolver
def fail(name):
    raise ImportError(name)
walk = pkgutil.walk_packages(stockhold.__path__, "stockhold.", fail)
names = ["stockhold", *sorted(m.name for m in walk)]
files = {name: importlib.import_module(name).__file__ for name in names}
print(json.dumps({
    "file": stockhold.__file__, "files": files, "native": stockhold.resolver.NATIVE,
    "path": sys.path,
}))
"""


def test_every_module_imports_from_the_fresh_venv_with_the_compiled_resolver(
    built: Built, installed: Installed
) -> None:
    # -I: no PYTHON* variables, no user site, no script folder on sys.path; cwd is outside
    # the source tree. What imports comes from the venv or nowhere.
    out = run([installed.bin("python"), "-I", "-c", PROBE], installed.cwd, 120, installed.env)
    probe = json.loads(out)
    site = installed.venv / "lib"
    assert Path(probe["file"]).is_relative_to(site), probe["file"]
    assert not any(p.startswith(str(ROOT)) for p in probe["path"]), probe["path"]
    expected = expected_modules(built.context)
    assert len(probe["files"]) == len(expected), (
        f"installed {len(probe['files'])} modules, the source tree has {len(expected)}: "
        f"missing {sorted(expected - set(probe['files']))}, "
        f"extra {sorted(set(probe['files']) - expected)}"
    )
    assert set(probe["files"]) == expected
    outside = {n: f for n, f in probe["files"].items() if not Path(f).is_relative_to(site)}
    assert outside == {}
    assert probe["native"] is True, "stockhold.resolver fell back to the pure-Python twin"
    assert probe["files"]["stockhold._resolver_c"].endswith(".so")


def wait_serving(address: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until the gRPC health service answers SERVING (bounded); fail if the server exits."""
    deadline = time.monotonic() + START_TIMEOUT
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"stockhold serve exited {proc.returncode}:\n{log.read_text()}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    pytest.fail(f"not SERVING within {START_TIMEOUT} s:\n{log.read_text()}")


@pytest.fixture
def serving(installed: Installed, redis_proc: Any, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """The installed `stockhold serve` (supervisor and two workers) on a private Redis."""
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path / "serve.log"
    cmd = [installed.bin("stockhold"), "serve", "--redis-url", redis_proc.url]
    cmd += ["--listen", address, "--workers", "2", "--partitions", "16"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=installed.cwd, env=installed.env, stderr=out)
    try:
        wait_serving(address, proc, log)
        yield address, (proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def cli(installed: Installed, *args: str) -> Any:
    """The installed `stockhold` command's JSON answer."""
    return json.loads(
        run([installed.bin("stockhold"), *args], installed.cwd, CLI_TIMEOUT, installed.env)
    )


def test_the_installed_server_reserves_and_exits_0_on_sigterm(
    installed: Installed, serving: tuple[str, Any]
) -> None:
    address, (proc, log) = serving
    at = ("--address", address)
    adjusted = cli(installed, "adjust", "WHEEL", "--warehouse", "wh-1", "--delta", "5", *at)
    assert adjusted["level"]["available"] == "5"
    line = "sku=WHEEL,warehouse=wh-1,qty=2"
    held = cli(installed, "reserve", "wheel-order-1", "--line", line, *at)
    assert held["reservation"]["state"] == "RESERVATION_STATE_HELD"
    (level,) = cli(installed, "availability", "WHEEL", *at)["levels"]
    assert (level["on_hand"], level["available"], level["reserved"]) == ("5", "3", "2")

    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {STOP_TIMEOUT} s after SIGTERM:\n{log.read_text()}")
    text = log.read_text()
    assert code == 0, text
    assert "Traceback" not in text, text
    assert "supervisor stopped" in text, text
