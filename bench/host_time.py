"""Host time of one attention call, against SDPA and Hugging Face's own SDPA function.

Short prefills are bound by the host (Python): a forward of Qwen2.5-0.5B at 4K tokens spends
as long enqueueing its work as the GPU spends running it (``bench.ttft``'s ``host_ms``), so the
Python of every attention call adds to the time to first token. For each length this times,
with Qwen2.5-0.5B's heads (14 query, 2 KV, head dim 64), bf16, ``--calls`` back-to-back calls:

- ``device_us``: CUDA-event time per call (the GPU kernels);
- ``host_us``: wall time per call until the call returns, no synchronisation in between.

Rows: plain SDPA (as torch picks its backend), SDPA pinned to cuDNN and to flash, transformers'
``sdpa_attention_forward``, ``prism_attention`` and the function ``register`` installs in
transformers, the last two on their dense path (the default size rule at these lengths).

    python -m bench.host_time --out bench/results/h100_host_time.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def per_call(fn, calls: int) -> tuple[float, float]:
    """``(device us, host us)`` per call of ``fn`` over ``calls`` calls after a warm-up."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls * 1e3, host


def main(argv=None) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from prism_flex import PrismConfig, prism_attention
    from prism_flex.integrations.transformers import make_attention_function

    p = argparse.ArgumentParser(
        prog="python -m bench.host_time", description=__doc__.split("\n")[0]
    )
    p.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    class Module(torch.nn.Module):  # what transformers' attention functions read
        is_causal, layer_idx, num_key_value_groups = True, 0, 7

    module, config = Module(), PrismConfig()
    hf_prism = make_attention_function(config)
    rows = []
    with torch.inference_mode():
        for n in args.lengths:
            q = torch.randn(1, 14, n, 64, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, 2, n, 64, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)

            def sdpa():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

            def pinned(backend):
                def call():
                    with sdpa_kernel(backend):
                        return sdpa()

                return call

            cases = {
                "sdpa": sdpa,
                "sdpa_cudnn_context": pinned(SDPBackend.CUDNN_ATTENTION),
                "sdpa_flash_context": pinned(SDPBackend.FLASH_ATTENTION),
                "hf_sdpa_function": lambda: sdpa_attention_forward(
                    module, q, k, v, None, scaling=0.125
                ),
                "prism_attention": lambda: prism_attention(q, k, v, config),
                "hf_prism_function": lambda: hf_prism(module, q, k, v, None, scaling=0.125),
            }
            for name, fn in cases.items():
                device_us, host_us = per_call(fn, args.calls)
                rows.append(dict(L=n, call=name, device_us=device_us, host_us=host_us))
                print(f"L={n:>6d} {name:20s} device {device_us:8.1f} us  host {host_us:8.1f} us")
    result = dict(
        meta=dict(
            gpu=torch.cuda.get_device_name(),
            torch=torch.__version__,
            date=time.strftime("%Y-%m-%dT%H:%M:%S"),
            calls=args.calls,
        ),
        rows=rows,
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
