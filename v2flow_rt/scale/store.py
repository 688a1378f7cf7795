"""The output folder of ``tokenize-dataset``: Parquet shards, the ``_errors`` table, the job record. Pyarrow.

Layout of DST::

    _job.json                           the plan: source, tokenizer fingerprint, engine, shard names
    part-{i:05d}-{hash}.parquet         key, ids (list<int16|int32>), width, height, tokenizer
    _errors/part-{i:05d}-{hash}.parquet key, error (every key of the shard that could not be tokenized)
    _summary.json                       counts and timings of the last run (written when it completes)

A shard is complete when its data file exists: its errors file is written (atomically) first, then the
data file (atomically), so a job killed at any moment leaves only whole files and temporary files that
start with ``.``, which readers (``pyarrow.dataset``) and the next run ignore. ``pq.read_table(DST)`` reads
the ids table; files and folders starting with ``_`` or ``.`` are not part of it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError
from ..fileio import atomic_write, atomic_write_text

JOB_NAME, SUMMARY_NAME, ERRORS_DIR = "_job.json", "_summary.json", "_errors"
JOB_FORMAT = "v2flow-rt/tokenized-dataset/1"


def ids_dtype(codebook_size: int) -> np.dtype:
    """int16 when every id fits (codebook ≤ 32768 entries), else int32."""
    return np.dtype(np.int16) if codebook_size <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


def ids_schema(codebook_size: int, tokenizer: str, num_tokens: int) -> Any:
    """The Parquet schema of a shard; the fingerprint and token count are in its metadata too."""
    import pyarrow as pa

    ids = pa.int16() if ids_dtype(codebook_size) == np.int16 else pa.int32()
    meta = {"v2flow.tokenizer_sha256": tokenizer, "v2flow.num_tokens": str(num_tokens),
            "v2flow.codebook_size": str(codebook_size)}
    return pa.schema([("key", pa.string()), ("ids", pa.list_(ids)), ("width", pa.int32()),
                      ("height", pa.int32()), ("tokenizer", pa.string())], metadata=meta)


def errors_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("key", pa.string()), ("error", pa.string())])


def errors_table(errors: Sequence[tuple[str, str]]) -> Any:
    """(key, error) pairs → a table of the ``_errors`` schema."""
    import pyarrow as pa

    return pa.table({"key": [k for k, _ in errors], "error": [e for _, e in errors]}, schema=errors_schema())


def write_parquet_atomic(table: Any, path: Path) -> None:
    """Write ``table`` to ``path`` through ``fileio.atomic_write`` (a temp file beside it, fsynced, renamed)."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def write_shard(out: Path, name: str, rows: Sequence[dict[str, Any]], codebook_size: int, tokenizer: str,
                num_tokens: int) -> tuple[int, int]:
    """Write one shard's rows (``key``, ``ids`` or ``error``, ``width``, ``height``): errors first, then
    data (the completion marker). Returns (rows written, errors written)."""
    import pyarrow as pa

    good = [r for r in rows if not r["error"]]
    bad = [r for r in rows if r["error"]]
    write_parquet_atomic(errors_table([(r["key"], r["error"]) for r in bad]), out / ERRORS_DIR / f"{name}.parquet")
    dtype = ids_dtype(codebook_size)
    table = pa.table({"key": [r["key"] for r in good],
                      "ids": [np.asarray(r["ids"]).astype(dtype) for r in good],
                      "width": [int(r["width"]) for r in good], "height": [int(r["height"]) for r in good],
                      "tokenizer": [tokenizer] * len(good)}, schema=ids_schema(codebook_size, tokenizer, num_tokens))
    write_parquet_atomic(table, out / f"{name}.parquet")
    return len(good), len(bad)


def prepare_output(out: Path, job: dict[str, Any], overwrite: bool = False) -> set[str]:
    """Check DST against this job, clean up what a killed run left, and return the complete shards' names.

    Raises DatasetError if DST was written by another job (tokenizer fingerprint, engine, source format) or
    holds shards this plan does not contain (the inputs changed), unless ``overwrite``, which removes them.
    """
    out.mkdir(parents=True, exist_ok=True)
    for tmp in list(out.glob(".*.tmp")) + list((out / ERRORS_DIR).glob(".*.tmp")):
        tmp.unlink(missing_ok=True)        # partial writes of a run that was killed
    wanted = set(job["shards"])
    existing = {p.stem for p in out.glob("part-*.parquet")}
    record = out / JOB_NAME
    if record.is_file() and not overwrite:
        try:
            old = json.loads(record.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{record} is not valid JSON ({exc}); remove it or pass --overwrite") from None
        for field in ("format", "tokenizer_sha256", "engine", "source_format", "num_tokens"):
            if old.get(field) != job[field]:
                raise DatasetError(f"{out} was written with {field} = {old.get(field)!r}, this job has "
                                   f"{job[field]!r}; use another --out or pass --overwrite")
    elif existing and not record.is_file() and not overwrite:
        raise DatasetError(f"{out} holds part-*.parquet files but no {JOB_NAME}: not a tokenize-dataset output; "
                           f"use another --out or pass --overwrite")
    stale = sorted(existing - wanted)
    if stale and not overwrite:
        raise DatasetError(f"{out} holds {len(stale)} shard(s) this job would not write (the inputs changed "
                           f"since they were made?), e.g. {stale[0]}.parquet; pass --overwrite to replace them")
    for name in stale if overwrite else []:
        (out / f"{name}.parquet").unlink()
    for err in (out / ERRORS_DIR).glob("part-*.parquet"):
        if err.stem not in wanted or err.stem not in existing:
            err.unlink()                   # an errors file without its data file belongs to no complete shard
    atomic_write_text(record, json.dumps(job, indent=1) + "\n")
    return existing & wanted
