"""Input sharding, row ids, output names and the resume marker (no Ray, no torch).

A shard is up to ``rows_per_shard`` consecutive rows of one input file; shards are numbered
0, 1, 2, ... over the input files in sorted order, and shard ``k`` becomes the output file
``part-<k:05d>.<format>``. Every output file is written under a temporary name and renamed,
then recorded in the marker ``_dsi_done.json`` (also written by rename), so after a crash
a shard is either finished and recorded, or redone from scratch.

The marker carries a fingerprint of the input files and of every argument that changes the
rows or their text; a rerun whose fingerprint differs refuses to touch the directory
instead of mixing outputs of two different jobs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsi_worker.batch.args import BatchArgs, Format, InputSpec

MARKER = "_dsi_done.json"
SUCCESS = "_SUCCESS"
#: Bytes of each file's head and tail that go into the fingerprint (with its size): a
#: changed file is caught without reading terabytes of input on every start.
FINGERPRINT_SAMPLE = 1 << 20
MARKER_VERSION = 1


class InputError(RuntimeError):
    """The input cannot be read as asked (missing path, bad row, missing column)."""


class OutputMismatch(RuntimeError):
    """The output directory holds results of a different input or different arguments."""


@dataclass(frozen=True)
class InputFile:
    """One input file: its path, its name in row ids, and its row count.

    ``offsets``: for JSON Lines, the byte offset of the first row of each of the file's
    shards (a shard is read by seeking there); empty for Parquet (read by row group).
    """

    path: Path
    name: str
    rows: int
    offsets: tuple[int, ...] = ()


@dataclass(frozen=True)
class Shard:
    """Rows ``start .. start + rows - 1`` of ``file``; becomes ``part-<id>``."""

    id: int
    file: InputFile
    start: int
    rows: int
    offset: int = 0


def input_paths(spec: InputSpec) -> list[tuple[Path, str]]:
    """(path, name for row ids) of every input file: the file itself, or all
    ``*.<format>`` files of the directory, sorted by name."""
    root = Path(spec.path).expanduser()
    if root.is_file():
        return [(root, root.name)]
    if not root.is_dir():
        raise InputError(f"input.path {spec.path}: no such file or directory")
    found = sorted(p for p in root.glob(f"*.{spec.format}") if p.is_file())
    if not found:
        raise InputError(f"input.path {spec.path}: no *.{spec.format} files in the directory")
    return [(p, p.relative_to(root).as_posix()) for p in found]


def plan_shards(files: Sequence[InputFile], rows_per_shard: int) -> list[Shard]:
    """Cut every file into shards of at most ``rows_per_shard`` rows, numbered in order."""
    shards: list[Shard] = []
    for f in files:
        for i, start in enumerate(range(0, f.rows, rows_per_shard)):
            offset = f.offsets[i] if f.offsets else 0
            rows = min(rows_per_shard, f.rows - start)
            shards.append(Shard(len(shards), f, start, rows, offset))
    return shards


def row_id(file_name: str, index: int) -> str:
    """Id of a row of a file without an id column: ``<relative file name>:<row index>``."""
    return f"{file_name}:{index}"


def part_name(shard: int, fmt: Format) -> str:
    """Output file name of shard ``shard``."""
    return f"part-{shard:05d}.{fmt}"


def tmp_path(final: Path) -> Path:
    """Where ``final`` is written before its rename: hidden, in the same directory (so the
    rename is atomic), and recognisable as debris after a crash."""
    return final.with_name(f".{final.name}.tmp")


def remove_tmp_files(out_dir: Path) -> list[str]:
    """Delete what a killed run left half written; returns the names removed."""
    removed = []
    for p in out_dir.glob(".*.tmp"):
        p.unlink(missing_ok=True)
        removed.append(p.name)
    return sorted(removed)


def atomic_write_bytes(final: Path, data: bytes) -> None:
    """Write ``data`` to ``final`` all or nothing (temp file, fsync, rename)."""
    tmp = tmp_path(final)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(FINGERPRINT_SAMPLE))
        if size > 2 * FINGERPRINT_SAMPLE:
            f.seek(size - FINGERPRINT_SAMPLE)
        h.update(f.read(FINGERPRINT_SAMPLE))
    return h.hexdigest()


def fingerprint(paths: Iterable[tuple[Path, str]], args: BatchArgs) -> str:
    """Hash of the input files (names, sizes, head and tail bytes) and of the arguments
    that decide which rows go where and what their text is (not batch size, TP size or the
    number of groups: those change how fast, not what)."""
    what: dict[str, Any] = {
        "files": [[name, _file_digest(p)] for p, name in paths],
        "input": args.input.model_dump(exclude={"path"}),
        "output_format": args.output.format,
        "rows_per_shard": args.rows_per_shard,
        "generation": args.generation.model_dump(),
        "model": [args.model or "dsi-tiny-llama", args.revision, args.dtype, args.max_model_len],
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class Marker:
    """The resume marker: which shards are finished, for which input and arguments."""

    fingerprint: str
    shards_total: int
    done: set[int] = field(default_factory=set)

    def to_json(self) -> str:
        """The marker file's content."""
        body = {
            "version": MARKER_VERSION,
            "fingerprint": self.fingerprint,
            "shards_total": self.shards_total,
            "done": sorted(self.done),
        }
        return json.dumps(body, indent=1) + "\n"

    def save(self, out_dir: Path) -> None:
        """Rewrite ``<out_dir>/_dsi_done.json`` atomically."""
        atomic_write_bytes(out_dir / MARKER, self.to_json().encode())


def load_marker(out_dir: Path, fp: str, shards_total: int) -> Marker:
    """The directory's marker, or a new empty one; :class:`OutputMismatch` when the
    directory belongs to a different input or different arguments."""
    path = out_dir / MARKER
    if not path.exists():
        stray = sorted(p.name for p in out_dir.glob("part-*"))
        if stray:
            raise OutputMismatch(
                f"output.path {out_dir} holds {stray[0]} but no {MARKER}: it is not the "
                "output of this job; use an empty or new directory"
            )
        return Marker(fp, shards_total)
    try:
        body = json.loads(path.read_text())
        old = Marker(str(body["fingerprint"]), int(body["shards_total"]), set(body["done"]))
    except (ValueError, KeyError, TypeError) as e:
        raise OutputMismatch(f"{path}: unreadable resume marker ({e}); delete it") from None
    if old.fingerprint != fp or old.shards_total != shards_total:
        raise OutputMismatch(
            f"output.path {out_dir} holds results of a different input or different "
            f"arguments (fingerprint {old.fingerprint[:12]} with {old.shards_total} shards; "
            f"this run: {fp[:12]} with {shards_total}): use a new output path or empty it"
        )
    return old
