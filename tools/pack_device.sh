#!/usr/bin/env bash
# What the lent GPU machine lacks, packed on the development machine into .device/ (git-ignored)
# for the device tool's `carry`; tools/gpu_machine.sh unpacks it there.
#
#   bash tools/pack_device.sh                 # .device/sitemin.tar.xz and .device/extra.tar.xz
#   bash tools/pack_device.sh --model NAME    # also a pulled model in pieces: .device/model/
#   bash tools/pack_device.sh --base REV      # also the tree at REV: .device/base.tar.xz (AB=)
#
# sitemin.tar.xz: gguf, llguidance, msgpack and pytest-timeout for the machine's Python 3.12
#   (it has numpy, cupy, pytest, jinja2, regex, tqdm, pyyaml); 2.6 MB.
# extra.tar.xz: vocab/ (the llama-vocab tokenizers the replicas borrow, and Gemma 3's from the
#   pulled gemma3-270m) and cubin/ (every kernel module compiled by nvcc for sm_90a, where nvcc
#   is here: no NVRTC wait there); ~5 MB.
# model/: the file in pieces of 54 MiB (a call carries 64 MiB with the ~5 MB tree) and
#   `manifest` (file name, sha256, pieces). Carry the manifest and one piece a call while the
#   machine stays warm (it goes back after 30 s idle), each call starting with
#   `MODEL_PIECES=1 BENCH=0 bash tools/gpu_machine.sh`: the last piece assembles the file where
#   the model store finds it, checked against the sha256.
# base.tar.xz: `git archive REV` without docs/ and tests/, for `AB=/tmp/ntr-base` (bench_ab.py)
#   or any before/after run of a tool in the same call.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
model="" base=""
while [ $# -gt 0 ]; do
    case "$1" in
        --model) model=$2; shift 2 ;;
        --base) base=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
mkdir -p .device
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

platforms=(--platform manylinux2014_x86_64)
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
pip_args=(--quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}")
"$PY" -m pip download "${pip_args[@]}" -d "$tmp/wheels" gguf llguidance msgpack pytest-timeout
"$PY" -m pip install "${pip_args[@]}" --target "$tmp/site" "$tmp"/wheels/*.whl
tar -C "$tmp/site" -cf - . | xz -6 > .device/sitemin.tar.xz

mkdir -p "$tmp/extra/vocab"
cp ../shared/llama-vocab/ggml-vocab-{qwen2,llama-bpe,llama-spm}.gguf "$tmp/extra/vocab/"
"$PY" tools/bench_gpu.py --write-vocab "$tmp/extra/vocab"
if command -v nvcc > /dev/null; then
    "$PY" tools/bench_gpu.py --prebuild "$tmp/extra/cubin" > /dev/null
else
    echo "no nvcc here: the kernels compile through NVRTC on the GPU machine" >&2
fi
tar -C "$tmp/extra" -cf - . | xz -9 > .device/extra.tar.xz

if [ -n "$model" ]; then
    # the store checked the file against its recorded sha256 when it pulled it: that one goes
    read -r file sha < <("$PY" -c "import sys; from workers.model import store
print(store.pull(sys.argv[1], log=lambda *_: None), store.REGISTRY[sys.argv[1]].sha256)" "$model")
    rm -rf .device/model && mkdir -p .device/model
    split -b 54M -d -a 2 "$file" .device/model/p
    pieces=$(ls .device/model/p* | wc -l)
    echo "$(basename "$file") $sha $pieces" > .device/model/manifest
    echo "carry .device/model/manifest and one of .device/model/p00 .. p$(printf %02d $((pieces - 1))) a call"
fi

if [ -n "$base" ]; then
    mkdir -p "$tmp/base" && git archive "$base" | tar -C "$tmp/base" -xf -
    tar -C "$tmp/base" -cf - --exclude=./docs --exclude=./tests . | xz -6 > .device/base.tar.xz
fi
ls -la .device
