"""prism_flex.data.texts: the R unserializer / lazy-load reader on hand-built streams, and
load_text.

No network and no Debian package: the R serialization bytes are written here by hand.
"""

import gzip
import struct
import zlib

import pytest

from prism_flex.data import texts
from prism_flex.data.texts import (
    RFormatError,
    RVector,
    decompress_record,
    load_text,
    read_lazyload_db,
    unserialize,
)

# ---- hand-written R serialization (XDR) ---------------------------------------------------


def i32(v):
    return struct.pack(">i", v)


def header(version=3):
    h = b"X\n" + i32(version) + i32(0x040201) + i32(0x030500)
    if version == 3:
        h += i32(5) + b"UTF-8"
    return h


def charsxp(s, levels=0x40):  # 0x40 = ASCII, 0x08 = UTF-8, 0x04 = latin-1
    if s is None:
        return i32(9) + i32(-1)
    b = s.encode("latin-1" if levels & 0x04 else "utf-8")
    return i32(9 | (levels << 12)) + i32(len(b)) + b


def strsxp(items, attrs=b""):
    flags = 16 | (1 << 9 if attrs else 0)
    body = b"".join(charsxp(s, 0x08 if s and not s.isascii() else 0x40) for s in items)
    return i32(flags) + i32(len(items)) + body + attrs


def intsxp(values):
    return i32(13) + i32(len(values)) + b"".join(i32(v) for v in values)


def lglsxp(values):
    return i32(10) + i32(len(values)) + b"".join(i32(v) for v in values)


def vecsxp(items, attrs=b""):
    return i32(19 | (1 << 9 if attrs else 0)) + i32(len(items)) + b"".join(items) + attrs


NIL = i32(254)


def names_attr(names, first_use=True):
    """Attribute pairlist ``names = c(...)``; the 'names' symbol is written once, then as REFSXP."""
    sym = i32(1) + charsxp("names") if first_use else i32((1 << 8) | 255)  # REFSXP, index 1
    return i32(2 | (1 << 10)) + sym + strsxp(names) + NIL


def make_db(tmp_path, objects, compressed=1, gzip_rdx=True):
    """Write ``objects`` ({name: serialized bytes}) as ``db.rdb`` / ``db.rdx``."""
    rdb, variables = b"", []
    for payload in objects.values():
        if compressed == 1:
            rec = struct.pack(">I", len(payload)) + zlib.compress(payload)
        else:
            rec = struct.pack(">I", len(payload)) + b"0" + payload  # type byte '0': stored
        variables.append(intsxp([len(rdb), len(rec)]))
        rdb += rec
    index = header() + vecsxp(
        [
            vecsxp(variables, names_attr(list(objects))),
            vecsxp([], names_attr([], first_use=False)),
            lglsxp([1]) if compressed == 1 else intsxp([compressed]),
        ],
        names_attr(["variables", "references", "compressed"], first_use=False),
    )
    (tmp_path / "db.rdb").write_bytes(rdb)
    rdx = gzip.compress(index) if gzip_rdx else struct.pack(">I", len(index)) + zlib.compress(index)
    (tmp_path / "db.rdx").write_bytes(rdx)
    return tmp_path / "db.rdb", tmp_path / "db.rdx"


# ---- tests ----------------------------------------------------------------------------------


def test_unserialize_strsxp_with_na_and_names():
    for version in (2, 3):
        obj = unserialize(
            header(version)
            + strsxp(["It is a truth", None, "universally £"], names_attr(["a", "b", "c"]))
        )
        assert isinstance(obj, RVector) and obj.rtype == 16
        assert list(obj) == ["It is a truth", None, "universally £"]
        assert obj.names == ["a", "b", "c"]
        assert obj.as_dict()["b"] is None


