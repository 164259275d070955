#!/usr/bin/env bash
# Running the accuracy evaluation on a GPU machine that reaches no package registry and takes
# at most ~64 MiB per call, keeping files in /tmp between calls while the machine stays warm.
#
# Here (once):
#   python -m prism_flex.data.models slice ~/.cache/prism_flex/models/qwen2.5-coder-0.5b-instruct.gguf .xfer/qwen
#   mkdir -p .xfer/texts && cp ~/.cache/prism_flex/texts/austen/*.txt .xfer/texts/
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform any -d .whl gguf==0.19.0
#   (and torchao==0.17.0 for the float8 example; both folders are git-ignored)
# There, one call per slice while the machine stays warm, each carrying its slice:
#   bash bench/offline_gpu.sh stage            # copies whatever .xfer/ holds to /tmp/xfer
# then, carrying .whl (and the last slice and the texts):
#   bash bench/offline_gpu.sh assemble         # rebuilds the GGUF, checks its sha256, caches
#   source bench/offline_gpu.sh env            # wheels on PYTHONPATH (every later call)
#
# Wheels over a call's limit (FlashAttention-4's CuTe-DSL libraries, ~92 MB) travel the same
# way: here `split -b 45M -d -a 3 BIG.whl .xfer/whlparts/BIG.whl.part` (small wheels whole in
# .xfer/whl/), one `stage` call per part carrying it, then once, carrying .xfer/whl:
#   bash bench/offline_gpu.sh wheels           # joins the parts, installs all of them
# (FlashAttention-4 for flex's BACKEND="FLASH", with torch 2.11 + CUDA 13: flash-attn-4,
# nvidia-cutlass-dsl, nvidia-cutlass-dsl-libs-{core,base,cu13}, quack-kernels, apache-tvm-ffi,
# torch-c-dlpack-ext, einops; downloaded with the device README's `pip download` line.)
set -euo pipefail
MODEL=qwen2.5-coder-0.5b-instruct.gguf
SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
XFER=/tmp/xfer

case "${1:-}" in
stage)
    mkdir -p "$XFER"
    if [ -d .xfer/qwen ]; then cp .xfer/qwen/* "$XFER"/; fi
    if [ -d .xfer/texts ]; then mkdir -p ~/.cache/prism_flex/texts/austen && cp .xfer/texts/*.txt ~/.cache/prism_flex/texts/austen/; fi
    for d in .xfer/whl .xfer/whlparts; do
        if [ -d "$d" ]; then mkdir -p "$XFER/whl" && cp "$d"/* "$XFER/whl/"; fi
    done
    ls -la "$XFER"
    ;;
assemble)
    bash "$0" stage
    python3 -m prism_flex.data.models assemble ~/.cache/prism_flex/models/$MODEL $SHA $(ls "$XFER"/$MODEL.part* | sort)
    ;;
wheels)
    bash "$0" stage
    for first in "$XFER"/whl/*.whl.part000; do
        [ -e "$first" ] || continue
        whl="${first%.part000}"
        cat $(ls "$whl".part* | sort) > "$whl" && rm "$whl".part*
    done
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$XFER"/whl/*.whl $(ls .whl/*.whl 2>/dev/null)
    ls /tmp/site | head -40
    ;;
env)
    # sourced: install the carried wheels once per machine, put them on the path
    if [ ! -d /tmp/site ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    fi
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    # nvidia-cutlass-dsl exposes `cutlass` through a .pth file, which PYTHONPATH does not run
    if [ -d /tmp/site/nvidia_cutlass_dsl/dsl_packages ]; then
        export PYTHONPATH="/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH"
    fi
    set +euo pipefail
    ;;
*)
    echo "usage: $0 stage|assemble|wheels|env" >&2
    exit 2
    ;;
esac
