"""Bad input gets a clear error, never a crash deep inside a kernel."""

import pytest
import torch

from prism_flex import PrismAttention, PrismConfig, prism_attention, prism_block_mask


def qkv(b=1, hq=4, hkv=2, lq=256, lkv=256, d=64, dtype=torch.float32):
    return (
        torch.randn(b, hq, lq, d, dtype=dtype),
        torch.randn(b, hkv, lkv, d, dtype=dtype),
        torch.randn(b, hkv, lkv, d, dtype=dtype),
    )


def _case(name):
    q, k, v = qkv()
    cases = {
        "rank": ((q[0], k, v), ValueError, "4 dims"),
        "rank_k": ((q, k[0], v), ValueError, "4 dims"),
        "not_tensor": ((q.numpy(), k, v), TypeError, "torch.Tensor"),
        "int_dtype": ((q.long(), k.long(), v.long()), TypeError, "floating"),
        "dtype_mismatch": ((q, k.double(), v), TypeError, "same dtype"),
        "v_dtype_mismatch": ((q, k, v.half()), TypeError, "same dtype"),
        "batch": ((torch.cat([q, q]), k, v), ValueError, "batch"),
        "head_dim": ((q, k[..., :32], v), ValueError, "head_dim"),
        "v_shape": ((q, k, v[:, :, :100]), ValueError, "shape of k"),
        "gqa_ratio": ((torch.randn(1, 3, 256, 64), k, v), ValueError, "multiple"),
        "q_longer": ((torch.randn(1, 4, 300, 64), k, v), ValueError, "must not exceed"),
        "empty_q": ((q[:, :, :0], k, v), ValueError, "empty"),
        "empty_kv": ((q[:, :, :0], k[:, :, :0], v[:, :, :0]), ValueError, "empty"),
        "odd_head_dim": ((q[..., :63], k[..., :63], v[..., :63]), ValueError, "even"),
    }
    return cases[name]


CASES = [
    "rank",
    "rank_k",
    "not_tensor",
    "int_dtype",
    "dtype_mismatch",
    "v_dtype_mismatch",
    "batch",
    "head_dim",
    "v_shape",
    "gqa_ratio",
    "q_longer",
    "empty_q",
    "empty_kv",
    "odd_head_dim",
]


@pytest.mark.parametrize("name", CASES)
def test_prism_attention_rejects(name):
    args, exc, match = _case(name)
    with pytest.raises(exc, match=match):
        prism_attention(*args, PrismConfig(dense_below=0, sparse_min_flops=0))
    # The dense fallback validates too.
    with pytest.raises(exc, match=match):
        prism_attention(*args, PrismConfig(dense_below=10**9))


def test_band_too_wide_for_head_dim():
    q, k, v = qkv(d=32)
    with pytest.raises(ValueError, match="high_band_dims"):
        prism_block_mask(q, k, PrismConfig(high_band_dims=64))


def test_device_mismatch():
    q, k, v = qkv()
    meta = k.to("meta")
    with pytest.raises(ValueError, match="same device"):
        prism_attention(q, meta, v)


def test_module_rejects_non_config():
    with pytest.raises(TypeError, match="PrismConfig"):
        PrismAttention({"block_size": 128})


def test_flash_attention_layout_is_named_in_the_error():
    """(B, L, H, D) inputs, the FlashAttention layout: never a silent result along the wrong
    axis. Long sequences trip the head limit; with GQA the length check fires; both errors
    say how to transpose."""
    q = torch.randn(1, 2048, 8, 64)
    with pytest.raises(ValueError, match="transpose"):
        prism_attention(q, q, q)
    k = torch.randn(1, 2048, 2, 64)
    with pytest.raises(ValueError, match="transpose"):
        prism_attention(q, k, k)


def test_prism_block_mask_and_module_validate_too():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="4 dims"):
        prism_block_mask(q[0], k)
    with pytest.raises(ValueError, match="multiple"):
        PrismAttention()(torch.randn(1, 3, 256, 64), k, v)
    with pytest.raises(TypeError, match="PrismConfig"):
        prism_attention(q, k, v, {"high_threshold": 0.9})


