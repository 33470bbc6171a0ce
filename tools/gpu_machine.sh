#!/usr/bin/env bash
# Everything GPU-side in one call on the lent GPU machine (no network, no Ray, no gguf there).
#
#   bash tools/gpu_machine.sh [tools/bench_gpu.py arguments, e.g. --tests --models ...]
#   SERVE=1 ...    first the Serve app on the GPU: batch 1 and 32 streams through HTTP
#                  (SERVE_MODEL: bench_gpu.py's replica name; SERVE_ARGS: bench_serving.py's
#                  arguments, e.g. "--config configs/gpu-70b-streaming.yaml --tokens 32 --runs 2")
#   PROFILE=1 ...  first Nsight Compute on the Llama-3-8B Q4_K_M replica: each kernel's time in
#                  one decode step, then the 1-token and 64-token gate_up products in detail
#   BENCH=0 ...    skip the kernel benchmark (with SERVE=1: the Serve app only)
#   LLAMACPP=1 ... also build llama.cpp (llama-bench, llama-batched-bench; about 4 minutes, in
#                  the background, in a session of its own so that it goes on after the call
#                  ends and a later call on the warm machine finds it) from .device/llama.cpp.tar.xz
#                  and time it on the same replicas
#   TESTS=1 ...    first the GPU tests (pytest -m gpu; TEST_FILES=... for some of them)
#   PREBUILD=1 ... first compile every kernel module with nvcc (16 cores at once, faster than
#                  NVRTC one by one); $OUT/cubin.tar.xz brings them back for .device/extra.tar.xz
#   STREAMING=ROWS ... tools/bench_streaming.py on those rows (e.g. 8b-3,70b-24,70b-8), with
#                  llama.cpp's partial offload too when LLAMACPP=1
#   REQUANT=SPECS ... with STREAMING: each row also with --requant-streamed SPEC for each of SPECS (auto,Q3_K),
#                  same call: decode tok/s and streamed bytes a token with and without
#   KV=1 ...       tools/bench_kv.py (KV_ARGS: its arguments): decode attention and end-to-end
#                  decode by KV cache type (f16, RotateKV q8..q2) on the 8B replica
#   AB=TREE ...    first tools/bench_ab.py: this tree against TREE (the code before a change),
#                  interleaved, on the replicas AB_MODELS names (default: bench_ab.py's); a
#                  carried .device/base.tar.xz is unpacked to /tmp/ntr-base for AB=/tmp/ntr-base
#   MODEL_PIECES=1 first keep the carried piece of a real model (.device/model/manifest and one
#                  .device/model/pNN a call, on a machine kept warm between calls); the last one
#                  assembles the file where the model store finds it, sha256 checked
#
# What is carried is packed on the development machine: by tools/pack_device.sh,
#   .device/sitemin.tar.xz  gguf, llguidance, msgpack, pytest-timeout (the machine has numpy,
#                         cupy, pytest, jinja2, regex, tqdm, pyyaml): the tests and benchmarks
#   .device/extra.tar.xz  vocab/ (llama-vocab tokenizers the replicas borrow, and Gemma 3's) and
#                         cubin/ (the kernels prebuilt by nvcc: no NVRTC wait)
#   .device/model/, .device/base.tar.xz  (MODEL_PIECES=1, AB=/tmp/ntr-base) as above;
# by the commands in docs/benchmarks.md ("GPU kernels"),
#   .device/site.tar.xz   ray[serve] and its dependencies for Python 3.12, unpacked, Ray's Java
#                         jars and unused libraries removed (54 MB of xz: carry it alone; SERVE=1)
#   .device/ray.tar.xz    Ray core alone (34 MB): the GPU stage actor tests
#   .device/llama.cpp.tar.xz  (LLAMACPP=1) the llama.cpp vendored in llama-cpp-python's sdist
# Results go to $OUT (the device tool brings that folder back).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT" /tmp/ntr-site /tmp/ntr-extra
for archive in .device/site.tar.xz .device/sitemin.tar.xz .device/ray.tar.xz; do
    [ -f "$archive" ] && tar -C /tmp/ntr-site -xJf "$archive"
done
[ -f .device/extra.tar.xz ] && tar -C /tmp/ntr-extra -xJf .device/extra.tar.xz
[ -f .device/base.tar.xz ] && rm -rf /tmp/ntr-base && mkdir -p /tmp/ntr-base && tar -C /tmp/ntr-base -xJf .device/base.tar.xz
# numpy and cupy are not carried: the machine's own are used.
export PYTHONPATH="$PWD:/tmp/ntr-site${PYTHONPATH:+:$PYTHONPATH}"
export NTR_VOCAB_DIR=/tmp/ntr-extra/vocab NTR_CUBIN_DIR=/tmp/ntr-extra/cubin
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"

