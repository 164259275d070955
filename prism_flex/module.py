"""PrismAttention: the nn.Module face of :func:`prism_flex.prism_attention`."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .attention import prism_attention
from .config import PrismConfig

__all__ = ["PrismAttention"]


class PrismAttention(nn.Module):
    """Causal attention with Prism block-sparse prefill; no parameters.

    Replace ``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` in a model with
    ``self.attn = PrismAttention(config)`` and ``self.attn(q, k, v)``. Inputs are taken after
    RoPE: q ``(B, Hq, Lq, D)``, k/v ``(B, Hkv, Lkv, D)``, ``Lq <= Lkv``. Works eagerly (the
    scoring and the attention kernels are compiled internally) and inside a model compiled
    with ``torch.compile``. Inference only.

    Padded batches and packed documents: ``self.attn(q, k, v, key_padding_mask=mask)``
    (bool ``(B, Lkv)``, True = real token), ``document_ids=ids`` (int ``(B, Lkv)``) or
    ``cu_seqlens=offsets`` (``(N + 1,)``, ``B == 1``), as :func:`prism_flex.prism_attention`.
    """

    def __init__(self, config: Optional[PrismConfig] = None, *, scale: Optional[float] = None):
        super().__init__()
        if config is not None and not isinstance(config, PrismConfig):
            raise TypeError(f"config must be a PrismConfig, got {type(config).__name__}")
        self.config = config if config is not None else PrismConfig()
        self.scale = scale

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Optional[Tensor] = None,
        dropout_p: float = 0.0,
        is_causal: bool = True,
        *,
        scale: Optional[float] = None,
        enable_gqa: bool = True,
        return_density: bool = False,
        key_padding_mask: Optional[Tensor] = None,
        document_ids: Optional[Tensor] = None,
        cu_seqlens: Optional[Tensor] = None,
    ):
        """Returns ``(B, Hq, Lq, D)``; with ``return_density`` also float32 ``(B, Hq)``.

        The arguments of ``F.scaled_dot_product_attention`` are accepted so that a call
        written for SDPA fails clearly, not with a bare ``TypeError``: ``attn_mask`` must be
        ``None`` (an arbitrary ``(Lq, Lkv)`` mask has no block structure to select from;
        padding and packed documents have their own arguments), ``dropout_p`` 0,
        ``is_causal`` True; ``scale`` overrides the module's; GQA is always on.

        ``key_padding_mask``, ``document_ids``, ``cu_seqlens``: see
        :func:`prism_flex.prism_attention` (padded query rows output zeros).
        """
        if attn_mask is not None:
            raise NotImplementedError(
                "PrismAttention takes no attn_mask (an arbitrary mask has no block structure "
                "for Prism to select from). For padding pass key_padding_mask= (bool (B, Lkv), "
                "True = real token, e.g. attention_mask.bool()); for packed sequences "
                "document_ids= (int (B, Lkv)) or cu_seqlens= ((N + 1,), B == 1); for any "
                "other mask use SDPA."
            )
        if dropout_p:
            raise NotImplementedError("PrismAttention is inference only: dropout_p must be 0")
        if not is_causal:
            raise NotImplementedError("PrismAttention is causal only: is_causal must be True")
        return prism_attention(
            q,
            k,
            v,
            self.config,
            scale=self.scale if scale is None else scale,
            return_density=return_density,
            key_padding_mask=key_padding_mask,
            document_ids=document_ids,
            cu_seqlens=cu_seqlens,
        )

    def extra_repr(self) -> str:
        return repr(self.config)
