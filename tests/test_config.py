import dataclasses

import pytest

from prism_flex import PrismConfig


def test_defaults():
    c = PrismConfig()
    assert c.block_size == 128
    assert (c.high_threshold, c.low_threshold) == (0.95, 0.95)
    assert c.calibrate and c.force_sink and c.force_diagonal
    assert c.rope_layout == "half"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.block_size = 64


@pytest.mark.parametrize(
    "head_dim, expected",
    [(128, (64, 96)), (64, (32, 48)), (80, (40, 60)), (96, (48, 72)), (2, (2, 2)), (6, (4, 4))],
)
def test_default_band_dims_are_fractions_rounded_to_even(head_dim, expected):
    assert PrismConfig().band_dims(head_dim) == expected


def test_explicit_band_dims():
    assert PrismConfig(high_band_dims=16, low_band_dims=120).band_dims(128) == (16, 120)


@pytest.mark.parametrize(
    "field, value",
    [
        ("block_size", 0),
        ("block_size", 100),
        ("block_size", -128),
        ("block_size", 128.0),
        ("block_size", True),
        ("high_band_dims", 0),
        ("high_band_dims", 3),
        ("low_band_dims", -2),
        ("low_band_dims", 1.5),
        ("high_threshold", 0.0),
        ("high_threshold", 1.5),
        ("low_threshold", -0.1),
        ("low_threshold", float("nan")),
        ("low_threshold", "0.9"),
        ("high_threshold", True),
        ("high_temperature", 0.0),
        ("low_temperature", float("inf")),
        ("low_temperature", -1.0),
        ("calibrate", 1),
        ("force_sink", None),
        ("force_diagonal", "yes"),
        ("rope_layout", "neox"),
        ("rope_layout", None),
        ("dense_below", -1),
        ("dense_below", 1.0),
        ("max_score_elements", 0),
        ("dense_final_blocks", -1),
        ("dense_final_blocks", 1.0),
        ("final_block_pool", -1),
        ("final_block_pool", 48),
        ("final_block_pool", 16.0),
        ("output_error", 0.0),
        ("output_error", 1.5),
        ("output_error", "0.1"),
        ("output_error", float("nan")),
        ("output_error", True),
        ("local_blocks", -1),
        ("local_blocks", 1.0),
        ("local_blocks", True),
        ("local_blocks", None),
        ("fit_query_blocks", 0),
        ("fit_query_blocks", 2.0),
        ("fit_tokens", 0),
        ("fit_tokens", 24),
        ("fit_tokens", 32.0),
    ],
)
def test_bad_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PrismConfig(**{field: value})


def test_fit_tokens_above_block_size_only_rejected_with_the_fit_on():
    assert PrismConfig(block_size=16).fit_tokens == 32  # the default, unused: fine
    with pytest.raises(ValueError, match="fit_tokens"):
        PrismConfig(block_size=16, output_error=0.1)
    PrismConfig(block_size=16, output_error=0.1, fit_tokens=16)


@pytest.mark.parametrize("head_dim", [0, 7, 3])
def test_bad_head_dim(head_dim):
    with pytest.raises(ValueError, match="head_dim"):
        PrismConfig().band_dims(head_dim)


def test_band_wider_than_head():
    with pytest.raises(ValueError, match="low_band_dims"):
        PrismConfig(low_band_dims=96).band_dims(64)


def test_from_fields_reads_literals_and_strings():
    cfg = PrismConfig.from_fields(
        ["final_block_pool=32", "calibrate=False", "rope_layout=interleaved"], high_threshold=0.9
    )
    assert cfg == PrismConfig(
        final_block_pool=32, calibrate=False, rope_layout="interleaved", high_threshold=0.9
    )
    for bad in (["block_size"], ["no_such_field=1"], ["block_size=7"]):
        with pytest.raises(ValueError):
            PrismConfig.from_fields(bad)


def test_the_size_rule_counts_one_row():
    """A batch of rows too short to pay for the selection runs dense like one such row."""
    cfg = PrismConfig()
    one_8k = (1, 14, 8192, 64)  # Qwen2.5-0.5B heads: 1.2e11 FLOPs per row
    assert cfg.runs_dense(one_8k, 8192)
    assert cfg.runs_dense((8, 14, 8192, 64), 8192)
    assert not cfg.runs_dense((1, 32, 32768, 128), 32768)
    assert not PrismConfig(sparse_min_flops=0).runs_dense((8, 14, 8192, 64), 8192)


@pytest.mark.parametrize("name", ["accurate", "balanced", "fast"])
def test_presets_are_valid_configs(name):
    from prism_flex.config import PRESETS

    cfg = PrismConfig.preset(name)
    assert isinstance(cfg, PrismConfig)
    assert PrismConfig.from_json(cfg.to_json()) == cfg
    assert set(PRESETS) == {"accurate", "balanced", "fast"}


def test_presets_order_and_overrides():
    accurate, balanced, fast = (PrismConfig.preset(n) for n in ("accurate", "balanced", "fast"))
    assert accurate == PrismConfig()
    assert accurate.high_threshold > balanced.high_threshold > fast.high_threshold
    assert PrismConfig.preset("fast", block_size=64).block_size == 64


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="accurate.*balanced.*fast"):
        PrismConfig.preset("fastest")
