#!/usr/bin/env bash
# Issue #20's measurements on a GPU machine with PyTorch 2.11.0 and no Rust: run from the
# repository root with gpu-bundle/ (scripts/gpu-bundle.sh) beside it. Each step's output goes to
# $OUT (default gpu-results/) as one text file (eight in all); a failing step is recorded and the
# next one runs. With the device tool: carry gpu-bundle, command `scripts/gpu-check.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
u=gpu-bundle/unimod
step() { # name, command...
  local name=$1; shift
  echo "== $name: $*" | tee "$out/$name.txt"
  ( time "$@" ) >>"$out/$name.txt" 2>&1
  echo "exit $?" >>"$out/$name.txt"
  tail -3 "$out/$name.txt"
}
step 01-doctor "$u" doctor
# CUDA graphs: capture, replay equal to eager, a host read under capture refused cleanly.
step 02-graph-test gpu-bundle/graph-test --test-threads 1
# Eager and graphed steps side by side, f32 then bf16, at the tiny shapes (launch-bound).
step 03-bench-graph-f32 "$u" bench --device cuda --d-model 128,512,1024 --rounds 20 --graph
step 04-bench-graph-bf16 "$u" bench --device cuda --d-model 128,512,1024 --rounds 20 --graph --precision bf16
# The Show-o 1.3B-like shape in bf16: dense MFU against the bf16 matmul rate, UniMoD's ratio.
step 05-bench-showo-bf16 "$u" bench --device cuda --d-model 2048 --layers 24 --image-side 32 --per-task 4 --rounds 8 --precision bf16
# Data-parallel through NCCL: a world of one rank on the GPU (torchrun's variables), 30 steps,
# then the same run as one plain process (the metrics should agree).
train=("$u" train --config gpu-bundle/configs/tiny.toml --set train.steps=30 --set 'train.device="cuda"' --overwrite)
step 06-one-process "${train[@]}" --out "$out/run-plain"
step 07-nccl-world-1 env WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 "${train[@]}" --out "$out/run-nccl"
# The trainer's step in CUDA graphs (one per step shape): the same run as 06, its metrics should
# agree within float tolerance and its steps take less time.
step 08-train-graphs "${train[@]}" --set train.cuda_graphs=16 --out "$out/run-graphs"
# The last metrics line of each run beside its log (the device tool brings back 8 files at most).
tail -1 "$out/run-plain/metrics.jsonl" >>"$out/06-one-process.txt" 2>&1
tail -1 "$out/run-nccl/metrics.jsonl" >>"$out/07-nccl-world-1.txt" 2>&1
tail -1 "$out/run-graphs/metrics.jsonl" >>"$out/08-train-graphs.txt" 2>&1
rm -rf "$out/run-nccl" "$out/run-plain" "$out/run-graphs"
ls "$out"
