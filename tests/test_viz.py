"""prism_flex.viz: block tables and densities of a mask; plots when matplotlib is installed."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from prism_flex import PrismConfig, block_density, prism_block_mask
from prism_flex.viz import (
    block_table,
    causal_block_table,
    head_density,
    plot_block_mask,
    plot_head_density,
)

CONFIG = PrismConfig(
    dense_below=0, sparse_min_flops=0, block_size=16, high_threshold=0.8, low_threshold=0.8
)


def _prism_mask(q_len=128, kv_len=128):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, q_len, 32, generator=g)
    k = torch.randn(2, 2, kv_len, 32, generator=g)
    return prism_block_mask(q, k, CONFIG, compiled=False)


def _shared_causal_mask(q_len=64, kv_len=96):
    offset = kv_len - q_len
    return create_block_mask(
        lambda b, h, q, k: q + offset >= k, None, None, q_len, kv_len, device="cpu", BLOCK_SIZE=16
    )


def test_table_is_the_dense_slice():
    mask = _prism_mask()
    dense = mask.to_dense()
    for b, h in [(0, 0), (1, 3), (0, 2)]:
        table = block_table(mask, batch=b, head=h)
        assert table.dtype == torch.bool and table.shape == dense.shape[-2:]
        assert torch.equal(table, dense[b, h].bool())


def test_density_matches_block_density():
    mask = _prism_mask()
    density = head_density(mask)
    assert density.shape == (2, 4)
    assert torch.equal(density, block_density(mask))
    # The table agrees: computed blocks over causally visible ones.
    visible = causal_block_table(mask)
    table = block_table(mask, 1, 2)
    assert not bool((table & ~visible).any())
    assert float(density[1, 2]) == pytest.approx(float(table.sum() / visible.sum()))


def test_causal_table_bottom_right_and_broadcast():
    mask = _shared_causal_mask(64, 96)  # one mask for every batch and head
    visible = causal_block_table(mask)
    assert torch.equal(visible, block_table(mask))
    # Broadcast size-1 dims, as FlexAttention does.
    assert torch.equal(block_table(mask, batch=5, head=7), visible)
    assert visible.shape == (4, 6)
    assert visible[0].tolist() == [True, True, True, False, False, False]
    assert float(head_density(mask)[0, 0]) == 1.0


def test_bad_index_says_the_range():
    mask = _prism_mask()
    with pytest.raises(IndexError, match="head < 4"):
        block_table(mask, head=4)
    with pytest.raises(ValueError, match="batch"):
        block_table(mask, batch=-1)


def test_missing_matplotlib_names_the_extra(monkeypatch):
    for name in ("matplotlib", "matplotlib.pyplot", "matplotlib.colors"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'prism_flex\[plot\]'"):
        plot_block_mask(_prism_mask())
    with pytest.raises(ImportError, match=r"pip install 'prism_flex\[plot\]'"):
        plot_head_density(_prism_mask())


def test_not_imported_by_the_package():
    code = (
        "import sys, prism_flex; "
        "assert 'prism_flex.viz' not in sys.modules and 'matplotlib' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture
def plt():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib import pyplot

    yield pyplot
    pyplot.close("all")


def test_plot_block_mask(plt):
    mask = _prism_mask()
    ax = plot_block_mask(mask, batch=1, head=2)
    image = ax.images[0].get_array()
    assert image.shape == tuple(block_table(mask).shape)
    # 2 where computed, 1 where visible but skipped, 0 above the diagonal.
    want = causal_block_table(mask).long() + block_table(mask, 1, 2).long()
    assert image.tolist() == want.tolist()
    assert "density" in ax.get_title()
    _, given = plt.subplots()
    assert plot_block_mask(mask, ax=given) is given


def test_plot_head_density(plt):
    mask = _prism_mask()
    ax = plot_head_density(mask)
    image = ax.images[0].get_array()
    assert image.shape == (2, 4)
    assert torch.allclose(torch.as_tensor(image.tolist()), head_density(mask))
    ax.figure.canvas.draw()  # renders with Agg
