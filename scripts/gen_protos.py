"""Generate the Python gRPC stubs for proto/ into src/stockhold/v1 (used by setup.py and make)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "src"
GENERATED = OUT_DIR / "stockhold" / "v1"


def googleapis_include() -> str:
    """The folder holding google/rpc/status.proto: googleapis-common-protos ships it.

    That package is a runtime dependency (through grpcio-status) and a build requirement; its
    generated status_pb2 is what the stubs import, so the .proto is read from the same place.
    """
    spec = importlib.util.find_spec("google.rpc")
    locations = list(spec.submodule_search_locations or ()) if spec else []
    for folder in locations:
        if (Path(folder) / "status.proto").is_file():
            return str(Path(folder).parent.parent)
    raise SystemExit(
        "google/rpc/status.proto not found: install googleapis-common-protos "
        "(pip install googleapis-common-protos)"
    )


def mypy_plugin(name: str) -> str | None:
    """A mypy-protobuf console script: beside this interpreter (a venv), else on PATH (pip's
    isolated build environment, as in `pip install .`, puts its scripts there)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def generate() -> None:
    """Run grpc_tools.protoc; add .pyi type stubs when the mypy-protobuf plugin is installed."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"-I{googleapis_include()}",
        f"--python_out={OUT_DIR}",
        f"--grpc_python_out={OUT_DIR}",
    ]
    mypy, mypy_grpc = mypy_plugin("protoc-gen-mypy"), mypy_plugin("protoc-gen-mypy_grpc")
    has_mypy_protobuf = importlib.util.find_spec("mypy_protobuf") is not None
    if has_mypy_protobuf and mypy and mypy_grpc:
        args += [
            f"--plugin=protoc-gen-mypy={mypy}",
            f"--plugin=protoc-gen-mypy_grpc={mypy_grpc}",
            f"--mypy_out={OUT_DIR}",
            f"--mypy_grpc_out={OUT_DIR}",
        ]
    # Overwrite in place (no rmtree): a running test or server may be importing these.
    GENERATED.mkdir(parents=True, exist_ok=True)
    if protoc.main([*args, *protos]) != 0:
        raise SystemExit("protoc failed")
    (GENERATED / "__init__.py").write_text('"""Generated gRPC stubs (make stubs)."""\n')


if __name__ == "__main__":
    generate()
