"""End-to-end prefill under tensor parallelism (transformers ``tp_plan="auto"``): SDPA vs Prism.

Run under torchrun on one multi-GPU host::

    torchrun --nproc-per-node 2 -m bench.tp_prefill --model-path /path/to/model_dir \\
        --lengths 32768 65536 131072 --out bench/results/h200x2_tp_prefill.json

``--model-path``: a transformers checkpoint directory (``save_pretrained`` layout), or with
``--gguf-file NAME`` a directory holding that GGUF file (as ``from_pretrained(path,
gguf_file=NAME)`` takes it). Per method (``sdpa``; ``prism``: ``register(PrismConfig())``,
compiled unless ``--eager``) the model is loaded with ``tp_plan="auto"``; per length one
untimed forward, then ``--reps`` timed forwards of batch 1 under ``torch.inference_mode()``
(random token ids, seed ``--seed``; ``logits_to_keep=1``), median seconds from a common
barrier, with every rank's peak memory; Prism's block density from one more forward inside
``record_density``. Rank 0 writes the JSON (device, torch, transformers, date, world size).
The CPU smoke test (gloo, a tiny model) is in tests/test_tensor_parallel.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--methods", nargs="+", default=["sdpa", "prism"], choices=["sdpa", "prism"])
    p.add_argument("--config", nargs="*", default=[], help="PrismConfig FIELD=VALUE overrides")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--eager", action="store_true", help="Prism with compiled=False (CPU smoke)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import transformers
    from transformers import AutoModelForCausalLM

    from prism_flex import PrismConfig
    from prism_flex.integrations.transformers import record_density, register

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if cuda else None
    if cuda:
        torch.cuda.set_device(device)
    config = PrismConfig.from_fields(args.config)
    names = {"sdpa": "sdpa", "prism": register(config, "prism_tp_bench", compiled=not args.eager)}
    result = dict(
        what="end-to-end prefill under tensor parallelism (tp_plan='auto'): seconds (median) "
        "and peak GiB per rank",
        device=torch.cuda.get_device_name(device) if cuda else platform.machine(),
        world_size=world,
        torch=torch.__version__,
        transformers=transformers.__version__,
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        model=args.model_path + (f" ({args.gguf_file})" if args.gguf_file else ""),
        config=json.loads(config.to_json()),
        inputs=f"random token ids, seed {args.seed}",
        rows=[],
    )

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    for method in args.methods:
        kwargs = dict(tp_plan="auto", attn_implementation=names[method])
        kwargs["dtype"] = getattr(torch, args.dtype)
        if args.gguf_file:
            kwargs["gguf_file"] = args.gguf_file
        model = AutoModelForCausalLM.from_pretrained(args.model_path, **kwargs).eval()
        vocab = model.config.vocab_size
        for length in args.lengths:
            gen = torch.Generator().manual_seed(args.seed)
            ids = torch.randint(1, vocab, (1, length), generator=gen)
            ids = ids.to(model.device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            with torch.inference_mode():
                for i in range(args.reps + 1):
                    dist.barrier()
                    sync()
                    start = time.perf_counter()
                    model(ids, logits_to_keep=1)
                    sync()
                    if i:
                        times.append(time.perf_counter() - start)
                density = None
                if method == "prism":
                    with record_density() as rec:
                        model(ids, logits_to_keep=1)
                    density = round(rec.mean(), 4)
            peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if cuda else None
            row = dict(method=method, length=length, seconds=statistics.median(times), peak=peak)
            rows = [None] * world
            dist.all_gather_object(rows, row)
            if rank == 0:
                merged = dict(method=method, length=length, density=density)
                merged["seconds"] = [r["seconds"] for r in rows]
                merged["peak_gib"] = [r["peak"] for r in rows]
                result["rows"].append(merged)
                print(json.dumps(merged), flush=True)
                if args.out:
                    with open(args.out, "w") as f:
                        json.dump(result, f, indent=1)
        del model
    dist.barrier()


if __name__ == "__main__":
    main()
