"""One attention call, dense or sparse, decided once: inputs that require grad or calls too
small for sparsity to pay run dense SDPA, the rest the Prism pipeline; traced inside a user's
``torch.compile``, the call is one opaque custom op that runs the compiled pipeline on real
tensors (the decision then made inside, on real sizes)."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from . import documents, pipeline
from ._compile import Mode, uniform_dispatch_keys
from .checks import check_flex_backend
from .config import PrismConfig

__all__ = ["attention_with_segments", "takes_dense_path", "needs_grad", "FIT_DOCUMENTS_ERROR"]

FIT_DOCUMENTS_ERROR = (
    "PrismConfig.output_error (the threshold fit) does not support key_padding_mask, "
    "document_ids or cu_seqlens yet: set output_error=None (fixed thresholds) for padded or "
    "packed calls"
)


def attention_with_segments(q, k, v, config, scale, return_density, compiled, segments):
    """:func:`prism_attention` of checked inputs with padding/documents already in their
    internal form (``None``: none), e.g. made once per forward by an integration."""
    if segments is not None and config.output_error is not None:
        raise NotImplementedError(FIT_DOCUMENTS_ERROR)
    mode = Mode.at_entry(compiled)
    if needs_grad(q, k, v) and mode is not Mode.TRACED:
        warnings.warn(
            "prism_attention is inference only: inputs that require grad run dense "
            "attention (exact, differentiable, no speed-up). For sparse prefill call the "
            "model under torch.inference_mode() or torch.no_grad().",
            stacklevel=3,
        )
    if mode is Mode.TRACED and not needs_grad(q, k, v):
        # The size rule is decided inside the op, on real sizes (no guard in the user's graph).
        if segments is None:
            out, density = _prism_op(q, k, v, config.to_json(), scale)
        else:
            out, density = _prism_documents_op(
                q, k, v, config.to_json(), scale, segments.ids, segments.padded
            )
        return (out, density) if return_density else out
    out, density = _run(q, k, v, config, scale, mode, segments, density=return_density)
    return (out, density) if return_density else out


def takes_dense_path(q: Tensor, k: Tensor, v: Tensor, config: PrismConfig) -> bool:
    """Whether :func:`prism_attention` runs dense attention for these inputs (eager calls):
    inputs that require grad with grad enabled, or a call too small for sparsity to pay
    (:meth:`PrismConfig.runs_dense`). Host-side: no tensor is read."""
    return needs_grad(q, k, v) or config.runs_dense(q.shape, k.shape[2])


def needs_grad(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _run(q, k, v, config, scale, mode, segments=None, *, density: bool = True):
    """``(out, density)``: dense attention (differentiable) where :func:`takes_dense_path`,
    else the Prism pipeline on detached inputs. On the dense path the density (all ones) is
    made only with ``density=True`` (else ``None``): the dense path is most of the calls of
    short prompts, whose forward is host-bound."""
    if takes_dense_path(q, k, v, config):
        out = pipeline.dense_attention(q, k, v, scale, mode, segments)
        ones = torch.ones(q.shape[:2], dtype=torch.float32, device=q.device) if density else None
        return out, ones
    return _sparse(q.detach(), k.detach(), v.detach(), config, scale, mode, segments)


@uniform_dispatch_keys
@torch.no_grad()
def _sparse(q, k, v, config, scale, mode, segments=None):
    check_flex_backend(config, q.device, mode is not Mode.EAGER)
    if mode is not Mode.COMPILED or q.shape[0] == 1:
        return pipeline.prism_forward(q, k, v, config, scale, mode, segments)
    # Compiled, a batch runs row by row. Why: dynamo specialises a size of 1, so batch 1 (the
    # usual first call) compiled every stage again at the first batch of 2; one row at a time,
    # one compilation (and one set of CUDA graphs) serves every batch size. The rows are
    # independent, so the result is the same; the cost is a launch sequence per row, small
    # where sparsity pays (long rows), and an output copy. With documents, every row takes
    # the batch's largest document count (counted once).
    if segments is not None:
        segments = segments._replace(num_docs=documents.count_documents(segments))
    rows = [
        pipeline.prism_forward(
            q[i : i + 1],
            k[i : i + 1],
            v[i : i + 1],
            config,
            scale,
            mode,
            None if segments is None else segments._replace(ids=segments.ids[i : i + 1]),
        )
        for i in range(q.shape[0])
    ]
    return torch.cat([out for out, _ in rows]), torch.cat([density for _, density in rows])


# Traced inline into a user's compiled model, FlexAttention with a mask computed in the same
# graph trips several bugs of torch's inductor (torch 2.11 and 2.13): on CPU, an elementwise
# op fused onto its output ("Unsupported for epilogue_nodes in CppFlexAttentionTemplate"), a
# tensor or symbolic ``kv_len - q_len`` captured by the ``mask_mod`` ("NoValidChoicesError"),
# a query that is a view of a 2-d buffer; on CUDA, "CantSplit" in the Triton code generation
# when K/V are slices of a KV cache written in the graph. Behind a custom op (the public
# extension point, ``torch.library.custom_op``) the user's graph sees one opaque call, and
# the op runs our compiled pipeline on real tensors, as in eager use. The config crosses the
# op boundary once, as its JSON form (``PrismConfig.to_json``).
@torch.library.custom_op("prism_flex::prism_attention", mutates_args=())
def _prism_op(
    q: Tensor, k: Tensor, v: Tensor, config_json: str, scale: Optional[float]
) -> tuple[Tensor, Tensor]:
    config = PrismConfig.from_json(config_json)
    out, density = _run(q, k, v, config, scale, Mode.COMPILED)
    # Contiguous, as the fake below promises (flex_attention's output follows q's strides).
    return out.contiguous(), density


@_prism_op.register_fake
def _(q, k, v, config_json, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        q.shape[:2], dtype=torch.float32
    )


# The same op with padding/documents: the per-token ids cross the boundary as a tensor (the
# internal form, ``documents.Segments.ids``), the number of documents is counted inside on
# real tensors.
@torch.library.custom_op("prism_flex::prism_attention_documents", mutates_args=())
def _prism_documents_op(
    q: Tensor, k: Tensor, v: Tensor, config_json: str, scale: Optional[float], ids: Tensor,
    padded: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    config = PrismConfig.from_json(config_json)
    segments = documents.Segments(ids, None, padded)
    out, density = _run(q, k, v, config, scale, Mode.COMPILED, segments)
    return out.contiguous(), density


@_prism_documents_op.register_fake
def _(q, k, v, config_json, scale, ids, padded):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        q.shape[:2], dtype=torch.float32
    )
