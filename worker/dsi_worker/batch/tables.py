"""Reading input shards and writing output parts, JSON Lines or Parquet.

JSON Lines needs nothing beyond the standard library; Parquet needs ``pyarrow``, imported
only when a Parquet file is read or written. Blank lines of a JSON Lines file are not rows
(row indexes count the others).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsi_worker.batch.args import Format, InputSpec
from dsi_worker.batch.shards import InputError, InputFile, Shard, atomic_write_bytes, row_id

#: Columns of every output file, in this order.
OUTPUT_COLUMNS = ("id", "prompt", "text", "finish_reason", "prompt_tokens", "completion_tokens")


@dataclass(frozen=True)
class InputRow:
    """One row to run: its id and its prompt."""

    id: Any
    prompt: str


def scan_file(path: Path, name: str, fmt: Format, rows_per_shard: int) -> InputFile:
    """Count ``path``'s rows (and, for JSON Lines, note where each shard starts)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return InputFile(path, name, pq.ParquetFile(path).metadata.num_rows)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise InputError(f"{name}: not a readable Parquet file: {e}") from None
    rows, offsets, pos = 0, [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                if rows % rows_per_shard == 0:
                    offsets.append(pos)
                rows += 1
            pos += len(line)
    return InputFile(path, name, rows, tuple(offsets))


def _row(obj: Any, where: str, index: int, spec: InputSpec, file_name: str) -> InputRow:
    """Validate one decoded row: a mapping with a string prompt (and the id column)."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected an object, got {type(obj).__name__}")
    prompt = obj.get(spec.prompt_column)
    if not isinstance(prompt, str):
        got = "no such column" if spec.prompt_column not in obj else type(prompt).__name__
        raise InputError(f"{where}: prompt column {spec.prompt_column!r}: {got}, not text")
    if spec.id_column is None:
        return InputRow(row_id(file_name, index), prompt)
    if obj.get(spec.id_column) is None:
        raise InputError(f"{where}: id column {spec.id_column!r} is missing or null")
    return InputRow(obj[spec.id_column], prompt)


def _read_jsonl(shard: Shard, spec: InputSpec) -> list[InputRow]:
    rows: list[InputRow] = []
    with open(shard.file.path, "rb") as f:
        f.seek(shard.offset)
        while len(rows) < shard.rows:
            line = f.readline()
            if not line:
                raise InputError(f"{shard.file.name}: ended early (changed while running?)")
            if not line.strip():
                continue
            index = shard.start + len(rows)
            where = f"{shard.file.name} row {index}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise InputError(f"{where}: not valid JSON: {e}") from None
            rows.append(_row(obj, where, index, spec, shard.file.name))
    return rows


def _read_parquet(shard: Shard, spec: InputSpec) -> list[InputRow]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(shard.file.path)
    names = set(pf.schema_arrow.names)
    columns = [c for c in (spec.prompt_column, spec.id_column) if c is not None]
    for c in columns:
        if c not in names:
            raise InputError(f"{shard.file.name}: no column {c!r} (has {sorted(names)})")
    # Read only the row groups that hold the shard's rows.
    groups, first, seen = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if seen + n > shard.start and seen < shard.start + shard.rows:
            groups.append(g)
            first = seen if first is None else first
        seen += n
    table = pf.read_row_groups(groups, columns=columns)
    table = table.slice(shard.start - (first or 0), shard.rows)
    name = shard.file.name
    return [
        _row(obj, f"{name} row {shard.start + i}", shard.start + i, spec, name)
        for i, obj in enumerate(table.to_pylist())
    ]


def read_shard(shard: Shard, spec: InputSpec) -> list[InputRow]:
    """The shard's rows, in file order (:class:`InputError` naming the row when one is bad)."""
    if spec.format == "parquet":
        return _read_parquet(shard, spec)
    return _read_jsonl(shard, spec)


def write_part(path: Path, rows: list[dict[str, Any]], fmt: Format) -> None:
    """Write one output file atomically (its columns: :data:`OUTPUT_COLUMNS`)."""
    if fmt == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        atomic_write_bytes(path, text.encode())
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({c: [r[c] for r in rows] for c in OUTPUT_COLUMNS})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_part(path: Path) -> list[dict[str, Any]]:
    """The rows of an output file (for tests and tools)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
        return rows
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
