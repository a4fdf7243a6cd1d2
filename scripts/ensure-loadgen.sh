#!/usr/bin/env bash
# Make sure the C++ load generator (bench/loadgen) can be built: gRPC C++ headers and libraries
# (pkg-config grpc++), protobuf, and g++. Installs Debian's packages when missing and we may;
# otherwise says what is missing and fails.
set -euo pipefail
have_all() {
    command -v g++ >/dev/null 2>&1 \
        && command -v pkg-config >/dev/null 2>&1 \
        && pkg-config --exists grpc++ protobuf
}
if have_all; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure-loadgen: installing libgrpc++-dev and friends from Debian's packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends \
        libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev pkg-config g++ >/dev/null
    if have_all; then
        exit 0
    fi
fi
echo "ensure-loadgen: need g++, pkg-config and the grpc++/protobuf development packages" >&2
echo "  (Debian: apt-get install libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev pkg-config g++)" >&2
exit 1
