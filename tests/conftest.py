"""Shared fixtures and input generators for the tests (all on CPU)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI runs a fixed, smaller set of examples so that its time is predictable.
settings.register_profile(
    "ci",
    max_examples=10,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=20,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo():
    """Each test module starts with empty compile caches: dynamo allows 8 variants of one
    compiled function per process (dtype, head dim, block size, ...), and the test modules
    together use more than that."""
    torch._dynamo.reset()
    with warnings.catch_warnings():
        # Eager flex_attention warns that it is unfused; the eager path is used on purpose.
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        yield


def structured_qkv(
    b, hq, hkv, lq, lkv, d, *, seed=0, dtype=torch.float32, block_size=128, signal=2.0
):
    """Random q/k/v whose pooled blocks are not all alike (so the block softmax is peaked).

    Gaussian noise plus one random vector per ``block_size`` tokens (scaled by ``signal``):
    mean pooling keeps that vector, which gives each block a distinct pooled direction.
    """
    g = torch.Generator().manual_seed(seed)

    def make(h, length, offset):
        n = (length + offset + block_size - 1) // block_size + 1
        per_block = torch.randn(b, h, n, d, generator=g) * signal
        tok = per_block.repeat_interleave(block_size, dim=2)[:, :, offset : offset + length]
        return (torch.randn(b, h, length, d, generator=g) + tok).to(dtype)

    # Queries sit at the end of the key sequence: give them the same block grid as the keys.
    q = make(hq, lq, lkv - lq)
    k = make(hkv, lkv, 0)
    v = torch.randn(b, hkv, lkv, d, generator=g).to(dtype)
    return q, k, v


# Rows whose reference top-p decision is within this of flipping are not compared: the fast
# path works in float32, the reference in float64.
MARGIN = 1e-5


def assert_clear_rows_equal(got, want, margin):
    """:func:`assert_tables_equal` without its flatness guard, for the threshold fit: a head
    whose fit is within ``MARGIN`` of another decision at any of its candidates (13
    thresholds x the sampled rows) is skipped whole, which on small inputs can be all of them;
    test_fit.py checks separately that fixed inputs are compared."""
    clear = margin > MARGIN
    assert torch.equal(got[clear], want[clear])


def assert_tables_equal(got, want, margin):
    """Block tables ``(B, H, Nq, Nk)`` equal on every row whose decision (reference margin
    ``(B, H, Nq)``) is not within ``MARGIN`` of flipping."""
    clear = margin > MARGIN
    assert torch.equal(got[clear], want[clear])
    assert clear.float().mean() > 0.5, "too many ambiguous rows: the test input is too flat"
