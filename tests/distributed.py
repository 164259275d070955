"""Run a test body on several CPU ranks (gloo), with a deadline.

``spawn(fn, world_size, *args)`` starts ``world_size`` processes (``torch.multiprocessing``,
start method ``spawn``), each of which joins a gloo process group on a free local port and calls
``fn(rank, world_size, *args)``; ``fn`` must be a module-level function (it is pickled by
name). A rank that raises fails the test with its traceback; ranks still running after
``timeout`` seconds (a hung collective) are killed and the test fails, instead of hanging CI.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, timeout, fn, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        # The machine's cores are shared by the ranks.
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout),
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int, *args, timeout: float = 240.0) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; raise on failure."""
    port = free_port()
    context = mp.start_processes(
        _entry,
        args=(world_size, port, timeout, fn, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.0, min(5.0, deadline - time.monotonic()))):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            for process in context.processes:
                process.join(10)
            raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in {timeout} s")
