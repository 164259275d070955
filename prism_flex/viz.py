"""Look at a block mask: which (query block, key block) pairs a Prism mask computes, per head.

Not imported by ``import prism_flex``. The tables need only torch; the plots need matplotlib,
imported when a plot is made (``pip install 'prism_flex[plot]'``)::

    from prism_flex import prism_block_mask
    from prism_flex.viz import plot_block_mask, plot_head_density

    mask = prism_block_mask(q, k, config)          # q (B, Hq, Lq, D), k (B, Hkv, Lkv, D)
    plot_block_mask(mask, batch=0, head=3)
    plot_head_density(mask)
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .attention import block_density

__all__ = [
    "head_density",
    "block_table",
    "causal_block_table",
    "plot_block_mask",
    "plot_head_density",
]

PLOT_INSTALL_HINT = "plotting needs matplotlib: pip install 'prism_flex[plot]' (or matplotlib)"


def head_density(block_mask: BlockMask) -> Tensor:
    """Share of the causally visible blocks each (sequence, head) computes.

    Returns:
        float32 ``(B, H)`` (``H`` = the mask's heads: 1 for a mask shared by all heads), as
        :func:`prism_flex.block_density`.
    """
    return block_density(block_mask)


def block_table(block_mask: BlockMask, batch: int = 0, head: int = 0) -> Tensor:
    """Which blocks one (sequence, head) computes.

    Returns:
        bool ``(Nq, Nk)``: ``[i, j]`` is whether query block ``i`` attends key block ``j``
        (partial or full block), from ``block_mask.to_dense()``. A mask dimension of size 1
        (one mask shared by all heads or sequences) answers every index, as in FlexAttention.
    """
    b, h = _index(block_mask, batch, head)
    return block_mask.to_dense()[b, h].bool()


def causal_block_table(block_mask: BlockMask) -> Tensor:
    """The blocks causal attention can see at all (what a dense causal call computes).

    Bottom-right aligned, as Prism: the queries are the last ``Lq`` of ``Lkv`` positions.

    Returns:
        bool ``(Nq, Nk)``, ``Nk`` the columns of :func:`block_table`.
    """
    q_len, kv_len = block_mask.seq_lengths
    q_bs, kv_bs = block_mask.BLOCK_SIZE
    num_q, num_k = block_mask.to_dense().shape[-2:]
    device = block_mask.kv_num_blocks.device
    rows = torch.arange(num_q, device=device)
    # The last (newest) query of each row block sets how far right the row can see.
    last = torch.clamp((rows + 1) * q_bs, max=q_len) - 1 + (kv_len - q_len)
    first_key = torch.arange(num_k, device=device) * kv_bs
    return first_key[None, :] <= last[:, None]


def plot_block_mask(block_mask: BlockMask, batch: int = 0, head: int = 0, ax=None):
    """Draw one (sequence, head) of a mask: computed, skipped and causally hidden blocks.

    Args:
        block_mask: e.g. from :func:`prism_flex.prism_block_mask`.
        batch, head: which sequence and head (see :func:`block_table`).
        ax: a matplotlib ``Axes`` to draw on; ``None``: a new figure.
    Returns:
        the ``Axes``.
    """
    plt, colors = _matplotlib()
    table = block_table(block_mask, batch, head)
    visible = causal_block_table(block_mask)
    # 0: above the causal diagonal (never computed), 1: visible but skipped, 2: computed.
    codes = (visible.long() + (table & visible).long()).cpu().numpy()
    if ax is None:
        _, ax = plt.subplots()
    cmap = colors.ListedColormap(["white", "lightgrey", "tab:blue"])
    ax.imshow(codes, cmap=cmap, vmin=0, vmax=2, interpolation="nearest", aspect="auto")
    b, h = _index(block_mask, batch, head)
    density = float(head_density(block_mask)[b, h])
    ax.set_title(f"batch {batch}, head {head}: density {density:.3f}")
    ax.set_xlabel(f"key block ({block_mask.BLOCK_SIZE[1]} tokens)")
    ax.set_ylabel(f"query block ({block_mask.BLOCK_SIZE[0]} tokens)")
    return ax


def plot_head_density(block_mask: BlockMask, ax=None):
    """Draw the density of every (sequence, head) as a heat map, 0 to 1.

    Args:
        block_mask: e.g. from :func:`prism_flex.prism_block_mask`.
        ax: a matplotlib ``Axes`` to draw on; ``None``: a new figure.
    Returns:
        the ``Axes``.
    """
    plt, _ = _matplotlib()
    density = head_density(block_mask).cpu().numpy()  # (B, H)
    if ax is None:
        _, ax = plt.subplots()
    image = ax.imshow(
        density, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest", aspect="auto"
    )
    ax.figure.colorbar(image, ax=ax, label="block density")
    ax.set_xlabel("head")
    ax.set_ylabel("sequence")
    ax.set_title(f"mean density {float(density.mean()):.3f}")
    return ax


def _index(block_mask: BlockMask, batch: int, head: int) -> tuple[int, int]:
    """``(batch, head)`` as indices into the mask, size-1 dimensions broadcast."""
    num_b, num_h = block_mask.kv_num_blocks.shape[:2]
    for name, value, size in (("batch", batch, num_b), ("head", head, num_h)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if size != 1 and value >= size:
            raise IndexError(
                f"{name}={value} is out of range: the mask has {size} (pass {name} < {size})"
            )
    return (0 if num_b == 1 else batch), (0 if num_h == 1 else head)


def _matplotlib():
    """``(pyplot, colors)``, imported here so that the tables work without matplotlib."""
    try:
        from matplotlib import colors
        from matplotlib import pyplot as plt
    except ImportError as error:
        raise ImportError(PLOT_INSTALL_HINT) from error
    return plt, colors
