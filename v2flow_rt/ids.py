"""Token-id files: ``.npy`` (an integer array) or ``.json`` (``{"images": [...], "ids": [[...], ...]}``). Numpy only.

``load_ids`` is the one reader of a user's ids file: anything that is not a non-empty rectangular array of
non-negative integers raises ShapeError naming the file and what is wrong with it; no other exception
escapes. ``save_ids`` writes either format atomically and returns the path it actually wrote.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ShapeError
from .fileio import atomic_write

_MAX_ID = 2 ** 31 - 1   # far above any codebook; bounds what int64 arithmetic downstream can meet


def ids_path(out: str | os.PathLike[str]) -> Path:
    """Where ``save_ids(out, ...)`` writes: ``out`` itself for ``.json`` / ``.npy``, else ``out.npy``."""
    p = Path(out)
    return p if p.suffix.lower() in (".json", ".npy") else p.with_name(p.name + ".npy")


def save_ids(out: str | os.PathLike[str], ids: np.ndarray, images: list[str] | None = None) -> Path:
    """Write ids [B, L] to ``ids_path(out)`` (JSON with the image names, or .npy); return that path."""
    path = ids_path(out)
    if path.suffix.lower() == ".json":
        text = json.dumps({"images": list(images or []), "ids": np.asarray(ids).tolist()})
        atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
    else:
        def write(p: Path) -> None:
            with open(p, "wb") as f:      # a file object: np.save would append .npy to a temp name
                np.save(f, np.asarray(ids), allow_pickle=False)
        atomic_write(path, write)
    return path


def load_ids(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an ids file → int64 [B, L] (a 1-D file is one image). Raises ShapeError naming the file and the
    problem (missing, unreadable, invalid JSON, no ``ids`` key, ragged, strings, floats, NaN, negative, empty).
    """
    p = Path(path)
    if not p.is_file():
        raise ShapeError(f"ids file {p} does not exist" if not p.exists() else f"ids file {p} is not a file")
    if p.suffix.lower() == ".json":
        ids = _from_json(p)
    else:
        ids = _from_npy(p)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ShapeError(f"{p}: ids must be one list per image (2-D), got {ids.ndim}-D of shape {list(ids.shape)}")
    if ids.size == 0:
        raise ShapeError(f"{p}: holds no token ids (shape {list(ids.shape)})")
    if (ids < 0).any() or (ids > _MAX_ID).any():
        bad = ids[(ids < 0) | (ids > _MAX_ID)].flat[0]
        raise ShapeError(f"{p}: token ids must be non-negative integers below 2**31, found {int(bad)}")
    return ids.astype(np.int64, copy=False)


def _from_npy(p: Path) -> np.ndarray:
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as exc:   # numpy raises ValueError, OSError, EOFError, UnpicklingError, ... on bad bytes
        raise ShapeError(f"{p}: not a .npy or .json file of token ids ({type(exc).__name__}: "
                         f"{_one_line(exc)})") from None
    if not isinstance(arr, np.ndarray):       # an .npz archive
        arr.close()
        raise ShapeError(f"{p}: an .npz archive, not one .npy array of token ids")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ShapeError(f"{p}: token ids must be integers, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and arr.max() > _MAX_ID:
        raise ShapeError(f"{p}: token ids must be non-negative integers below 2**31, found {int(arr.max())}")
    return arr.astype(np.int64)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a token id")


def _from_json(p: Path) -> np.ndarray:
    try:
        data = json.loads(p.read_bytes().decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise ShapeError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:   # JSONDecodeError is a ValueError; NaN / Infinity land here too
        raise ShapeError(f"{p}: not valid JSON of token ids: {_one_line(exc)}") from None
    if isinstance(data, dict):
        if "ids" not in data:
            raise ShapeError(f"{p}: a JSON object without an 'ids' key (keys: {sorted(map(str, data))[:8]})")
        data = data["ids"]
    if not isinstance(data, list):
        raise ShapeError(f"{p}: 'ids' must be a list of token ids or of lists of them, got {type(data).__name__}")
    rows = data if data and all(isinstance(r, list) for r in data) else [data]
    if any(isinstance(r, list) for r in data) and rows is not data:
        raise ShapeError(f"{p}: 'ids' mixes lists and single values")
    lengths = {len(r) for r in rows}
    if len(lengths) > 1:
        raise ShapeError(f"{p}: ragged ids: rows have {sorted(lengths)} tokens; every image has the same number")
    for i, row in enumerate(rows):
        for v in row:
            if isinstance(v, bool) or not isinstance(v, int):
                kind = "a float" if isinstance(v, float) else type(v).__name__
                raise ShapeError(f"{p}: token ids must be integers, row {i} holds {kind} {v!r:.40}")
            if not 0 <= v <= _MAX_ID:
                raise ShapeError(f"{p}: token ids must be non-negative integers below 2**31, found {v}")
    arr = np.asarray(rows, dtype=np.int64)
    return arr if any(isinstance(r, list) for r in data) else arr[0]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
