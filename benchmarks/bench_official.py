"""Official geometry at full size (e.g. base-256: 1.39 B parameters, the 32000×32000 readout) on this CPU:
tokenize and detokenize on PyTorch eager, ONNX Runtime fp32 and ONNX Runtime int8, ratios in one run, with
each backend's peak RSS and the int8 tokenizer's id agreement with fp32 on photo crops. An export with
one-call graphs is timed both ways: one call per tokenize / detokenize, and the stage graphs with the numpy
loop (``*_loop``).

Every backend runs in its own process (so its peak RSS is its own), one after the other, on the same crops,
the same ids and the same seed. The machine's load is recorded around each process (load average, the
process's CPU time against its wall time, the CPU time other processes used meanwhile); a warning is
printed when other work competed.

    v2flow-rt init --preset base-256 --out runs/base256 --randomize-zero-layers
    v2flow-rt export runs/base256 --out runs/base256_export --precision fp32,int8
    python benchmarks/bench_official.py --model runs/base256 --export runs/base256_export \\
        --json docs/bench_official.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BACKENDS = {"torch": ("model", "torch", "fp32"), "ort-fp32": ("export", "ort", "fp32"),
            "ort-int8": ("export", "ort", "int8")}


def _crops(size: int, n: int) -> np.ndarray:
    """One resized centre crop of each built-in photo (training and held-out alike): real photo content."""
    from v2flow_rt.data import PHOTOS, fitting_crops, load_photo

    names = sorted(PHOTOS)[:n]
    return fitting_crops([load_photo(p) for p in names], size, per_image=1, scale=1.0)[0]


def worker(a: argparse.Namespace) -> None:
    """Time one backend; write its figures (and its ids) as JSON."""
    from v2flow_rt.bench import measure
    from v2flow_rt.pipeline import V2FlowPipeline
    from v2flow_rt.sampling import SamplerSettings
    from v2flow_rt.stages import ONE_CALL_STAGES

    where, backend, precision = BACKENDS[a.worker]
    t0 = time.perf_counter()
    pipe = V2FlowPipeline.from_pretrained(a.model if where == "model" else a.export, backend=backend,
                                          precision=precision, threads=a.threads)
    load_s = time.perf_counter() - t0
    cfg = pipe.config
    photos = _crops(cfg.img_size, a.agreement_images)
    ids_ref = np.load(a.ids) if a.ids else None
    out: dict[str, Any] = {"backend": a.worker, "load_s": load_s, "results": {}}
    settings = SamplerSettings.from_config(cfg)
    one_call = {s: pipe.serves_in_one_call(s, settings if s == "detokenize" else None) for s in ONE_CALL_STAGES}
    out["one_call"] = one_call
    # an export with one-call graphs is also timed through its stage graphs and the numpy loop ("_loop")
    paths = {"": None, "_loop": False} if where == "export" and any(one_call.values()) else {"": None}
    for batch in a.batches:
        images = photos[:batch]
        ids = ids_ref[:batch] if ids_ref is not None else pipe.tokenize(images)
        figs = {}
        for suffix, oc in paths.items():
            figs["tokenize" + suffix] = measure(lambda: pipe.tokenize(images, one_call=oc), 1, a.repeat)  # noqa: B023
            figs["detokenize" + suffix] = measure(
                lambda: pipe.detokenize(ids, seed=0, output="float", one_call=oc), 1, a.repeat)  # noqa: B023
        out["results"][str(batch)] = figs
    out["photo_ids"] = pipe.tokenize(photos).tolist()
    if ids_ref is not None:
        out["image"] = pipe.detokenize(ids_ref[:1], seed=0, output="float").tolist()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["peak_rss_gib"] = usage.ru_maxrss / 2**20
    out["cpu_s"] = usage.ru_utime + usage.ru_stime
    Path(a.result).write_text(json.dumps(out))


def run(a: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from v2flow_rt.machine_load import LoadMeter
    from v2flow_rt.metrics import psnr

    report: dict[str, Any] = {"model": a.model, "export": a.export, "batches": a.batches, "repeat": a.repeat,
                              "threads": a.threads, "cpus": os.cpu_count(), "backends": {}}
    with tempfile.TemporaryDirectory() as tmp:
        ids_path = Path(tmp) / "ids.npy"
        for name in tqdm(a.backends, desc="bench-official", unit="backend"):
            result = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, "--worker", name, "--model", a.model, "--export", a.export,
                   "--result", str(result), "--repeat", str(a.repeat), "--agreement-images", str(a.agreement_images),
                   "--batches", *map(str, a.batches)]
            if a.threads:
                cmd += ["--threads", str(a.threads)]
            if ids_path.is_file():
                cmd += ["--ids", str(ids_path)]
            load_before, t0 = os.getloadavg()[0], time.perf_counter()
            meter = LoadMeter().start()     # other processes' CPU, this worker excluded (it is our child)
            subprocess.run(cmd, check=True)
            wall = time.perf_counter() - t0
            r = json.loads(result.read_text())
            r["machine"] = {"loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0],
                            "wall_s": wall, "cpu_over_wall": r["cpu_s"] / wall, "load": meter.stop()}
            if not ids_path.is_file():      # the first backend's ids are every backend's detokenize input
                np.save(ids_path, np.asarray(r["photo_ids"], dtype=np.int64))
            report["backends"][name] = r
    first = a.backends[0]
    base = report["backends"][first]
    ids = {n: np.asarray(r.pop("photo_ids")) for n, r in report["backends"].items()}
    images = {n: np.asarray(r.pop("image")) for n, r in report["backends"].items() if "image" in r}
    for name, r in report["backends"].items():
        for batch, figs in r["results"].items():
            for verb in [k for k in figs if k.startswith(("tokenize", "detokenize"))]:
                ref = base["results"][batch][verb.removesuffix("_loop")]["median_ms"]
                figs[f"{verb}_speedup_vs_{first}"] = ref / figs[verb]["median_ms"]
        if "ort-fp32" in ids:
            r["id_agreement_vs_ort_fp32"] = float((ids[name] == ids["ort-fp32"]).mean())
        if first in images and name in images and name != first:
            r[f"detokenize_psnr_vs_{first}_db"] = psnr(images[name], images[first], data_range=2.0)
    # the 1-minute load average before a worker still holds the previous worker's load: judge by the CPU
    # other processes used during each worker (measured from /proc where it can be read)
    busy = [n for n, r in report["backends"].items() if r["machine"]["load"]["competing"]]
    if busy:
        print(f"warning: other work competed with {busy}: ratios may be off", file=sys.stderr)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (PyTorch eager)")
    p.add_argument("--export", required=True, help="export folder with fp32 and int8 graphs")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--agreement-images", type=int, default=16, help="photo crops for the id agreement")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--worker", choices=list(BACKENDS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    report = run(a)
    text = json.dumps(report, indent=2)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(text)
    for name, r in report["backends"].items():
        for batch, f in r["results"].items():
            for sfx in [k.removeprefix("tokenize") for k in f if k in ("tokenize", "tokenize_loop")]:
                v = f"vs_{a.backends[0]}"
                print(f"{name + sfx:14s} batch {batch}: tokenize {f['tokenize' + sfx]['median_ms']:8.0f} ms "
                      f"({f['tokenize' + sfx + '_speedup_' + v]:.2f}x)  detokenize "
                      f"{f['detokenize' + sfx]['median_ms']:8.0f} ms ({f['detokenize' + sfx + '_speedup_' + v]:.2f}x)"
                      f"  peak RSS {r['peak_rss_gib']:.1f} GiB")
        other = r["machine"]["load"].get("other_cores", r["machine"]["load"]["other_load"])
        print(f"{name:9s} ids vs ORT fp32 {r.get('id_agreement_vs_ort_fp32', float('nan')):.4f}; other processes "
              f"{other:.2f} cores, CPU/wall {r['machine']['cpu_over_wall']:.2f}")


if __name__ == "__main__":
    main()
