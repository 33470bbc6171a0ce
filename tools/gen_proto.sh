#!/usr/bin/env bash
# Regenerate proto/generation_pb2*.py from proto/generation.proto.
# Usage: tools/gen_proto.sh [OUT_DIR]   (default: the repo root; the test writes to a temp dir and compares)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root}"
mkdir -p "$out/proto"
cd "$root"
# Include root = repo root, so the stubs import each other as `proto.generation_pb2`.
"${PYTHON:-python}" -m grpc_tools.protoc -I . --python_out="$out" --grpc_python_out="$out" proto/generation.proto