def test_unserialize_latin1_int_lgl_real():
    obj = unserialize(
        header()
        + vecsxp(
            [
                i32(16) + i32(1) + charsxp("café", levels=0x04),
                intsxp([3, -(2**31)]),
                lglsxp([1, 0, -(2**31)]),
                i32(14) + i32(2) + struct.pack(">2d", 1.5, -2.0),
            ]
        )
    )
    assert list(obj[0]) == ["café"]
    assert list(obj[1]) == [3, None]
    assert list(obj[2]) == [True, False, None]
    assert list(obj[3]) == [1.5, -2.0]


@pytest.mark.parametrize("compressed,gzip_rdx", [(1, True), (1, False), (2, True)])
def test_read_lazyload_db(tmp_path, compressed, gzip_rdx):
    novel = ["CHAPTER I", "", None, "Emma Woodhouse, handsome, clever, and rich"]
    rdb, rdx = make_db(
        tmp_path,
        {"emma": header() + strsxp(novel), "tiny": header(2) + strsxp(["x"])},
        compressed=compressed,
        gzip_rdx=gzip_rdx,
    )
    db = read_lazyload_db(rdb, rdx)
    assert list(db) == ["emma", "tiny"]
    assert list(db["emma"]) == novel and list(db["tiny"]) == ["x"]
    assert list(read_lazyload_db(rdb, names=["tiny"])) == ["tiny"]
    with pytest.raises(KeyError, match="nope"):
        read_lazyload_db(rdb, rdx, names=["nope"])


def test_novels_from_fake_deb_layout(tmp_path, monkeypatch):
    """austen_novels' cache path: decode a fake package tree, join lines, write the cache."""
    data = tmp_path / "pkg" / texts.DATA_DIR
    data.mkdir(parents=True)
    objects = {n: header() + strsxp([n.upper(), None, "line two"]) for n in texts.AUSTEN_ORDER}
    rdb, rdx = make_db(tmp_path, objects)
    (data / "Rdata.rdb").write_bytes(rdb.read_bytes())
    (data / "Rdata.rdx").write_bytes(rdx.read_bytes())

    def fake_extract(deb, dest):
        import shutil

        shutil.copytree(tmp_path / "pkg", dest, dirs_exist_ok=True)

    monkeypatch.setattr(texts, "_extract_deb", fake_extract)
    cache = tmp_path / "cache"
    novels = texts.austen_novels(cache, deb=tmp_path / "fake.deb")
    assert list(novels) == list(texts.AUSTEN_ORDER)
    assert novels["emma"] == "EMMA\n\nline two"
    assert (cache / "austen" / "emma.txt").read_text(encoding="utf-8") == "EMMA\n\nline two"
    # Second call: served from the cache (the extractor must not be needed).
    monkeypatch.setattr(texts, "_extract_deb", None)
    assert load_text("austen:persuasion", cache) == "PERSUASION\n\nline two"
    assert load_text("austen:all", cache).startswith(
        "SENSESENSIBILITY\n\nline two\n\nPRIDEPREJUDICE"
    )
    with pytest.raises(ValueError, match="unknown Austen novel"):
        load_text("austen:dracula", cache)


def test_unknown_sexp_type_is_a_clear_error():
    env = header() + i32(4) + i32(0)  # ENVSXP: not supported
    with pytest.raises(RFormatError, match="unsupported R SEXP type 4"):
        unserialize(env)
    with pytest.raises(RFormatError, match="XDR"):
        unserialize(b"A\n1\n")
    with pytest.raises(RFormatError, match="truncated"):
        unserialize(header() + strsxp(["abc"])[:-1])
    with pytest.raises(RFormatError, match="decompressed to"):
        decompress_record(struct.pack(">I", 99) + zlib.compress(b"short"))


def test_load_text_file(tmp_path):
    p = tmp_path / "book.txt"
    p.write_text("Call me Ishmael. — ünïcode\nline 2\n", encoding="utf-8")
    assert load_text(str(p)) == "Call me Ishmael. — ünïcode\nline 2\n"
    with pytest.raises(FileNotFoundError):
        load_text(str(tmp_path / "missing.txt"))


def test_missing_apt_get_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(texts.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get is not available"):
        texts.austen_novels(tmp_path / "empty-cache")
