import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from prism_flex import PrismConfig, score_inputs
from prism_flex import testing as ref
from prism_flex.scoring import band, block_softmax, causal_block_geometry, pool_blocks

from .conftest import structured_qkv

lengths = st.sampled_from([1, 2, 97, 127, 128, 129, 255, 256, 300, 1025]) | st.integers(1, 1200)


@given(
    length=lengths, block=st.sampled_from([16, 32, 128]), b=st.integers(1, 2), h=st.integers(1, 3)
)
def test_pool_matches_reference_including_tail(length, block, b, h):
    x = torch.randn(b, h, length, 8, dtype=torch.float64)
    got = pool_blocks(x, block)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref.pool(x, block), rtol=1e-6, atol=1e-6)


def test_pool_bf16_accumulates_in_fp32():
    x = torch.full((1, 1, 1000, 4), 1.0 + 2**-7, dtype=torch.bfloat16)
    assert torch.all(pool_blocks(x, 128) == 1.0 + 2**-7)


def _rope(x, layout, base=10000.0):
    """Plain RoPE of ``x`` (B, H, L, D) in the given layout, written independently here."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    ang = torch.arange(x.shape[2], dtype=torch.float64)[:, None] * theta
    cos, sin = ang.cos(), ang.sin()
    if layout == "half":
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out


@given(
    layout=st.sampled_from(["half", "interleaved"]),
    d=st.sampled_from([8, 16, 64, 128]),
    data=st.data(),
)
def test_bands_pick_highest_and_lowest_frequency_pairs(layout, d, data):
    dims = data.draw(st.integers(1, d // 2)) * 2
    # Rotate each basis vector e_i by RoPE at position 1: the part left in dim i is
    # cos(theta_i), smaller for faster-rotating dims. Measured this way, independently of
    # how the package names pairs, the high band must be the `dims` fastest dims and the low
    # band the `dims` slowest.
    eye = torch.eye(d, dtype=torch.float64)
    rotated = _rope(torch.stack([torch.zeros(d, d, dtype=torch.float64), eye], dim=1)[None], layout)
    cos_theta = rotated[0, :, 1].diagonal()
    by_speed = torch.argsort(cos_theta, stable=True).tolist()  # fastest first
    marker = torch.arange(d, dtype=torch.float64)
    high = sorted(band(marker, dims, "high", layout).long().tolist())
    low = sorted(band(marker, dims, "low", layout).long().tolist())
    assert high == sorted(by_speed[:dims])
    assert low == sorted(by_speed[d - dims :])


def _scores(q, k, config):
    return score_inputs(q, k, config)


@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 2),
    group=st.sampled_from([1, 2, 7]),
    lkv=st.integers(1, 900),
    data=st.data(),
    calibrate=st.booleans(),
    layout=st.sampled_from(["half", "interleaved"]),
)
def test_band_probabilities_match_reference(b, hkv, group, lkv, data, calibrate, layout):
    lq = data.draw(st.integers(1, lkv))
    cfg = PrismConfig(
        calibrate=calibrate,
        rope_layout=layout,
        high_temperature=0.7,
        low_temperature=1.3,
        block_size=32,
    )
    q, k, _ = structured_qkv(b, hkv * group, hkv, lq, lkv, 32, seed=lkv, block_size=32)
    s = _scores(q, k, cfg)
    r = ref.band_probs(q, k, cfg)
    nq, nk = r["allowed"].shape
    allowed, diagonal = causal_block_geometry(0, nq, nk, lq, lkv, 32, q.device)
    assert torch.equal(allowed, r["allowed"]) and torch.equal(diagonal, r["diagonal"])
    for which, dims in zip(("high", "low"), cfg.band_dims(32)):
        torch.testing.assert_close(
            getattr(s, f"div_{which}").double(),
            math.sqrt(dims) * r[f"t_{which}"],
            rtol=1e-5,
            atol=0,
        )
        logits = (
            torch.matmul(
                getattr(s, f"q_{which}").reshape(b, hkv, group * nq, dims),
                getattr(s, f"k_{which}").transpose(-1, -2),
            ).view(b, hkv * group, nq, nk)
            / getattr(s, f"div_{which}")[..., None, None]
        )
        probs = block_softmax(logits, allowed)
        torch.testing.assert_close(probs.double(), r[f"probs_{which}"], rtol=1e-4, atol=1e-6)


@given(
    scale_q=st.floats(1e-3, 1e3),
    scale_k=st.floats(1e-3, 1e3),
    seed=st.integers(0, 100),
    layout=st.sampled_from(["half", "interleaved"]),
)
def test_calibrated_temperature_is_invariant_to_scaling_q_or_k(scale_q, scale_k, seed, layout):
    cfg = PrismConfig(rope_layout=layout)
    q, k, _ = structured_qkv(1, 4, 2, 500, 700, 64, seed=seed)
    base = _scores(q, k, cfg)
    scaled = _scores(q * scale_q, k * scale_k, cfg)
    for which in ("high", "low"):
        torch.testing.assert_close(
            getattr(scaled, f"div_{which}"), getattr(base, f"div_{which}"), rtol=1e-4, atol=0
        )


def test_zero_inputs_give_finite_uniform_probabilities():
    q = torch.zeros(1, 2, 600, 64)
    k = torch.zeros(1, 2, 600, 64)
    s = _scores(q, k, PrismConfig())
    for which in ("high", "low"):
        assert torch.isfinite(getattr(s, f"div_{which}")).all()


def test_geometry_bottom_right_unaligned_offset():
    # Lq=130, Lkv=200, block 128: query block 0 holds positions 70..197 -> key blocks 0 and 1,
    # both diagonal; query block 1 holds positions 198..199 -> key block 1.
    allowed, diagonal = causal_block_geometry(0, 2, 2, 130, 200, 128, "cpu")
    assert allowed.tolist() == [[True, True], [True, True]]
    assert diagonal.tolist() == [[True, True], [False, True]]
    r_allowed, r_diag = ref.causal_blocks(130, 200, 128)
    assert torch.equal(allowed, r_allowed) and torch.equal(diagonal, r_diag)
