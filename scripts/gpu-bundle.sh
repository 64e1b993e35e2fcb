#!/usr/bin/env bash
# Builds what a GPU machine without Rust needs for issue #20's measurements (scripts/gpu-check.sh)
# into gpu-bundle/ (git-ignored): the stripped release CLI and the stripped CUDA-graph test.
# Carry gpu-bundle/ to the machine; run scripts/gpu-check.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p unimod-train
test_exe=$(cargo test --release -p unimod-kernels --test graph --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "graph":
        print(m["executable"])')
mkdir -p gpu-bundle
strip -o gpu-bundle/unimod target/release/unimod
strip -o gpu-bundle/graph-test "$test_exe"
cp -r configs gpu-bundle/
du -sh gpu-bundle
