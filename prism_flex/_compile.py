"""The one place that knows about ``torch.compile``, CUDA graphs and dispatch keys.

Every stage of the pipeline (``scoring``, ``selection``, ``block_mask``, ``fit``) is a plain
function ``stage(config, *args)``. How it runs is decided once, at the public entry, as a
:class:`Mode`, and passed down:

- ``EAGER``: called as it is (tests, debugging);
- ``COMPILED``: ``torch.compile(stage, fullgraph=True, dynamic=True)``, built lazily on first
  use (importing the package compiles nothing), one compilation for every sequence length;
  on CUDA, short calls can also replay a CUDA graph of it (:class:`GraphedStage`);
- ``TRACED``: we are being traced by a ``torch.compile`` of the user's model: stages are
  called as they are and become part of that graph (attention itself then goes through the
  custom op in ``dispatch.py``).

Nothing here imports the pipeline modules: they are passed in as function objects.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import flex_attention

from .config import PrismConfig

__all__ = [
    "Mode",
    "StaticConfig",
    "run_stage",
    "compiled_flex",
    "lengths_only_dynamic",
    "uniform_dispatch_keys",
    "kernel_options",
    "GraphedStage",
]


class Mode(enum.Enum):
    """How the pipeline runs; decided by :meth:`at_entry`, never re-asked below it."""

    EAGER = "eager"
    COMPILED = "compiled"
    TRACED = "traced"

    @classmethod
    def at_entry(cls, compiled: bool) -> "Mode":
        if not compiled:
            return cls.EAGER
        return cls.TRACED if torch.compiler.is_compiling() else cls.COMPILED


class StaticConfig(torch.nn.Module):
    """A :class:`PrismConfig` that compiled stages see as constants.

    The stages compile with ``dynamic=True`` so that new lengths do not recompile, and then
    dynamo makes every int it is given a symbol, the config's too (block size, band widths,
    sample counts): kernels divided by runtime values, and on CPU inductor's simplification
    of the index expressions dominated the threshold fit's compile (122 s -> 55 s at 700
    tokens on 2 cores with this). Integer attributes of an ``nn.Module`` are dynamo's
    exception: static. So a compiled stage receives one of these, which carries every field
    of the config as a plain attribute (the stages read ``config.block_size`` from either
    type alike); another config compiles again, as another constant should. The float fields
    are carried too but never read by a stage: thresholds and temperatures travel as
    arguments, inputs of the graph rather than constants.
    """

    def __init__(self, config: PrismConfig):
        super().__init__()
        self.config = config
        for field in dataclasses.fields(config):
            setattr(self, field.name, getattr(config, field.name))

    def band_dims(self, head_dim: int) -> tuple[int, int]:
        return self.config.band_dims(head_dim)


@functools.lru_cache(maxsize=64)
def _static(config: PrismConfig) -> StaticConfig:
    return StaticConfig(config)


def _shape_rules():
    """The symbolic-shape rules our compiled calls trace and run under (a context manager).

    Why: with dynamo's defaults, two sizes equal at the first call share one symbol ("duck
    sizing"): at ``Lq == Lkv`` the query and key block counts are equal, so the first chunk
    continuing a cache, ``Lq < Lkv``, recompiled every stage. ``use_duck_shape=False`` gives
    each size its own symbol. Patched for our calls only and restored on exit (the user's own
    compiles keep torch's defaults); the option exists in torch 2.11 and later. (A size of 1
    is still specialised, so compiled batches run row by row: ``dispatch._sparse``.)
    """
    from torch.fx.experimental import _config as shape_config

    return shape_config.patch(use_duck_shape=False)


def _with_shape_rules(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with _shape_rules():
            return fn(*args, **kwargs)

    return call


@functools.lru_cache(maxsize=None)
def _compiled(stage: Callable) -> Callable:
    """``stage`` compiled, built on first use. One cache entry per function object: each
    stage has its own code object, hence its own dynamo cache and recompile limit."""
    return _with_shape_rules(torch.compile(stage, fullgraph=True, dynamic=True))


def run_stage(stage: Callable, mode: Mode, config: PrismConfig, *args):
    """``stage(config, *args)``, compiled in ``Mode.COMPILED``."""
    if mode is Mode.COMPILED:
        return _compiled(stage)(_static(config), *args)
    return stage(config, *args)


@functools.lru_cache(maxsize=None)
def compiled_flex() -> Callable:
    """The compiled ``flex_attention`` (``dynamic=True``, :func:`_shape_rules`), built on
    first use."""
    return _with_shape_rules(torch.compile(flex_attention, fullgraph=True, dynamic=True))


def lengths_only_dynamic(*tensors: Tensor, head_dim: bool = True) -> tuple[Tensor, ...]:
    """``(B, H, ...)`` tensors whose head count (dim 1) and, with ``head_dim``, last dim (head
    dim, band dims) of 4-dim tensors our compiled stages treat as constants; batch and
    lengths stay dynamic.

    Why: with ``dynamic=True`` every size is symbolic, and dynamo's duck sizing assumes that
    sizes equal at the first call stay equal (Qwen2.5 at 8K tokens: 64 key blocks and head
    dim 64), so the next length recompiled. New tensor objects (``detach``: same storage, no
    view base for dynamo to track), so that the marks never touch a caller's tensor. Only for
    ``Mode.COMPILED`` (in a user's graph, marks would specialise their graph), never for
    tensors that require grad (detaching them would cut the graph).
    """
    out = []
    for t in tensors:
        if t is None or t.requires_grad:
            out.append(t)
            continue
        t = t.detach()
        torch._dynamo.mark_static(t, 1)
        if head_dim and t.dim() == 4:
            torch._dynamo.mark_static(t, 3)
        out.append(t)
    return tuple(out)


def uniform_dispatch_keys(fn):
    """Run ``fn`` below the autograd and ADInplaceOrView dispatch keys (not while a compile
    of the user's model traces it).

    Why: our compiled stages guard on the dispatch keys of their inputs as the thread-local
    state shows them, and that state differs between a plain call, a call under
    ``torch.inference_mode()`` or with inference tensors (which lack ADInplaceOrView), and
    the first run of our custom op inside a user's compiled graph (AOTAutograd's aliasing
    check runs it in a dispatch mode that excludes ADInplaceOrView): each difference compiled
    every stage once more. Below those keys all of them look the same. Only for the
    inference path: the caller has checked that no input requires grad.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        with torch._C._AutoDispatchBelowADInplaceOrView():
            return fn(*args, **kwargs)

    return wrapper


def kernel_options(device: torch.device, backend: str = "triton") -> Optional[dict]:
    """FlexAttention ``kernel_options`` for ``device`` and ``PrismConfig.flex_backend``.

    ``"triton"``: on Hopper (sm90+) loads through TMA. Measured on the H200 at 128K tokens
    (bench/results/h200_tune.json): ``USE_TMA`` made the sparse kernel 4-9 % faster with
    bit-identical outputs; tile sizes, warps and stages other than the defaults were slower
    or equal, and ``PRESCALE_QK`` (a further ~4 %) changes the rounding, so it is left off.
    Elsewhere: the defaults. ``"flash"``: FlashAttention-4's kernel (the caller has run
    ``checks.check_flex_backend``).
    """
    if backend == "flash":
        return {"BACKEND": "FLASH"}
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return dict(_cuda_options(index))


@functools.lru_cache(maxsize=None)
def _cuda_options(index: int) -> tuple:
    major, _ = torch.cuda.get_device_capability(index)
    return (("USE_TMA", True),) if major >= 9 else ()


class GraphedStage:
    """CUDA-graph replay of a compiled stage, per call signature (config, sizes, scalars).

    Why: below ~32K tokens the selection's GPU work is a few hundred microseconds, and a
    compiled call costs more than that on the host (dynamo's guards, inductor's wrapper,
    ~40 kernel launches). A replay is one launch. A signature is captured the second time it
    is seen (a model calls each layer with the same sizes, so a prompt captures once at its
    second layer and replays at every later one; a length seen once never pays the capture),
    and at most ``max_graphs`` are kept (least recently used first out, freeing their memory).

    Each call copies its tensor arguments into the graph's static inputs and returns *copies*
    of the graph's outputs: a later replay overwrites the graph's own buffers, and a caller
    may keep a ``BlockMask`` across calls. Not thread-safe (one Python thread drives a GPU
    stream here, as in a model's forward). Not used while a CUDA stream is being captured
    (the user's own graph, e.g. ``mode="reduce-overhead"``).
    """

    def __init__(
        self,
        stage: Callable,
        max_graphs: int = 8,
        compile_stage: bool = True,
        clone_outputs: bool = True,
    ):
        self.stage = stage
        self.max_graphs = max_graphs
        # False: ``stage`` is a Python function that runs compiled stages of its own (the
        # selection of a packed row's documents, one stage call per document).
        self.compile_stage = compile_stage
        # False: the graph's own output buffers are returned, for a caller that consumes
        # them on the current stream before its next call (a later replay, stream-ordered
        # after that use, then overwrites them safely).
        self.clone_outputs = clone_outputs
        self._graphs: collections.OrderedDict = collections.OrderedDict()
        # Signatures seen once, most recent last; bounded like the graphs (a server sees a
        # new prompt length at almost every call).
        self._seen: collections.OrderedDict = collections.OrderedDict()
        self._pool = None

    def __call__(self, config: PrismConfig, *args):
        if torch.cuda.is_current_stream_capturing():
            return self._run(config, args)
        key = (config,) + tuple(
            (a.shape, a.stride(), a.dtype, a.device) if isinstance(a, Tensor) else a for a in args
        )
        entry = self._graphs.get(key)
        if entry is None:
            if key not in self._seen:
                self._seen[key] = None
                while len(self._seen) > 64 * self.max_graphs:
                    self._seen.popitem(last=False)
                return self._run(config, args)
            entry = self._capture(config, args)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        graph, inputs, outputs = entry
        for dst, src in zip(inputs, args):
            if isinstance(dst, Tensor):
                dst.copy_(src)
        graph.replay()
        if not self.clone_outputs:
            return outputs
        return type(outputs)(*(t.clone() for t in outputs))

    def _capture(self, config: PrismConfig, args: tuple):
        inputs = tuple(_static_copy(a) if isinstance(a, Tensor) else a for a in args)
        # Warm up on a side stream (compiles, autotunes, allocates), as CUDA graphs require.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run(config, inputs)
        torch.cuda.current_stream().wait_stream(side)
        # One memory pool for all our graphs: they never run concurrently, and each call
        # copies its outputs out before another graph can reuse their memory.
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = self._run(config, inputs)
        return graph, inputs, outputs

    def _run(self, config: PrismConfig, args: tuple):
        if self.compile_stage:
            return run_stage(self.stage, Mode.COMPILED, config, *args)
        return self.stage(config, *args)


def _static_copy(t: Tensor) -> Tensor:
    """A copy of ``t`` with its dims marked static as ``t``'s are (``lengths_only_dynamic``):
    without the marks, the capture's compile would see other guards and compile once more."""
    copy = t.clone()
    for dim in getattr(t, "_dynamo_static_indices", ()):
        torch._dynamo.mark_static(copy, dim)
    return copy
