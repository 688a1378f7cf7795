"""The C++ clients on an export's AOTInductor packages, checked against ONNX Runtime's one-call graphs of the
same export: ids identical, images within 1e-4 of their largest value (both clipped to [-1, 1]). Each client
is one process that loads its package and runs once on held-out photo crops; its wall time and peak RSS are
recorded (one run: a record of what it takes, not a benchmark).

    v2flow-rt init --preset base-256 --out runs/base256 --randomize-zero-layers
    v2flow-rt export runs/base256 --out runs/base256_aoti --stages tokenize,detokenize --aoti
    cmake -S cpp -B build/cpp -DCMAKE_PREFIX_PATH="$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
    cmake --build build/cpp -j2
    python benchmarks/cpp_full_size.py --export runs/base256_aoti --build build/cpp --json docs/cpp_full_size.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _client(*args: Any) -> dict[str, Any]:
    """Run one client under ``/usr/bin/time``: its wall time and peak RSS; SystemExit on a failure."""
    start = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", *map(str, args)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{Path(str(args[0])).name} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(int(r.stderr.strip().splitlines()[-1]) / 2**20, 1)}


def main() -> None:
    import onnxruntime as ort
    from PIL import Image

    from v2flow_rt.data import HELDOUT_PHOTOS, eval_crops, from_model_range
    from v2flow_rt.fileio import atomic_write_text
    from v2flow_rt.manifest import Manifest
    from v2flow_rt.sampling import seeded_randomness

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", required=True, help="export folder written with --aoti")
    ap.add_argument("--build", required=True, help="the cmake build folder of cpp/")
    ap.add_argument("--images", type=int, default=2, help="held-out photo crops (one per photo)")
    ap.add_argument("--seed", type=int, default=7, help="seed of the orders and noise")
    ap.add_argument("--json", help="write the record here")
    a = ap.parse_args()
    m = Manifest.load(a.export, verify=False)
    spec = m.spec("detokenize")
    attrs = spec.attrs
    _, n, c = next(t.shape for t in spec.inputs if t.name == "noise")
    crops = eval_crops(HELDOUT_PHOTOS, m.config.img_size, per_image=1, scale=1.0)[:a.images]
    rec: dict[str, Any] = {"export": str(a.export), "images": len(crops), "seed": a.seed,
                           "default_cfg_scale": m.config.cfg_scale, "export_timings_s": m.timings,
                           "package_parity": m.parity.get("aoti"),
                           "package_bytes": {s: m.package_path(s).stat().st_size for s in ("tokenize", "detokenize")}}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        ppms = []
        for i, im in enumerate(from_model_range(crops)):
            Image.fromarray(im).save(tmp / f"{i}.ppm")
            ppms.append(tmp / f"{i}.ppm")
        build = Path(a.build)
        rec["v2flow-tokenize"] = _client(build / "v2flow-tokenize", m.package_path("tokenize"),
                                         "--out", tmp / "ids.npy", *ppms)
        ids = np.load(tmp / "ids.npy")
        session = ort.InferenceSession(str(m.path("tokenize", "fp32")), providers=["CPUExecutionProvider"])
        ref_ids = session.run(None, {"images": crops})[0]
        del session
        rec["v2flow-tokenize"].update(mismatches=int((ids != ref_ids).sum()), ids=int(ids.size),
                                      distinct=int(np.unique(ids).size))
        orders, noise = seeded_randomness(a.seed, len(ids), int(n), int(c), int(attrs["num_iter"]))
        np.save(tmp / "orders.npy", orders)
        np.save(tmp / "noise.npy", noise)
        rec["v2flow-detokenize"] = _client(build / "v2flow-detokenize", m.package_path("detokenize"),
                                           "--ids", tmp / "ids.npy", "--orders", tmp / "orders.npy",
                                           "--noise", tmp / "noise.npy", "--out", tmp / "images.npy")
        got = np.load(tmp / "images.npy")
        session = ort.InferenceSession(str(m.path("detokenize", "fp32")), providers=["CPUExecutionProvider"])
        feeds = {"ids": ids, "orders": orders, "noise": noise}
        if attrs["guided"]:
            feeds["cfg_scale"] = np.array([m.config.cfg_scale], np.float32)
        ref = np.clip(session.run(None, feeds)[0], -1, 1)
        rec["v2flow-detokenize"]["max_rel"] = float(np.abs(got - ref).max() / np.abs(ref).max())
    print(json.dumps(rec, indent=1))
    ok = rec["v2flow-tokenize"]["mismatches"] == 0 and rec["v2flow-detokenize"]["max_rel"] <= 1e-4
    if a.json:
        atomic_write_text(a.json, json.dumps(rec, indent=1) + "\n")
    if not ok:
        raise SystemExit("the C++ clients disagree with ONNX Runtime's one-call graphs (see above)")


if __name__ == "__main__":
    main()
