"""tokenize-dataset / detokenize-dataset: the sources, the shard plan and the output folder without Ray; the
job itself on a local Ray instance (2 CPUs, in a private network namespace) against single-process
``V2FlowPipeline`` calls."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from dataset_fixtures import (
    CORRUPT,
    PYTHON,
    in_netns,
    kill_session,
    make_images,
    netns_available,
    python_env,
    write_parquet,
    write_tars,
)

from v2flow_rt.data import load_image, resize_center_crop
from v2flow_rt.errors import DatasetError
from v2flow_rt.scale.sources import list_items, plan_shards, read_images
from v2flow_rt.scale.store import prepare_output

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    files = make_images(root / "tree")
    write_parquet(files, root / "parquet" / "data.parquet")
    write_tars(files, root / "wds")
    return root, files


# ----------------------------------------------------------------------------- without Ray

def test_the_three_source_formats_give_the_same_pixels_and_errors(dataset) -> None:
    root, files = dataset
    fmt, tree = list_items(root / "tree")
    assert fmt == "images" and [it.key for it in tree] == sorted(files)
    # reference: the pipeline's own file reader on each path
    pixels, dims, errors = read_images(tree, 64)
    for i, it in enumerate(tree):
        if it.key in CORRUPT:
            assert errors[i] and it.key in errors[i]
        else:
            ref = load_image(root / "tree" / it.key)
            assert not errors[i] and tuple(dims[i]) == (ref.shape[1], ref.shape[0])
            np.testing.assert_array_equal(pixels[i], resize_center_crop(ref, 64))
    for sub, want in (("parquet", "parquet"), ("wds", "webdataset")):
        fmt, items = list_items(root / sub)
        assert fmt == want and len(items) == len(files)
        got = dict(zip((it.key for it in items), zip(*read_images(items, 64))))
        for i, it in enumerate(tree):
            key = it.key if want == "parquet" else it.key.rsplit(".", 1)[0]   # WebDataset keys drop the extension
            p, d, e = got[key]
            np.testing.assert_array_equal(p, pixels[i])
            assert tuple(d) == tuple(dims[i]) and bool(e) == bool(errors[i])


def test_bad_sources_are_refused_by_name(dataset, tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, files = dataset
    with pytest.raises(DatasetError, match="no image column 'pixels'"):
        list_items(root / "parquet", image_column="pixels")
    dup = tmp_path / "dup"
    dup.mkdir()
    for name in ("a.parquet", "b.parquet"):
        pq.write_table(pa.table({"key": ["same"], "image": [b"x"]}), dup / name)
    with pytest.raises(DatasetError, match="key 'same' occurs twice"):
        list_items(dup)
    mixed = tmp_path / "mixed"
    (mixed / "x").mkdir(parents=True)
    (mixed / "x" / "a.png").write_bytes(files["photos/img_000.png"])
    pq.write_table(pa.table({"image": [b"x"]}), mixed / "t.parquet")
    with pytest.raises(DatasetError, match="cannot tell the dataset format"):
        list_items(mixed)
    with tarfile.open(tmp_path / "z.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("a.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    (tmp_path / "z.tar.gz").rename(tmp_path / "z.tar")
    with pytest.raises(DatasetError, match="not an uncompressed tar"):
        list_items(tmp_path / "z.tar")
    with tarfile.open(tmp_path / "caption_only.tar", "w") as tar:
        info = tarfile.TarInfo("s1.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    _, items = list_items(tmp_path / "caption_only.tar")
    assert [it.key for it in items] == ["s1"] and "no image member" in items[0].error


def test_shard_names_depend_on_inputs_and_tokenizer_only(dataset) -> None:
    root, _ = dataset
    _, items = list_items(root / "tree")
    a, b = plan_shards(items, 8, "tok-A"), plan_shards(items, 8, "tok-A")
    assert [s.name for s in a] == [s.name for s in b] and len(a) == 8
    assert sum(len(s.items) for s in a) == len(items)
    other = plan_shards(items, 8, "tok-B")
    assert not {s.name for s in a} & {s.name for s in other}
    touched = items[10]
    os.utime(touched.path, ns=(time.time_ns(), time.time_ns() + 10**9))
    _, again = list_items(root / "tree")
    changed = [x.name != y.name for x, y in zip(a, plan_shards(again, 8, "tok-A"))]
    assert changed == [i == 10 // 8 for i in range(len(a))]   # only the shard holding the touched file


def test_output_folder_of_another_job_is_refused(tmp_path) -> None:
    job = {"format": "f", "tokenizer_sha256": "aaa", "engine": "ort/fp32", "source_format": "images",
           "num_tokens": 64, "shards": ["part-00000-x", "part-00001-y"]}
    out = tmp_path / "out"
    assert prepare_output(out, job) == set()
    (out / "part-00000-x.parquet").write_bytes(b"done")
    (out / ".part-00001-y.parquet.123.tmp").write_bytes(b"half")        # what a killed run leaves
    assert prepare_output(out, job) == {"part-00000-x"}
    assert not list(out.glob(".*.tmp"))
    with pytest.raises(DatasetError, match="tokenizer_sha256 = 'aaa'"):
        prepare_output(out, job | {"tokenizer_sha256": "bbb"})
    with pytest.raises(DatasetError, match="shard.s. this job would not write"):
        prepare_output(out, job | {"shards": ["part-00000-z"]})
    assert prepare_output(out, job | {"shards": ["part-00000-z"]}, overwrite=True) == set()
    assert not (out / "part-00000-x.parquet").exists()


# ----------------------------------------------------------------------------- on Ray

ray_test = pytest.mark.skipif(not netns_available(), reason="Ray runs only inside a private network namespace "
                              "(unshare -n needs root here)")


def _reference(export: Path, tree: Path, keys: list[str]) -> np.ndarray:
    from v2flow_rt.pipeline import V2FlowPipeline

    pipe = V2FlowPipeline.from_pretrained(export, threads=1)
    return pipe.tokenize([tree / k for k in keys])


def _check_output(out: Path, files: dict[str, bytes], export: Path, tree: Path) -> dict[str, list[int]]:
    """Every key exactly once across the ids and _errors tables; ids equal single-process tokenize."""
    import pyarrow.parquet as pq

    from v2flow_rt.manifest import Manifest, tokenizer_sha256

    table = pq.read_table(out)
    errors = pq.read_table(out / "_errors")
    keys, bad = table.column("key").to_pylist(), errors.column("key").to_pylist()
    assert sorted(keys + bad) == sorted(files) and len(set(keys)) == len(keys)
    assert sorted(bad) == sorted(CORRUPT)
    assert str(table.schema.field("ids").type) == "list<element: int16>"   # 4096 codes fit int16
    ids = np.array(table.column("ids").to_pylist())
    np.testing.assert_array_equal(ids, _reference(export, tree, keys))
    assert len(np.unique(ids)) > 100                                      # real photos, not one repeated id
    fingerprint = Manifest.load(export).tokenizer_sha256
    assert set(table.column("tokenizer").to_pylist()) == {fingerprint} == {tokenizer_sha256("default")}
    for key, w, h in zip(keys[:5], table.column("width").to_pylist(), table.column("height").to_pylist()):
        assert load_image(tree / key).shape[:2] == (h, w)
    return dict(zip(keys, ids.tolist()))


def _run(cmd: list[str], log: Path, timeout: float = 240) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=python_env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    assert proc.returncode == 0, log.read_text()[-3000:]


@ray_test
def test_tokenize_dataset_resumes_after_being_killed_and_matches_single_process(dataset, default_export,
                                                                                  tmp_path) -> None:
    root, files = dataset
    out = tmp_path / "ids"
    cmd = in_netns(PYTHON, "-m", "v2flow_rt.cli", "tokenize-dataset", str(root / "tree"), "--model",
                   str(default_export), "--out", str(out), "--shard-size", "8", "--batch-size", "4", "--num-cpus",
                   "2", "--quiet")
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, env=python_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while proc.poll() is None and not list(out.glob("part-*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)                  # the driver dies mid-job, as on Ctrl-\ or an OOM kill
        proc.wait(timeout=30)
    kill_session(proc.pid)
    written = sorted(p.name for p in out.glob("part-*.parquet"))
    planned = json.loads((out / "_job.json").read_text())["shards"]
    assert proc.returncode == -signal.SIGKILL and 1 <= len(written) < len(planned), (written, planned)

    _run(cmd, tmp_path / "resumed.log")
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["shards_skipped"] == len(written) and summary["shards_written"] == len(planned) - len(written)
    assert sorted(p.stem for p in out.glob("part-*.parquet")) == sorted(planned)
    _check_output(out, files, default_export, root / "tree")
    _run(cmd, tmp_path / "again.log")                        # nothing left to do: no Ray needed, nothing rewritten
    assert json.loads((out / "_summary.json").read_text())["shards_skipped"] == len(planned)


@ray_test
def test_killing_an_actor_loses_no_rows_and_detokenize_matches_single_process(dataset, default_export,
                                                                              tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from v2flow_rt.manifest import Manifest
    from v2flow_rt.pipeline import V2FlowPipeline
    from v2flow_rt.scale.ray_jobs import image_name, seed_for

    root, files = dataset
    out, images = tmp_path / "ids", tmp_path / "images"
    keys = [k for k in sorted(files) if k not in CORRUPT][:3]
    ref_ids = _reference(default_export, root / "tree", keys)
    ref_ids[2, 5] = 4096                                                # out of range: an error row, not a crash
    fingerprint = Manifest.load(default_export).tokenizer_sha256
    (tmp_path / "few").mkdir()
    pq.write_table(pa.table({"key": keys, "ids": ref_ids.tolist(), "tokenizer": [fingerprint] * 3}),
                   tmp_path / "few" / "part-0.parquet")
    report = tmp_path / "report.json"
    _run(in_netns(PYTHON, str(TESTS / "ray_driver.py"), str(root / "parquet"), str(default_export), str(out),
                  str(tmp_path / "few"), str(images), str(report)), tmp_path / "driver.log")
    seen = json.loads(report.read_text())
    assert seen["killed"] and seen["pool_size"] == 2 and seen["killed_state"] == "DEAD"
    assert seen["done_at_kill"] < seen["total"] == len(files)          # killed while rows were still to come
    assert seen["summary"]["rows"] + seen["summary"]["errors"] == len(files)
    _check_output(out, files, default_export, root / "tree")            # Parquet keys = the tree's relative paths

    det = seen["detokenize"]
    assert (det["written"], det["errors"]) == (2, 1)
    errors = pq.read_table(images / "_errors.parquet").to_pylist()
    assert [e["key"] for e in errors] == [keys[2]] and "4096" in errors[0]["error"]
    pipe = V2FlowPipeline.from_pretrained(default_export, threads=1)
    for key, ids in zip(keys[:2], ref_ids[:2]):
        want = pipe.detokenize(ids[None], seed=seed_for(key, 0), steps=2)[0]
        np.testing.assert_array_equal(load_image(images / image_name(key)), want)
