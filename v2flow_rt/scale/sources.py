"""Where a dataset's images come from, and which output shard each one goes to. Numpy, pillow and pyarrow.

Three kinds of source (``detect_format``):

- ``images``: a folder tree of image files; the key is the path relative to the folder (``a/b.jpg``).
- ``parquet``: Parquet files with an image-bytes column (``binary``, or a struct with a ``bytes`` field as
  Hugging Face ``datasets`` writes its ``Image`` feature); the key comes from a key column (``__key__`` or
  ``key`` when present) or is ``{file relative to SRC}:{row}``.
- ``webdataset``: uncompressed ``.tar`` shards; members ``{key}.{ext}`` make sample ``key`` (WebDataset's
  rule: everything up to the first dot of the file name); the first image member of a sample (in
  ``IMAGE_SUFFIXES`` order) is its image. Bytes are read later by seeking to the member's data offset.

``list_items`` runs on the driver and reads no image bytes; ``read_images`` runs in the workers. A sample
whose image cannot even be located (a tar sample with no image member, an empty Parquet cell) is an item
with an ``error``: it ends up in the ``_errors`` table, not silently dropped.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data import IMAGE_SUFFIXES, decode_image, resize_center_crop
from ..errors import DatasetError, ImageError

FORMATS = ("auto", "images", "parquet", "webdataset")
_IMAGE_EXTS = tuple(s.lstrip(".") for s in IMAGE_SUFFIXES)
# Decoding a file that is not an image can fail in many ways; each is recorded for that key only.
_READ_ERRORS = (ImageError, OSError, ValueError, EOFError, tarfile.TarError)


@dataclass(frozen=True)
class Item:
    """One input image, located but not read.

    Attributes:
        key: the stable key of the output row.
        path: absolute path of the file that holds the bytes.
        offset: byte offset of the image inside a tar (-1 otherwise).
        size: bytes of the image (-1 for Parquet cells).
        row: row index inside a Parquet file (-1 otherwise).
        stamp: identity of the source bytes when planned (file size and mtime): a changed file changes
            the name of the shard it is in, so a resumed job never reuses a shard made from old bytes.
        error: why the item has no image (set at planning), "" otherwise.
    """

    key: str
    path: str
    offset: int = -1
    size: int = -1
    row: int = -1
    stamp: str = ""
    error: str = ""


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _files(src: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                  and not any(part.startswith((".", "_")) for part in p.relative_to(src).parts))


def detect_format(src: str | os.PathLike[str]) -> str:
    """``images``, ``parquet`` or ``webdataset`` from what ``src`` (a folder or one file) holds.

    Raises DatasetError when ``src`` does not exist, holds none of them, or holds more than one kind.
    """
    path = Path(src)
    if path.is_file():
        if path.suffix == ".parquet":
            return "parquet"
        if path.suffix == ".tar":
            return "webdataset"
        raise DatasetError(f"{path}: a single source file must be .parquet or .tar (an image folder is a folder)")
    if not path.is_dir():
        raise DatasetError(f"{path}: no such file or folder")
    kinds = {kind for kind, suffixes in (("images", IMAGE_SUFFIXES), ("parquet", (".parquet",)),
                                         ("webdataset", (".tar",))) if _files(path, suffixes)}
    if len(kinds) != 1:
        found = ", ".join(sorted(kinds)) or "no image, .parquet or .tar files"
        raise DatasetError(f"{path}: cannot tell the dataset format (found {found}); pass --format "
                           f"{'|'.join(FORMATS[1:])}")
    return kinds.pop()


def list_items(src: str | os.PathLike[str], fmt: str = "auto", image_column: str = "image",
               key_column: str | None = None) -> tuple[str, list[Item]]:
    """Every input image of ``src``, sorted by key, and the format used.

    Raises DatasetError for an unknown format, a missing image or key column, a compressed tar, or a key
    that occurs twice (naming both places).
    """
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)}")
    root = Path(src).resolve()
    fmt = detect_format(root) if fmt == "auto" else fmt
    single = root.is_file()
    base = root.parent if single else root
    if fmt == "images":
        if single:
            raise DatasetError(f"{root}: the images format reads a folder tree, not one file")
        items = [Item(p.relative_to(root).as_posix(), str(p), size=p.stat().st_size, stamp=_stamp(p))
                 for p in _files(root, IMAGE_SUFFIXES)]
    elif fmt == "parquet":
        files = [root] if single else _files(root, (".parquet",))
        items = [it for f in files for it in _parquet_items(f, f.relative_to(base).as_posix(), image_column,
                                                            key_column)]
    else:
        files = [root] if single else _files(root, (".tar",))
        items = [it for f in files for it in _tar_items(f, f.relative_to(base).as_posix())]
    if not items:
        raise DatasetError(f"{root}: no images found ({fmt} format)")
    seen: dict[str, Item] = {}
    for it in items:
        if it.key in seen:
            raise DatasetError(f"key {it.key!r} occurs twice: in {seen[it.key].path} and in {it.path}; keys "
                               f"must be unique across the dataset")
        seen[it.key] = it
    return fmt, sorted(items, key=lambda it: it.key)


def _tar_items(path: Path, rel: str) -> list[Item]:
    try:
        tar = tarfile.open(path, mode="r:")   # plain tar only: members are read by seeking to their offset
    except tarfile.ReadError as exc:
        raise DatasetError(f"{path}: not an uncompressed tar ({exc}); WebDataset shards must be plain .tar") from None
    with tar:
        members = [m for m in tar.getmembers() if m.isfile()]
    samples: dict[str, dict[str, tarfile.TarInfo]] = defaultdict(dict)
    for m in members:
        folder, _, name = m.name.rpartition("/")
        stem, dot, ext = name.partition(".")
        if dot and not stem.startswith("_"):
            samples[f"{folder}/{stem}" if folder else stem][ext.lower()] = m
    stamp = _stamp(path)
    out = []
    for key, parts in samples.items():
        image = next((parts[e] for e in _IMAGE_EXTS if e in parts), None)
        if image is None:
            out.append(Item(key, str(path), stamp=stamp, error=f"{rel}: sample {key!r} has no image member "
                                                               f"(has {', '.join(sorted(parts))})"))
        else:
            out.append(Item(key, str(path), offset=image.offset_data, size=image.size, stamp=stamp))
    return out


def _parquet_items(path: Path, rel: str, image_column: str, key_column: str | None) -> list[Item]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:   # pyarrow raises ArrowInvalid/OSError for a file that is not Parquet
        raise DatasetError(f"{path}: not a readable Parquet file ({exc})") from None
    if image_column not in schema.names:
        raise DatasetError(f"{path}: no image column {image_column!r} (columns: {', '.join(schema.names)}); "
                           f"pass --image-column")
    if key_column is not None and key_column not in schema.names:
        raise DatasetError(f"{path}: no key column {key_column!r} (columns: {', '.join(schema.names)})")
    column = key_column or next((c for c in ("__key__", "key") if c in schema.names), None)
    stamp = _stamp(path)
    if column is None:
        rows = pq.ParquetFile(path).metadata.num_rows
        keys = [f"{rel}:{i}" for i in range(rows)]
    else:
        keys = [str(k) for k in pq.read_table(path, columns=[column]).column(column).to_pylist()]
    return [Item(k, str(path), row=i, stamp=stamp) for i, k in enumerate(keys)]


# ----------------------------------------------------------------------------- reading (workers)

def _parquet_cells(path: str, rows: Sequence[int], image_column: str) -> list[Any]:
    """The image cells of ``rows`` of one Parquet file, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    starts = np.cumsum([0] + [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)])
    groups = sorted({int(np.searchsorted(starts, r, side="right")) - 1 for r in rows})
    table = f.read_row_groups(groups, columns=[image_column])
    offsets = {g: int(starts[g]) for g in groups}
    first = {g: sum(f.metadata.row_group(h).num_rows for h in groups if h < g) for g in groups}
    column = table.column(image_column)
    cells = []
    for r in rows:
        g = int(np.searchsorted(starts, r, side="right")) - 1
        cell = column[first[g] + r - offsets[g]].as_py()
        cells.append(cell.get("bytes") if isinstance(cell, dict) else cell)
    return cells