def test_expanded_and_non_contiguous_inputs_give_the_contiguous_result():
    """Documented correct result: views (transposed from (B, L, H, D), K/V expanded over the
    batch) are read as they are."""
    cfg = PrismConfig(dense_below=0, sparse_min_flops=0, high_threshold=0.8, low_threshold=0.8)
    q = torch.randn(2, 256, 4, 64).transpose(1, 2)
    k = torch.randn(1, 2, 256, 64).expand(2, -1, -1, -1)
    v = torch.randn(1, 2, 256, 64).expand(2, -1, -1, -1)
    want = prism_attention(q.contiguous(), k.contiguous(), v.contiguous(), cfg, compiled=False)
    got = prism_attention(q, k, v, cfg, compiled=False)
    torch.testing.assert_close(got, want)


def test_the_fast_check_accepts_only_what_the_detailed_checks_accept(monkeypatch):
    """``check_inputs`` first tries one expression for the common case: it must never pass an
    input the detailed checks reject (nor, to stay the fast path, reject a valid one)."""
    import itertools

    from prism_flex import checks

    shapes = [(1, 4, 8, 8), (1, 2, 8, 8), (2, 4, 8, 8), (1, 4, 4, 8), (1, 4, 8, 6), (1, 3, 8, 8),
              (1, 4, 8, 7), (1, 4, 0, 8), (0, 4, 8, 8), (1, 2048, 8, 8), (1, 4, 8)]  # fmt: skip

    def detailed_accepts(q, k, v):
        with monkeypatch.context() as m:
            m.setattr(checks, "plainly_valid", lambda *a: False)
            try:
                checks.check_inputs(q, k, v)
            except (TypeError, ValueError):
                return False
            return True

    for qs, ks, vs, dtype in itertools.product(
        shapes, shapes, ["k", None, (1, 4, 8, 8)], [torch.float32, torch.bfloat16]
    ):
        q, k = torch.zeros(qs), torch.zeros(ks, dtype=dtype)
        v = k.clone() if vs == "k" else None if vs is None else torch.zeros(vs)
        assert checks.plainly_valid(q, k, v) == detailed_accepts(q, k, v), (qs, ks, vs, dtype)
    ints = torch.zeros(1, 4, 8, 8, dtype=torch.int32)
    assert not checks.plainly_valid(ints, ints, ints) and not detailed_accepts(ints, ints, ints)


FLASH = PrismConfig(dense_below=0, sparse_min_flops=0, flex_backend="flash")


def test_flex_backend_must_be_known():
    with pytest.raises(ValueError, match="flex_backend must be one of"):
        PrismConfig(flex_backend="cudnn")


@pytest.mark.parametrize("compiled", [True, False])
def test_flash_backend_refused_where_it_cannot_run(compiled):
    # No silent fallback to Triton: on CPU (and uncompiled anywhere) the FLASH kernel cannot
    # run, and the error says what to use instead.
    q, k, v = qkv()
    with pytest.raises(ValueError, match="flex_backend='triton'"):
        prism_attention(q, k, v, FLASH, compiled=compiled)


def test_flash_backend_on_the_dense_path_needs_nothing():
    # Calls that run dense never reach FlexAttention: the backend is not looked at.
    q, k, v = qkv()
    cfg = PrismConfig(flex_backend="flash")
    torch.testing.assert_close(prism_attention(q, k, v, cfg), prism_attention(q, k, v))


def test_flash_backend_names_the_missing_packages(monkeypatch):
    # On a Hopper GPU without the wheels: an ImportError that says what to install.
    from prism_flex import checks

    monkeypatch.setattr(checks, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(checks, "_missing_modules", lambda: ["flash_attn", "cutlass"])
    with pytest.raises(ImportError, match=r"prism_flex\[flash\]"):
        checks.check_flex_backend(FLASH, torch.device("cuda"), compiled=True)
    monkeypatch.setattr(checks, "_capability", lambda device: (8, 0))
    with pytest.raises(ValueError, match="capability 9.0"):
        checks.check_flex_backend(FLASH, torch.device("cuda"), compiled=True)
