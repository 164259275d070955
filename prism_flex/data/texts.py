"""Long natural-language texts for the evaluation scripts, offline.

``load_text(spec)`` returns a text as one ``str``:

* ``austen:emma`` (or ``persuasion``, ``prideprejudice``, ``mansfieldpark``,
  ``northangerabbey``, ``sensesensibility``): one of Jane Austen's six novels;
  ``austen:all``: the six concatenated in publication order (``AUSTEN_ORDER``);
* anything else: the path of a UTF-8 text file (``--text FILE``).

The novels come from Debian's package ``r-cran-janeaustenr``, which holds them as R
"lazy-load" data (``janeaustenr/data/Rdata.rdb`` + ``Rdata.rdx``). The package is fetched with
``apt-get download`` (no root needed), unpacked with ``dpkg-deb -x`` (or, without dpkg-deb, by
reading the .deb's ar/tar layers in Python), and decoded by the small R unserializer below;
R is not needed. The novels are then cached as ``<cache_dir>/austen/<name>.txt``, so only the
first call needs the Debian archive.

CLI: ``python -m prism_flex.data.texts austen:emma --head 500`` prints the first characters of
the text and its character/word/line counts; ``python -m prism_flex.data.texts austen:list``
prints every novel's counts.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import io
import lzma
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path

__all__ = [
    "AUSTEN_ORDER",
    "DEFAULT_CACHE_DIR",
    "RFormatError",
    "RPairlist",
    "RSymbol",
    "RVector",
    "austen_novels",
    "decompress_record",
    "load_text",
    "read_lazyload_db",
    "unserialize",
]

DEFAULT_CACHE_DIR = Path("~/.cache/prism_flex/texts")
DEB_PACKAGE = "r-cran-janeaustenr"
DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
# Publication order; also the order of ``austen:all``.
AUSTEN_ORDER = (
    "sensesensibility",  # 1811
    "prideprejudice",  # 1813
    "mansfieldpark",  # 1814
    "emma",  # 1815
    "northangerabbey",  # 1817
    "persuasion",  # 1817
)


class RFormatError(ValueError):
    """The bytes are not an R serialization / lazy-load database this reader understands."""


# --------------------------------------------------------------------------- R unserializer

# SEXP types (R's Rinternals.h / serialize.c).
SYMSXP, LISTSXP, LGLSXP, CHARSXP = 1, 2, 10, 9
INTSXP, REALSXP, STRSXP, VECSXP, EXPRSXP = 13, 14, 16, 19, 20
REFSXP, NILVALUE_SXP = 255, 254
SUPPORTED_TYPES = (
    SYMSXP,
    LISTSXP,
    LGLSXP,
    CHARSXP,
    INTSXP,
    REALSXP,
    STRSXP,
    VECSXP,
    EXPRSXP,
    REFSXP,
    NILVALUE_SXP,
)
IS_OBJECT_BIT, HAS_ATTR_BIT, HAS_TAG_BIT = 1 << 8, 1 << 9, 1 << 10
NA_INTEGER = -(2**31)
# CHARSXP encoding bits in the "levels" field (flags >> 12).
LATIN1_MASK, UTF8_MASK, BYTES_MASK, ASCII_MASK = 1 << 2, 1 << 3, 1 << 1, 1 << 6


class RSymbol(str):
    """An R symbol (SYMSXP): a ``str`` holding its name."""

    def __repr__(self):
        return f"RSymbol({str.__repr__(self)})"


class RVector(list):
    """An R vector as a Python list, with its SEXP type and attributes.

    STRSXP elements are ``str`` or ``None`` (NA); INTSXP ``int`` or ``None``; LGLSXP ``bool``
    or ``None``; REALSXP ``float`` (NA/NaN as NaN); VECSXP/EXPRSXP any decoded object.
    """

    def __init__(self, items=(), rtype=VECSXP, attributes=None, is_object=False):
        super().__init__(items)
        self.rtype = rtype
        self.attributes = dict(attributes or {})
        self.is_object = is_object

    @property
    def names(self):
        names = self.attributes.get("names")
        return list(names) if names is not None else None

    def as_dict(self):
        """``{name: element}`` from the ``names`` attribute (error if there is none)."""
        if self.names is None:
            raise RFormatError("R vector has no names attribute")
        return dict(zip(self.names, self))


class RPairlist(list):
    """An R pairlist (LISTSXP) as a list of values, with parallel ``tags`` (None if untagged)."""

    def __init__(self, items=(), tags=(), attributes=None):
        super().__init__(items)
        self.tags = list(tags)
        self.attributes = dict(attributes or {})

    def as_dict(self):
        return {str(t): v for t, v in zip(self.tags, self) if t is not None}


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs: list = []

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise RFormatError(
                f"R serialization truncated at byte {self.pos} (wanted {n} more bytes)"
            )
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints
            hi, lo = struct.unpack(">II", self.take(8))
            n = (hi << 32) | lo
        elif n < -1:
            raise RFormatError(f"negative vector length {n} at byte {self.pos - 4}")
        return n

    # -- items
    def item(self):
        return self._item(self.int())

    def _item(self, flags: int):
        rtype = flags & 0xFF
        has_attr = bool(flags & HAS_ATTR_BIT)
        is_obj = bool(flags & IS_OBJECT_BIT)
        if rtype == NILVALUE_SXP:
            return None
        if rtype == REFSXP:
            idx = flags >> 8 or self.int()
            if not 1 <= idx <= len(self.refs):
                raise RFormatError(f"REFSXP index {idx} out of range (have {len(self.refs)} refs)")
            return self.refs[idx - 1]
        if rtype == SYMSXP:
            name = self.item()
            if not isinstance(name, str):
                raise RFormatError("SYMSXP without a CHARSXP name")
            sym = RSymbol(name)
            self.refs.append(sym)
            return sym
        if rtype == LISTSXP:
            return self._pairlist(flags)
        if rtype == CHARSXP:
            return self._charsxp(flags)
        if rtype in (STRSXP, VECSXP, EXPRSXP):
            n = self.length()
            items = [self.item() for _ in range(n)]
        elif rtype in (INTSXP, LGLSXP):
            n = self.length()
            raw = struct.unpack(f">{n}i", self.take(4 * n))
            if rtype == INTSXP:
                items = [None if v == NA_INTEGER else v for v in raw]
            else:
                items = [None if v == NA_INTEGER else bool(v) for v in raw]
        elif rtype == REALSXP:
            n = self.length()
            items = list(struct.unpack(f">{n}d", self.take(8 * n)))
        else:
            raise RFormatError(
                f"unsupported R SEXP type {rtype} (flags 0x{flags:08x}) at byte {self.pos - 4}; "
                f"this reader handles only types {sorted(SUPPORTED_TYPES)}"
            )
        attrs = self._attributes() if has_attr else {}
        return RVector(items, rtype=rtype, attributes=attrs, is_object=is_obj)

    def _attributes(self) -> dict:
        attrs = self.item()
        if not isinstance(attrs, RPairlist):
            raise RFormatError(f"attributes are not a pairlist: {type(attrs).__name__}")
        return attrs.as_dict()

    def _pairlist(self, flags: int) -> RPairlist:
        # Iterative over the CDR chain, so long pairlists don't recurse.
        items, tags = [], []
        first_attrs = None
        while True:
            attrs = self._attributes() if flags & HAS_ATTR_BIT else {}
            if first_attrs is None:
                first_attrs = attrs
            tags.append(self.item() if flags & HAS_TAG_BIT else None)
            items.append(self.item())
            flags = self.int()
            if flags & 0xFF != LISTSXP:
                tail = self._item(flags)
                if tail is not None:
                    raise RFormatError("dotted pairlist (non-NULL tail) is not supported")
                return RPairlist(items, tags, first_attrs)

    def _charsxp(self, flags: int):
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = self.take(n)
        levels = flags >> 12
        if levels & LATIN1_MASK:
            return raw.decode("latin-1")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:  # native-encoded, unflagged: best effort
            return raw.decode("latin-1")


def unserialize(data: bytes):
    """Decode one R serialization stream (XDR format 'X', version 2 or 3).

    Handles the types listed in ``SUPPORTED_TYPES``; anything else raises ``RFormatError``.
    A gzip-compressed stream (an .rds file) is accepted too.
    """
    data = bytes(data)
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if data[:2] != b"X\n":
        kind = {b"A\n": "ASCII", b"B\n": "native binary"}.get(data[:2], repr(data[:2]))
        raise RFormatError(f"only XDR ('X\\n') R serialization is supported, got {kind}")
    r = _Reader(data)
    r.pos = 2
    version = r.int()
    r.int(), r.int()  # writer R version, min reader version
    if version == 3:
        r.take(r.int())  # native encoding, e.g. b"UTF-8"
    elif version != 2:
        raise RFormatError(f"unsupported R serialization version {version}")
    obj = r.item()
    if r.pos != len(data):
        raise RFormatError(f"{len(data) - r.pos} trailing bytes after the R object")
    return obj


# --------------------------------------------------------------------------- lazy-load DB


def decompress_record(blob: bytes, compressed: int = 1) -> bytes:
    """Undo R's lazy-load record framing: 4-byte big-endian output length, then the payload.

    ``compressed`` is the database's ``compressed`` entry: 1/TRUE = zlib, 2 = bzip2 and
    3 = xz (both with a type byte after the length: '0' stored, '1' zlib, '2' bzip2, 'Z' xz),
    0/FALSE = not compressed.
    """
    if not compressed:
        return blob
    if len(blob) < 4:
        raise RFormatError("lazy-load record shorter than its 4-byte length header")
    (outlen,) = struct.unpack(">I", blob[:4])
    if compressed == 1:
        out = zlib.decompress(blob[4:])
    elif compressed in (2, 3):
        kind, payload = blob[4:5], blob[5:]
        if kind == b"0":
            out = payload
        elif kind == b"1":
            out = zlib.decompress(payload)
        elif kind == b"2":
            out = bz2.decompress(payload)
        elif kind == b"Z":
            try:  # R writes a raw LZMA2 stream (lzma_raw_encoder, preset 9 | extreme)
                out = lzma.decompress(
                    payload,
                    format=lzma.FORMAT_RAW,
                    filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}],
                )
            except lzma.LZMAError:
                out = lzma.decompress(payload)
        else:
            raise RFormatError(f"unknown lazy-load record compression byte {kind!r}")
    else:
        raise RFormatError(f"unknown lazy-load compression type {compressed!r}")
    if len(out) != outlen:
        raise RFormatError(
            f"lazy-load record decompressed to {len(out)} bytes, header says {outlen}"
        )
    return out


def _read_index(rdx: bytes):
    if rdx[:2] == b"\x1f\x8b":  # saveRDS-style gzip file (what R writes)
        return unserialize(gzip.decompress(rdx))
    return unserialize(decompress_record(rdx, 1))  # 4-byte length + zlib framing


def read_lazyload_db(rdb_path, rdx_path=None, names=None) -> dict:
    """Read an R lazy-load database (``X.rdb`` + ``X.rdx``) into ``{variable: object}``.

    ``names`` restricts the variables decoded (default: all of them).
    """
    rdb_path = Path(rdb_path)
    rdx_path = Path(rdx_path) if rdx_path is not None else rdb_path.with_suffix(".rdx")
    index = _read_index(rdx_path.read_bytes())
    if not isinstance(index, RVector) or index.names is None:
        raise RFormatError(f"{rdx_path}: index is not a named list")
    index = index.as_dict()
    if "variables" not in index:
        raise RFormatError(f"{rdx_path}: index has no 'variables' entry")
    variables = index["variables"].as_dict() if index["variables"] is not None else {}
    comp = index.get("compressed")
    compressed = int(comp[0]) if comp else 0
    wanted = list(variables) if names is None else list(names)
    missing = [n for n in wanted if n not in variables]
    if missing:
        raise KeyError(f"{rdb_path}: no variables {missing}; has {sorted(variables)}")
    out = {}
    with open(rdb_path, "rb") as f:
        for name in wanted:
            offset, length = variables[name]
            f.seek(offset)
            blob = f.read(length)
            if len(blob) != length:
                raise RFormatError(f"{rdb_path}: record {name!r} runs past the end of the file")
            out[name] = unserialize(decompress_record(blob, compressed))
    return out


# --------------------------------------------------------------------------- Austen


def _extract_deb(deb: Path, dest: Path) -> None:
    if shutil.which("dpkg-deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
        return
    # Fallback: a .deb is an ar archive holding data.tar.{xz,gz,bz2}.
    data = deb.read_bytes()
    if data[:8] != b"!<arch>\n":
        raise RFormatError(f"{deb} is not a Debian package (ar archive)")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = data[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise RuntimeError(f"{deb}: zstd data member needs dpkg-deb, which is missing")
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                tar.extractall(dest, filter="data")
            return
        pos += 60 + size + (size & 1)
    raise RFormatError(f"{deb}: no data.tar member")


def _download_deb(workdir: Path) -> Path:
    if not shutil.which("apt-get"):
        raise RuntimeError(
            f"apt-get is not available, so the Debian package {DEB_PACKAGE} cannot be fetched; "
            f"download {DEB_PACKAGE}_*.deb elsewhere and pass it as austen_novels(deb=...)"
        )
    proc = subprocess.run(
        ["apt-get", "download", DEB_PACKAGE], cwd=workdir, capture_output=True, text=True
    )
    debs = sorted(workdir.glob(f"{DEB_PACKAGE}_*.deb"))
    if proc.returncode != 0 or not debs:
        raise RuntimeError(
            f"`apt-get download {DEB_PACKAGE}` failed (exit {proc.returncode}); "
            f"maybe run `apt-get update` first.\n{proc.stderr.strip()}"
        )
    return debs[-1]


def _novels_from_deb(deb: Path) -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix="janeaustenr-") as tmp:
        _extract_deb(deb, Path(tmp))
        data = Path(tmp) / DATA_DIR
        db = read_lazyload_db(data / "Rdata.rdb", data / "Rdata.rdx")
    novels = {}
    for name in AUSTEN_ORDER:
        lines = db.get(name)
        if not isinstance(lines, RVector) or lines.rtype != STRSXP:
            raise RFormatError(
                f"{deb}: {name!r} is missing or not a character vector; has {sorted(db)}"
            )
        novels[name] = "\n".join("" if s is None else s for s in lines)
    return novels


def austen_novels(cache_dir=DEFAULT_CACHE_DIR, deb=None) -> dict[str, str]:
    """Jane Austen's six novels as ``{name: text}`` (lines joined with newlines), in
    ``AUSTEN_ORDER``. Cached as ``<cache_dir>/austen/<name>.txt``; on a cache miss the Debian
    package is read from ``deb`` or fetched with ``apt-get download``."""
    cache = Path(cache_dir).expanduser() / "austen"
    paths = {name: cache / f"{name}.txt" for name in AUSTEN_ORDER}
    if all(p.is_file() for p in paths.values()):
        return {name: p.read_text(encoding="utf-8") for name, p in paths.items()}
    if deb is not None:
        novels = _novels_from_deb(Path(deb))
    else:
        with tempfile.TemporaryDirectory(prefix="janeaustenr-deb-") as tmp:
            novels = _novels_from_deb(_download_deb(Path(tmp)))
    cache.mkdir(parents=True, exist_ok=True)
    for name, text in novels.items():
        tmp_path = paths[name].with_suffix(f".tmp{os.getpid()}")
        tmp_path.write_text(text, encoding="utf-8")
        os.replace(tmp_path, paths[name])
    return novels


def load_text(spec: str, cache_dir=DEFAULT_CACHE_DIR) -> str:
    """``austen:<novel>``, ``austen:all`` (the six in ``AUSTEN_ORDER``, separated by a blank
    line), or the path of a UTF-8 text file."""
    spec = str(spec)
    if spec.startswith("austen:") and not os.path.exists(spec):
        name = spec.split(":", 1)[1].strip().lower()
        if name != "all" and name not in AUSTEN_ORDER:
            raise ValueError(
                f"unknown Austen novel {name!r}; choose one of {', '.join(AUSTEN_ORDER)} or 'all'"
            )
        novels = austen_novels(cache_dir)
        return "\n\n".join(novels.values()) if name == "all" else novels[name]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no text file {spec!r} (or use austen:<novel> / austen:all)")
    return path.read_text(encoding="utf-8")


def _counts(text: str) -> str:
    return (
        f"{len(text):,} characters, {len(text.split()):,} words, {text.count(chr(10)) + 1:,} lines"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m prism_flex.data.texts", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("spec", help="austen:<novel>, austen:all, austen:list, or a UTF-8 text file")
    p.add_argument("--head", type=int, default=500, help="characters to print (default 500)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR))
    args = p.parse_args(argv)
    if args.spec == "austen:list":
        for name, text in austen_novels(args.cache_dir).items():
            print(f"{name:18s} {_counts(text)}")
        return
    text = load_text(args.spec, args.cache_dir)
    if args.head > 0:
        print(text[: args.head])
        print("-" * 60)
    print(f"{args.spec}: {_counts(text)}")


if __name__ == "__main__":
    main()
