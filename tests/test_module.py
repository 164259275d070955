"""PrismAttention as a user would hold it: in an nn.Module, inside torch.compile."""

import pytest
import torch
from torch import nn

from prism_flex import PrismAttention, PrismConfig, prism_attention

from .conftest import structured_qkv

CFG = PrismConfig(dense_below=0, sparse_min_flops=0, high_threshold=0.8, low_threshold=0.8)


class TinyAttentionBlock(nn.Module):
    """A user's attention block: projections around PrismAttention (no RoPE needed here)."""

    def __init__(self, dim=128, heads=4, kv_heads=2, config=CFG):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.attn = PrismAttention(config)

    def forward(self, x):
        b, length, _ = x.shape
        q = self.q(x).view(b, length, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, length, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = self.attn(q, k, v)
        return self.o(out.transpose(1, 2).reshape(b, length, -1))


def test_module_equals_functional_and_reports_density():
    q, k, v = structured_qkv(2, 4, 2, 700, 900, 64)
    module = PrismAttention(CFG)
    out, density = module(q, k, v, return_density=True)
    torch.testing.assert_close(out, prism_attention(q, k, v, CFG))
    assert density.shape == (2, 4) and torch.all((density > 0) & (density <= 1))
    assert "high_threshold=0.8" in repr(module)
    assert list(module.parameters()) == []


def test_inside_a_compiled_user_model_equals_eager_model():
    torch.manual_seed(0)
    block = TinyAttentionBlock().eval()
    x = torch.randn(1, 600, 128) * 3
    with torch.no_grad():
        eager = block(x)
        compiled = torch.compile(block, fullgraph=True)(x)
        compiled_twice = torch.compile(lambda x: block(x) * 2, fullgraph=True, dynamic=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled_twice, eager * 2, rtol=1e-4, atol=1e-4)


def test_compiled_user_model_chunked_prefill_on_cpu():
    """Lq < Lkv inside a user's compile (fullgraph, static and dynamic shapes), with an
    elementwise op on the output: the traps of torch's CPU flex template (graph_op.py)."""
    q, k, v = structured_qkv(1, 4, 2, 300, 900, 32)
    attn = PrismAttention(CFG)
    eager = attn(q, k, v)
    for dynamic in (False, True):
        compiled = torch.compile(lambda q, k, v: attn(q, k, v) * 2, dynamic=dynamic, fullgraph=True)
        torch.testing.assert_close(compiled(q, k, v), eager * 2, rtol=1e-5, atol=1e-5)


def test_compiled_user_model_compiles_only_on_its_first_call():
    """The first run of a user's compiled graph calls our op under AOTAutograd's aliasing
    check, with another dispatch key state than later runs: our stages once compiled a second
    time on the second call (graph_op.py)."""
    counters = torch._dynamo.utils.counters
    attn = PrismAttention(CFG)
    q, k, v = structured_qkv(1, 4, 2, 500, 500, 32, seed=4)
    compiled = torch.compile(lambda q, k, v: attn(q, k, v) + 1.0, fullgraph=True)
    with torch.no_grad():
        first = compiled(q, k, v)
        graphs = counters["stats"]["unique_graphs"]
        for _ in range(2):
            torch.testing.assert_close(compiled(q, k, v), first)
    assert counters["stats"]["unique_graphs"] == graphs


def test_inputs_that_require_grad_run_dense_with_gradients_and_a_warning():
    """Inference only, but never a silently detached result: with grad enabled, inputs that
    require grad (a model in training) run dense attention, whose gradients are exact."""
    import torch.nn.functional as F

    q, k, v = structured_qkv(2, 4, 2, 700, 700, 64)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    with pytest.warns(UserWarning, match="inference only"):
        out = PrismAttention(CFG)(q, k, v)
    assert out.requires_grad
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    F.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True
    ).square().sum().backward()
    for got, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, t.grad)


def test_inputs_that_require_grad_under_no_grad_run_sparse():
    """A model called under no_grad hands over tensors that require grad: no grad is being
    recorded, so the sparse path runs."""
    q, k, v = structured_qkv(2, 4, 2, 700, 900, 64)
    with torch.no_grad():
        out = PrismAttention(CFG)(q.requires_grad_(), k.requires_grad_(), v)
    torch.testing.assert_close(out, prism_attention(q.detach(), k.detach(), v, CFG))
    assert not out.requires_grad


def test_config_crosses_the_custom_op_boundary_whole():
    """The custom op takes the config as its JSON form: non-default values of several kinds
    (float, int, str, None-able) round-trip (a value lost there would be silently ignored
    under compile)."""
    cfg = PrismConfig(
        high_threshold=0.87,
        local_blocks=2,
        output_error=0.05,
        rope_layout="interleaved",
        sparse_min_flops=0,
        high_band_dims=8,
    )
    assert PrismConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(attn_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool)),
        dict(is_causal=False),
        dict(dropout_p=0.1),
    ],
)
def test_sdpa_arguments_fail_clearly(kwargs):
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(NotImplementedError, match="PrismAttention"):
        PrismAttention(CFG)(q, q, q, **kwargs)


def test_inputs_that_require_grad_inside_a_compiled_training_graph():
    """The dense path that inputs requiring grad take is traceable with fullgraph and dynamic
    shapes (a user's compiled training step), and its gradients are SDPA's."""
    import torch.nn.functional as F

    q, k, v = (torch.randn(1, h, 64, 32, requires_grad=True) for h in (4, 2, 2))
    step = torch.compile(lambda q, k, v: prism_attention(q, k, v) * 2, dynamic=True, fullgraph=True)
    step(q, k, v).square().sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    (
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) * 2
    ).square().sum().backward()
    for g, t in zip(got, (q, k, v)):
        torch.testing.assert_close(g, t.grad)
