#!/usr/bin/env bash
# Build the load generator into bench/loadgen/build/loadgen (git-ignored).
# Needs g++ and Debian's libgrpc++-dev (see scripts/ensure-loadgen.sh). Rebuilds only when
# the source or this script is newer than the binary.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
src="$here/loadgen.cc"
out="$here/build/loadgen"
if [ -x "$out" ] && [ "$out" -nt "$src" ] && [ "$out" -nt "$here/build.sh" ]; then
    exit 0
fi
if ! pkg-config --exists grpc++ protobuf; then
    echo "build.sh: grpc++/protobuf not found by pkg-config; run scripts/ensure-loadgen.sh" >&2
    exit 1
fi
mkdir -p "$here/build"
# shellcheck disable=SC2046  # pkg-config output must split into separate flags
g++ -O2 -std=c++17 -Wall -Wextra -o "$out.tmp" "$src" $(pkg-config --cflags --libs grpc++ protobuf)
mv "$out.tmp" "$out"
echo "build.sh: built $out" >&2
