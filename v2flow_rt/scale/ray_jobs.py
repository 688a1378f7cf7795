"""``tokenize_dataset`` / ``detokenize_dataset`` on Ray Data (``pip install 'v2flow-rt[ray]'``).

The job, the same on one machine and on a cluster:

1. the driver lists the inputs (``sources.list_items``: no image bytes are read), sorts them by key and
   cuts them into deterministically named shards; shards whose file already exists in DST are skipped;
2. Ray Data streams the rest through ``map_batches``: read + decode + center-crop in CPU tasks, then an
   actor pool of ``V2FlowPipeline``s (ORT CPU by default; ``num_gpus`` per actor for GPU backends);
3. the driver collects the ids (N int16 per image, so tiny beside the images, which never pass through
   it), and writes each shard atomically as soon as all its rows are in.

A bad image is a row of ``_errors``, not a failed job; an actor that dies is replaced by Ray Data and its
batches re-run (a row that arrives twice is kept once and counted). A job that is killed leaves whole
shards only; running it again redoes the missing ones. Ray is imported inside the functions: it is an
optional extra.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendUnavailable, DatasetError
from ..fileio import atomic_write_text
from ..manifest import Manifest, tokenizer_sha256
from .sources import Item, list_items, plan_shards, read_images
from .store import JOB_FORMAT, SUMMARY_NAME, errors_table, prepare_output, write_parquet_atomic, write_shard

Progress = Callable[[int, int], None]


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable("dataset jobs need Ray Data: pip install 'v2flow-rt[ray]'") from exc
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: float | None = None) -> Iterator[Any]:
    """Connect to ``address`` (a running cluster: ``auto`` or ``ray://host:10001``) or start a local Ray
    instance; reuse one already initialised in this process. Shuts down only what it started."""
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"address": address, "include_dashboard": False}
        if address is None and num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        ray.init(**kwargs)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False             # the driver shows one bar over images instead
        ctx.execution_options.preserve_order = True  # shards then complete (and are written) in order
        yield ray
    finally:
        if started:
            ray.shutdown()


def model_fingerprint(manifest: Manifest) -> str:
    """The export's tokenizer fingerprint; older exports fall back to hashing their source checkpoint."""
    if manifest.tokenizer_sha256:
        return manifest.tokenizer_sha256
    if manifest.source_checkpoint and Path(manifest.source_checkpoint).exists():
        return tokenizer_sha256(manifest.source_checkpoint)
    raise DatasetError(f"{manifest.folder}: the manifest records no tokenizer fingerprint and its source "
                       f"checkpoint {manifest.source_checkpoint!r} is not reachable; re-export the model")


def _cpus_per_actor(ray: Any, concurrency: int, cpus: float | None) -> float:
    """Leave one CPU of the cluster for the read tasks: on two cores, two actors at one CPU each would
    hold both and the reads would never be scheduled."""
    if cpus is not None:
        return cpus
    total = float(ray.cluster_resources().get("CPU", 1.0))
    return min(1.0, max(0.25, (total - 1.0) / concurrency))


def _pipeline(export_dir: str, backend: str, precision: str, threads: int | None) -> Any:
    from ..pipeline import V2FlowPipeline

    kwargs: dict[str, Any] = {"verify": False} if backend.startswith("ort") else {}   # the driver verified once
    return V2FlowPipeline.from_pretrained(export_dir, backend=backend, precision=precision, threads=threads,
                                          **kwargs)


def _block_rows(rows: int, batch_size: int) -> int:
    """Rows per input block: one batch, so results stream back (and shards complete) batch by batch, but
    no more than ~10000 blocks, whose scheduling would then cost more than the work."""
    return batch_size * max(1, -(-rows // (batch_size * 10000)))


def _items_table(rows: Sequence[tuple[int, Item]]) -> Any:
    import pyarrow as pa

    return pa.table({"shard": [s for s, _ in rows], "key": [it.key for _, it in rows],
                     "path": [it.path for _, it in rows], "offset": [it.offset for _, it in rows],
                     "size": [it.size for _, it in rows], "row": [it.row for _, it in rows],
                     "error": [it.error for _, it in rows]})


def _read_batch(batch: Any, size: int, image_column: str) -> dict[str, np.ndarray]:
    """Ray task: a pyarrow batch of item rows → pixels uint8 [B, S, S, 3], width, height, error."""
    d = batch.to_pydict()
    items = [Item(k, p, offset=o, size=s, row=r, error=e)
             for k, p, o, s, r, e in zip(d["key"], d["path"], d["offset"], d["size"], d["row"], d["error"])]
    pixels, dims, errors = read_images(items, size, image_column)
    return {"shard": np.asarray(d["shard"], dtype=np.int64), "key": np.asarray(d["key"], dtype=object),
            "pixels": pixels, "width": dims[:, 0], "height": dims[:, 1], "error": np.asarray(errors, dtype=object)}


class _Tokenizer:
    """Ray Data actor: one ``V2FlowPipeline`` per actor, built once, tokenizing the rows that were read."""

    def __init__(self, export_dir: str, backend: str, precision: str, threads: int | None) -> None:
        self.pipe = _pipeline(export_dir, backend, precision, threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        ids = np.zeros((len(ok), self.pipe.config.num_tokens), dtype=np.int32)   # [B, N]
        if ok.any():
            ids[ok] = self.pipe.tokenize(batch["pixels"][ok])
        return {k: batch[k] for k in ("shard", "key", "width", "height", "error")} | {"ids": ids}


def tokenize_dataset(src: str | os.PathLike[str], model: str | os.PathLike[str], out: str | os.PathLike[str], *,
                     fmt: str = "auto", image_column: str = "image", key_column: str | None = None,
                     backend: str = "ort", precision: str = "fp32", threads: int | None = 1, batch_size: int = 16,
                     concurrency: int = 1, cpus_per_actor: float | None = None, num_gpus: float = 0.0,
                     shard_size: int = 1024, ray_address: str | None = None, num_cpus: float | None = None,
                     overwrite: bool = False, attempts: int = 3, progress: bool = True,
                     on_progress: Progress | None = None) -> dict[str, Any]:
    """Tokenize every image of ``src`` into Parquet shards in ``out`` (layout: ``scale.store``).

    Args:
        src: a folder tree of images, Parquet files with ``image_column``, or WebDataset .tar shards.
        model: an export folder (``manifest.json``).
        fmt: ``auto`` (detect), ``images``, ``parquet`` or ``webdataset``.
        key_column: Parquet column with the keys (default ``__key__`` or ``key`` if present, else file:row).
        backend, precision, threads: the engine of each actor (``threads``: ONNX Runtime intra-op threads).
        batch_size: images per ``map_batches`` call; concurrency: actors in the pool.
        cpus_per_actor: Ray CPUs each actor reserves (default: leave one CPU for reading, at most 1 each).
        num_gpus: GPUs per actor (GPU backends: ``ort-cuda``, ``ort-tensorrt``, ``trt``).
        shard_size: images per output shard; ray_address: a running cluster (None: start a local one with
            ``num_cpus``); overwrite: replace what another job left in ``out``.
        attempts: Ray executions before giving up; each redoes only the shards not yet written.
        on_progress: called with (images done, images to do) after each batch reaches the driver.
    Returns:
        the run summary (also written to ``out/_summary.json``).
    Raises:
        DatasetError: bad source or output folder, rows missing at the end; ArtifactError: bad export.
    """
    t0 = time.perf_counter()
    if batch_size < 1 or concurrency < 1:
        raise DatasetError(f"batch size and concurrency must be >= 1, got {batch_size} and {concurrency}")
    manifest = Manifest.load(model)
    cfg, fingerprint = manifest.config, model_fingerprint(manifest)
    fmt, items = list_items(src, fmt, image_column, key_column)
    engine = f"{backend}/{precision}"
    shards = plan_shards(items, shard_size, f"{fingerprint}|{engine}|{cfg.num_tokens}")
    dest = Path(out)
    job = {"format": JOB_FORMAT, "source": str(Path(src).resolve()), "source_format": fmt,
           "model": str(Path(model).resolve()), "tokenizer_sha256": fingerprint, "engine": engine,
           "num_tokens": cfg.num_tokens, "codebook_size": cfg.codebook_size, "image_size": cfg.img_size,
           "shard_size": shard_size, "images": len(items), "shards": [s.name for s in shards]}
    done = prepare_output(dest, job, overwrite)
    pending = [s for s in shards if s.name not in done]
    todo = sum(len(s.items) for s in pending)
    summary: dict[str, Any] = {"images": len(items), "shards": len(shards), "shards_written": 0,
                               "shards_skipped": len(shards) - len(pending), "rows": 0, "errors": 0,
                               "retried_rows": 0, "tokenized": todo}
    if pending:
        with ray_session(ray_address, num_cpus) as ray:
            cpus = _cpus_per_actor(ray, concurrency, cpus_per_actor)
            summary |= {"actors": concurrency, "cpus_per_actor": cpus, "batch_size": batch_size,
                        "cluster_cpus": float(ray.cluster_resources().get("CPU", 0.0)), "attempts": 0}
            t_ray = time.perf_counter()
            while pending:
                summary["attempts"] += 1
                try:
                    rows = [(s.index, it) for s in pending for it in s.items]
                    step = _block_rows(len(rows), batch_size)
                    ds = ray.data.from_arrow([_items_table(rows[i:i + step]) for i in range(0, len(rows), step)])
                    ds = ds.map_batches(_read_batch, batch_size=batch_size, batch_format="pyarrow", num_cpus=0.25,
                                        fn_kwargs={"size": cfg.img_size, "image_column": image_column})
                    ds = ds.map_batches(_Tokenizer, batch_size=batch_size, batch_format="numpy", num_cpus=cpus,
                                        num_gpus=num_gpus or None,
                                        compute=ray.data.ActorPoolStrategy(size=concurrency),
                                        fn_constructor_args=(str(Path(model).resolve()), backend, precision, threads))
                    _collect(ds, pending, dest, cfg.codebook_size, fingerprint, cfg.num_tokens, summary, progress,
                             on_progress)
                except (ray.exceptions.RayError, DatasetError) as exc:
                    # The shards written so far are whole; only the rest is redone (an actor killed without
                    # restart can fail Ray Data's whole execution, e.g. ActorDiedError fetching its block).
                    pending = [s for s in pending if not (dest / f"{s.name}.parquet").is_file()]
                    if summary["attempts"] >= attempts:
                        raise DatasetError(f"tokenize-dataset gave up after {attempts} attempt(s), "
                                           f"{len(pending)} shard(s) left in {dest} (run it again to resume): "
                                           f"{type(exc).__name__}: {str(exc)[:2000]}") from exc
                    warnings.warn(f"tokenize-dataset attempt {summary['attempts']} failed "
                                  f"({type(exc).__name__}); redoing the {len(pending)} shard(s) left", stacklevel=2)
                else:
                    pending = []
            summary["ray_seconds"] = round(time.perf_counter() - t_ray, 3)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    atomic_write_text(dest / SUMMARY_NAME, json.dumps(summary, indent=1) + "\n")
    return summary


def _collect(ds: Any, pending: Sequence[Any], dest: Path, codebook_size: int, fingerprint: str, num_tokens: int,
             summary: dict[str, Any], progress: bool, on_progress: Progress | None) -> None:
    """Gather the streamed rows per shard; write a shard once all its rows are in."""
    from tqdm import tqdm

    by_index = {s.index: s for s in pending}
    keys = {s.index: {it.key for it in s.items} for s in pending}
    got: dict[int, dict[str, dict[str, Any]]] = {s.index: {} for s in pending}
    total = sum(len(k) for k in keys.values())
    seen = 0
    with tqdm(total=total, desc="tokenize-dataset", unit="img", disable=not progress) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i, key in enumerate(batch["key"]):
                shard = int(batch["shard"][i])
                if key not in keys.get(shard, ()):
                    raise DatasetError(f"row {key!r} came back for shard {shard}, which does not hold it")
                if key in got[shard]:
                    summary["retried_rows"] += 1       # a batch re-run after an actor died
                    continue
                got[shard][key] = {"key": str(key), "ids": batch["ids"][i], "width": batch["width"][i],
                                   "height": batch["height"][i], "error": str(batch["error"][i])}
                seen += 1
                if len(got[shard]) == len(keys[shard]):
                    rows = [got[shard][k] for k in sorted(got[shard])]
                    n_ok, n_bad = write_shard(dest, by_index[shard].name, rows, codebook_size, fingerprint,
                                              num_tokens)
                    summary["shards_written"] += 1
                    summary["rows"] += n_ok
                    summary["errors"] += n_bad
                    del got[shard], keys[shard]
            bar.update(len(batch["key"]))
            if on_progress is not None:
                on_progress(seen, total)
    if keys:
        missing = sorted(k for shard, ks in keys.items() for k in ks - set(got[shard]))
        raise DatasetError(f"{len(missing)} row(s) never came back from Ray (e.g. {missing[:3]}); the shards "
                           f"written so far are kept, run the job again to finish")


# ----------------------------------------------------------------------------- detokenize

def seed_for(key: str, seed: int) -> int:
    """The sampling seed of one image: from the job's seed and the key, so it does not depend on batching."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def image_name(key: str) -> str:
    """The output file of a key: ``{key}.png`` (``key`` itself if it already ends in .png)."""
    parts = Path(key).parts
    if not key or key.startswith("/") or ".." in parts:
        raise DatasetError(f"key {key!r} cannot name an output file (absolute or with '..')")
    return key if key.lower().endswith(".png") else f"{key}.png"


class _Detokenizer:
    """Ray Data actor: ids rows → PNG files in DST (written atomically by the worker)."""

    def __init__(self, export_dir: str, backend: str, precision: str, threads: int | None, out: str,
                 sampling: dict[str, Any]) -> None:
        self.pipe = _pipeline(export_dir, backend, precision, threads)
        self.out, self.sampling = Path(out), sampling

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..data import save_image
        from .serve import batch_detokenize

        cfg = self.pipe.config
        rows = [np.asarray(ids, dtype=np.int64) for ids in batch["ids"]]
        errors = ["" if len(r) == cfg.num_tokens and (r.min() >= 0 and r.max() < cfg.codebook_size) else
                  f"{key}: ids must be {cfg.num_tokens} values in [0, {cfg.codebook_size}), got {len(r)} in "
                  f"[{r.min() if len(r) else '-'}, {r.max() if len(r) else '-'}]" for key, r in zip(batch["key"], rows)]
        good = [i for i, e in enumerate(errors) if not e]
        if good:                            # one batched call; each image as if decoded alone on its seed
            images = batch_detokenize(self.pipe, np.stack([rows[i] for i in good]),
                                      [int(batch["seed"][i]) for i in good], **self.sampling)
            for i, image in zip(good, images):
                target = self.out / image_name(str(batch["key"][i]))
                target.parent.mkdir(parents=True, exist_ok=True)
                save_image(target, image)
        return {"key": batch["key"], "error": np.asarray(errors, dtype=object)}


def detokenize_dataset(src: str | os.PathLike[str], model: str | os.PathLike[str], out: str | os.PathLike[str], *,
                       backend: str = "ort", precision: str = "fp32", threads: int | None = 1, batch_size: int = 4,
                       concurrency: int = 1, cpus_per_actor: float | None = None, num_gpus: float = 0.0,
                       seed: int = 0, sampling: dict[str, Any] | None = None, ray_address: str | None = None,
                       num_cpus: float | None = None, progress: bool = True) -> dict[str, Any]:
    """Decode a ``tokenize_dataset`` output (``src``) back to one PNG per key in ``out``.

    Keys whose image already exists are skipped (resumable); rows that cannot be decoded go to
    ``out/_errors.parquet``. Each image is sampled with ``seed_for(key, seed)``. Raises DatasetError if the
    ids were made by another tokenizer than ``model``'s.
    """
    import pyarrow.dataset as pads

    t0 = time.perf_counter()
    manifest = Manifest.load(model)
    fingerprint = model_fingerprint(manifest)
    try:
        table = pads.dataset(str(src), format="parquet").to_table(columns=["key", "ids", "tokenizer"])
    except Exception as exc:   # pyarrow: not a folder of Parquet files, or columns missing
        raise DatasetError(f"{src}: not a tokenize-dataset output ({exc})") from None
    made_by = set(table.column("tokenizer").to_pylist())
    if made_by - {fingerprint}:
        raise DatasetError(f"{src}: ids were made by tokenizer(s) {sorted(x[:12] for x in made_by)}, but {model} "
                           f"decodes ids of tokenizer {fingerprint[:12]}…; use the matching export")
    dest = Path(out)
    keys, ids = table.column("key").to_pylist(), table.column("ids").to_pylist()
    todo = [(k, i) for k, i in sorted(zip(keys, ids)) if not (dest / image_name(k)).is_file()]
    summary: dict[str, Any] = {"rows": len(keys), "skipped": len(keys) - len(todo), "written": 0, "errors": 0}
    errors: list[tuple[str, str]] = []
    if todo:
        import pyarrow as pa
        from tqdm import tqdm

        with ray_session(ray_address, num_cpus) as ray:
            cpus = _cpus_per_actor(ray, concurrency, cpus_per_actor)
            step = _block_rows(len(todo), batch_size)
            tables = [pa.table({"key": [k for k, _ in todo[j:j + step]], "ids": [i for _, i in todo[j:j + step]],
                                "seed": [seed_for(k, seed) for k, _ in todo[j:j + step]]})
                      for j in range(0, len(todo), step)]
            ds = ray.data.from_arrow(tables).map_batches(
                _Detokenizer, batch_size=batch_size, batch_format="numpy", num_cpus=cpus, num_gpus=num_gpus or None,
                compute=ray.data.ActorPoolStrategy(size=concurrency),
                fn_constructor_args=(str(Path(model).resolve()), backend, precision, threads, str(dest.resolve()),
                                     sampling or {}))
            done: set[str] = set()
            with tqdm(total=len(todo), desc="detokenize-dataset", unit="img", disable=not progress) as bar:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    for key, err in zip(batch["key"], batch["error"]):
                        if key not in done:
                            done.add(str(key))
                            if err:
                                errors.append((str(key), str(err)))
                    bar.update(len(batch["key"]))
        summary["written"], summary["errors"] = len(done) - len(errors), len(errors)
    dest.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(errors_table(errors), dest / "_errors.parquet")
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    atomic_write_text(dest / SUMMARY_NAME, json.dumps(summary, indent=1) + "\n")
    return summary