def read_images(items: Sequence[Item], size: int, image_column: str = "image"
                ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read, decode and center-crop ``items`` to the model size, recording failures per item.

    Returns:
        pixels uint8 [B, size, size, 3] (zeros where an item failed), original (width, height) int32 [B, 2]
        (0 where it failed), and one error message per item ("" where it was read).
    """
    pixels = np.zeros((len(items), size, size, 3), dtype=np.uint8)
    dims = np.zeros((len(items), 2), dtype=np.int32)
    errors = [it.error for it in items]
    cells: dict[int, Any] = {}
    by_file: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        if it.row >= 0 and not it.error:
            by_file[it.path].append(i)
    for path, idx in by_file.items():
        try:
            cells.update(zip(idx, _parquet_cells(path, [items[i].row for i in idx], image_column)))
        except Exception as exc:   # an unreadable file fails its rows, not the job
            for i in idx:
                errors[i] = f"{path}: cannot read row {items[i].row} ({type(exc).__name__}: {exc})"
    for i, it in enumerate(items):
        if errors[i]:
            continue
        try:
            if it.row >= 0:
                data = cells[i]
                if not data:
                    raise ImageError(f"{it.key}: empty image cell in {it.path} row {it.row}")
            else:
                with open(it.path, "rb") as f:
                    f.seek(max(it.offset, 0))
                    data = f.read(it.size)
            rgb = decode_image(data, f"{it.key} ({Path(it.path).name})")
            dims[i] = (rgb.shape[1], rgb.shape[0])
            pixels[i] = resize_center_crop(rgb, size)
        except _READ_ERRORS as exc:
            errors[i] = str(exc) if isinstance(exc, ImageError) else f"{it.key}: {type(exc).__name__}: {exc}"
    return pixels, dims, errors


# ----------------------------------------------------------------------------- shards

@dataclass(frozen=True)
class Shard:
    """A deterministic group of items: its name hashes the job identity and every item's key and stamp."""

    index: int
    name: str
    items: tuple[Item, ...]


def plan_shards(items: Sequence[Item], shard_size: int, identity: str) -> list[Shard]:
    """Consecutive groups of ``shard_size`` items (already sorted by key), named ``part-{i:05d}-{hash}``.

    ``identity`` is what else decides a shard's content (tokenizer fingerprint, engine, precision): a
    different model writes differently named shards. Raises DatasetError for a shard size under 1.
    """
    if shard_size < 1:
        raise DatasetError(f"shard size must be >= 1, got {shard_size}")
    shards = []
    for index, start in enumerate(range(0, len(items), shard_size)):
        part = tuple(items[start:start + shard_size])
        h = hashlib.sha256(identity.encode())
        for it in part:
            h.update(f"\0{it.key}\0{it.stamp}\0{it.error}".encode())
        shards.append(Shard(index, f"part-{index:05d}-{h.hexdigest()[:12]}", part))
    return shards