if [ "${MODEL_PIECES:-0}" = 1 ]; then
    read -r name sha count < .device/model/manifest
    mkdir -p /tmp/ntr-pieces && cp .device/model/p[0-9]* /tmp/ntr-pieces/
    target="$(python3 -c 'from workers.model import store; print(store.models_dir())')/$name"
    have=$(ls /tmp/ntr-pieces | wc -l)
    if [ ! -f "$target" ] && [ "$have" = "$count" ]; then
        mkdir -p "$(dirname "$target")"
        cat /tmp/ntr-pieces/p[0-9]* > "$target.part"  # split's names sort in order
        if [ "$(sha256sum "$target.part" | cut -c1-64)" != "$sha" ]; then
            rm "$target.part"; echo "$name: sha256 does not match the manifest's" >&2; exit 1
        fi
        mv "$target.part" "$target" && rm -rf /tmp/ntr-pieces
    fi
    [ -f "$target" ] && echo "$target in place" || echo "model pieces here: $have of $count"
fi

if [ "${SERVE:-0}" = 1 ]; then
    df -h /dev/shm | tee "$OUT/shm.txt"  # a streamed replica's HostTier images live there
    replica=$(python3 tools/bench_gpu.py --write-replica "${SERVE_MODEL:-qwen2.5-0.5b}" --workdir /tmp/ntr-serve | tail -1)
    RAY_AUTH_MODE=disabled python3 tools/bench_serving.py --model "$replica" --backend cupy \
        ${SERVE_ARGS:---tokens 512 --runs 5 --streams 32} 2>&1 | tee "$OUT/bench_serving.log" || true
    rm -f "$replica"
fi

if [ "${PROFILE:-0}" = 1 ]; then
    # each kernel of one decode step (serialized by ncu: no overlap), then two products in detail
    NTR_PROFILE_RANGE=step ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
        python3 tools/bench_gpu.py --tg-only --models llama3-8b-q4_k_m --out /tmp/ntr-profile \
        > "$OUT/step_kernels.csv" 2>&1 || true
    for pair in "gemv_t1:gate_up (norm fused) T=1" "qmma_t64:gate_up tensor cores T=64"; do
        NTR_PROFILE_RANGE="${pair#*:}" ncu --clock-control none --profile-from-start off --launch-count 2 --section SpeedOfLight \
            --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
            --section ComputeWorkloadAnalysis --section SchedulerStats \
            python3 tools/bench_gpu.py --quick --models llama3-8b-q4_k_m --out /tmp/ntr-profile \
            > "$OUT/ncu_${pair%%:*}.txt" 2>&1 || true
    done
fi

if [ "${LLAMACPP:-0}" = 1 ]; then
    # built in the background while the GPU tests and the first model's own benchmark run;
    # bench_gpu.py waits for the `building` marker to go before it times llama.cpp
    if [ ! -x /tmp/llama.cpp/build/bin/llama-bench ] && [ ! -e /tmp/llama.cpp/building ]; then
        tar -C /tmp -xJf .device/llama.cpp.tar.xz
        touch /tmp/llama.cpp/building
        # (niced: the small model's tg128 is bound by this host's Python)
        setsid bash -c 'nice -n 19 cmake -S /tmp/llama.cpp -B /tmp/llama.cpp/build -DGGML_CUDA=ON \
              -DCMAKE_CUDA_ARCHITECTURES=90a -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF \
              -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF &&
            nice -n 19 cmake --build /tmp/llama.cpp/build -j "$(nproc)" --target llama-bench llama-batched-bench ||
            echo "llama.cpp build failed"; rm /tmp/llama.cpp/building' > /tmp/llamacpp_build.log 2>&1 < /dev/null &
    fi
    set -- "$@" --llamacpp /tmp/llama.cpp/build/bin
fi

if [ "${PREBUILD:-0}" = 1 ]; then
    python3 tools/bench_gpu.py --prebuild /tmp/ntr-extra/cubin 2>&1 | tail -1
    tar -C /tmp/ntr-extra -cf - cubin | xz -6 > "$OUT/cubin.tar.xz"
fi

if [ "${TESTS:-0}" = 1 ]; then
    python3 -m pytest -m gpu -q -p no:cacheprovider --timeout=600 ${TEST_FILES:-tests/test_cupy_backend.py \
        tests/test_gpu_end_to_end.py tests/test_layer_streaming.py} 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 || true
fi

if [ -n "${STREAMING:-}" ]; then
    llama_args=()
    [ "${LLAMACPP:-0}" = 1 ] && llama_args=(--llamacpp /tmp/llama.cpp/build/bin)  # waits for the build
    [ -n "${REQUANT:-}" ] && llama_args+=(--requant-streamed "$REQUANT")
    python3 tools/bench_streaming.py --rows "$STREAMING" --out "$OUT" ${STREAMING_ARGS:-} "${llama_args[@]}" 2>&1 |
        tee "$OUT/bench_streaming.log" || true
fi

if [ "${KV:-0}" = 1 ]; then
    python3 tools/bench_kv.py --out "$OUT" ${KV_ARGS:-} 2>&1 | tee "$OUT/bench_kv.log" || true
fi

if [ -n "${AB:-}" ]; then
    python3 tools/bench_ab.py --base "$AB" --out "$OUT" ${AB_MODELS:+--models "$AB_MODELS"} 2>&1 |
        tee "$OUT/bench_ab.log" || true
fi

if [ "${BENCH:-1}" = 1 ]; then
    python3 tools/bench_gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_gpu.log"
fi
