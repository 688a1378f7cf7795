"""Scale-out speed on this machine: tokenize-dataset (Ray Data, 1 and 2 actors) against single-process
``V2FlowPipeline.tokenize`` on the same images, and the Triton server (``v2flow-rt serve``) against
in-process calls at concurrency 1, 8 and 32. One run, one export, the machine's load recorded before and
after; every figure comes from the same process tree.

Ray runs inside a private network namespace (loopback only), so run the whole script in one:

    unshare -n sh -c 'ip link set lo up; exec python benchmarks/bench_scale.py --export EXPORT --json out.json'

``--export`` is an export folder (``v2flow-rt export default --out EXPORT``). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def bench_dataset(export: str, src: Path, work: Path, batch: int, actor_counts: list[int]) -> dict[str, Any]:
    """images/s of single-process tokenize (reading files included) and of tokenize-dataset per actor count."""
    import ray

    from v2flow_rt.pipeline import V2FlowPipeline
    from v2flow_rt.scale.ray_jobs import tokenize_dataset
    from v2flow_rt.scale.sources import list_items

    _, items = list_items(src)
    paths = [it.path for it in items]
    pipe = V2FlowPipeline.from_pretrained(export, threads=1)
    pipe.tokenize(paths[:batch])                                           # warm-up: sessions built
    t = time.perf_counter()
    for i in range(0, len(paths), batch):
        pipe.tokenize(paths[i:i + batch])
    single = len(paths) / (time.perf_counter() - t)
    out: dict[str, Any] = {"images": len(paths), "batch_size": batch, "single_process_images_per_s": round(single, 2),
                           "ray": {}}
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out["ray_init_s"] = round(time.perf_counter() - t, 2)
    for n in actor_counts:
        dest = work / f"ids_{n}"
        shutil.rmtree(dest, ignore_errors=True)
        s = tokenize_dataset(src, export, dest, batch_size=batch, concurrency=n, shard_size=256, progress=False)
        out["ray"][str(n)] = {"actors": n, "cpus_per_actor": s["cpus_per_actor"], "job_s": s["ray_seconds"],
                              "images_per_s": round(len(paths) / s["ray_seconds"], 2),
                              "vs_single_process": round(len(paths) / s["ray_seconds"] / single, 3)}
    ray.shutdown()
    return out


def _percentiles(lat: list[float], wall: float) -> dict[str, float]:
    return {"requests": len(lat), "p50_ms": round(1e3 * statistics.median(lat), 2),
            "p95_ms": round(1e3 * float(np.percentile(lat, 95)), 2), "throughput_per_s": round(len(lat) / wall, 2)}


def _closed_loop(call: Any, n_requests: int, concurrency: int) -> dict[str, float]:
    """``concurrency`` requests in flight at all times (HTTP client's gevent pool), until n_requests are done."""
    lat: list[float] = []
    t0 = time.perf_counter()
    inflight: list[tuple[float, Any]] = []
    sent = 0
    while len(lat) < n_requests:
        while sent < n_requests and len(inflight) < concurrency:
            inflight.append((time.perf_counter(), call()))
            sent += 1
        start, req = inflight.pop(0)
        req.get_result()
        lat.append(time.perf_counter() - start)
    return _percentiles(lat, time.perf_counter() - t0)


def bench_server(export: str, images: list[bytes], concurrencies: list[int], n_tokenize: int,
                 n_detokenize: int, work: Path) -> dict[str, Any]:
    """Latency and throughput of tokenize / detokenize through Triton against the same calls in-process."""
    import tritonclient.http as httpclient

    from v2flow_rt.data import decode_image
    from v2flow_rt.pipeline import V2FlowPipeline

    pipe = V2FlowPipeline.from_pretrained(export, threads=1)
    arrays = [decode_image(d, "x") for d in images]
    ids = pipe.tokenize(arrays[:16]).astype(np.int64)                    # [16, N]
    calls = {"tokenize": (lambda i: pipe.tokenize(arrays[i % len(arrays)]), n_tokenize),
             "detokenize": (lambda i: pipe.detokenize(ids[i % len(ids)][None], seed=0), n_detokenize)}
    inproc: dict[str, Any] = {}
    for name, (fn, count) in calls.items():
        fn(0)                                                              # warm-up
        lat = []
        t0 = time.perf_counter()
        for i in range(count):
            t = time.perf_counter()
            fn(i)
            lat.append(time.perf_counter() - t)
        inproc[name] = _percentiles(lat, time.perf_counter() - t0)

    port = free_port()
    ready = work / "ready.json"
    proc = subprocess.Popen([sys.executable, "-m", "v2flow_rt.cli", "serve", export, "--http-port", str(port),
                             "--grpc-port", str(free_port()), "--metrics-port", str(free_port()),
                             "--ready-file", str(ready)], stdout=open(work / "serve.log", "w"),
                            stderr=subprocess.STDOUT)
    try:
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError((work / "serve.log").read_text()[-2000:])
            time.sleep(0.2)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", concurrency=max(concurrencies))

        def tok_call(i: list[int] = [0]) -> Any:   # noqa: B006 - a counter across calls
            i[0] += 1
            inp = httpclient.InferInput("image", [1, 1], "BYTES")
            inp.set_data_from_numpy(np.array([[images[i[0] % len(images)]]], dtype=object))
            return client.async_infer("tokenize", [inp])

        def detok_call(i: list[int] = [0]) -> Any:   # noqa: B006
            i[0] += 1
            inp = httpclient.InferInput("ids", [1, ids.shape[1]], "INT64")
            inp.set_data_from_numpy(ids[i[0] % len(ids)][None])
            return client.async_infer("detokenize", [inp])

        _closed_loop(tok_call, 16, 4)                                    # warm-up
        server: dict[str, Any] = {"tokenize": {}, "detokenize": {}}
        for c in concurrencies:
            server["tokenize"][str(c)] = _closed_loop(tok_call, n_tokenize, c)
            server["detokenize"][str(c)] = _closed_loop(detok_call, max(n_detokenize, 2 * c), c)
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    for name in server:
        for r in server[name].values():
            r["throughput_vs_in_process"] = round(r["throughput_per_s"] / inproc[name]["throughput_per_s"], 3)
            r["p50_vs_in_process"] = round(r["p50_ms"] / inproc[name]["p50_ms"], 3)
    return {"in_process": inproc, "server_http": server, "server_settings": "1 instance per model, 1 ORT thread, "
            "max batch 16, queue delay 2 ms"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", required=True)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokenize-requests", type=int, default=320)
    parser.add_argument("--detokenize-requests", type=int, default=24)
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--png", help="also draw the figures here")
    a = parser.parse_args(argv)

    from dataset_fixtures import make_images

    from v2flow_rt.machine_load import LoadMeter

    meter = LoadMeter().start()     # other work moves these figures: record it, warn about it
    report: dict[str, Any] = {"load_before": _load(), "cpus": os.cpu_count(), "python": platform.python_version()}
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        work = Path(tmp)
        files = make_images(work / "tree", n=a.images, seed=3)
        for key in [k for k in files if k.startswith("bad/")]:
            (work / "tree" / key).unlink()
        images = [v for k, v in sorted(files.items()) if not k.startswith("bad/")]
        report["tokenize_dataset"] = bench_dataset(a.export, work / "tree", work, a.batch, [1, 2])
        report["serve"] = bench_server(a.export, images[:64], [1, 8, 32], a.tokenize_requests,
                                       a.detokenize_requests, work)
    report["load_after"] = _load()
    report["machine"] = meter.stop()
    if report["machine"]["warning"]:
        print(f"warning: {report['machine']['warning']}", file=sys.stderr)
    text = json.dumps(report, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    if a.png:
        plot(report, a.png)
    return report


def plot(report: dict[str, Any], png: str) -> None:
    """Left: dataset tokenization, images/s. Right: server throughput per concurrency against in-process."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data, serve = report["tokenize_dataset"], report["serve"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = ["single process"] + [f"Ray, {k} actor(s)" for k in data["ray"]]
    values = [data["single_process_images_per_s"]] + [r["images_per_s"] for r in data["ray"].values()]
    left.bar(names, values, color=["#555"] + ["#3a7"] * len(data["ray"]))
    left.set_ylabel("images / s")
    left.set_title(f"tokenize {data['images']} files (batch {data['batch_size']})")
    for model, colour in (("tokenize", "#37c"), ("detokenize", "#c63")):
        rows = serve["server_http"][model]
        conc = [int(c) for c in rows]
        right.plot(conc, [r["throughput_per_s"] for r in rows.values()], "o-", color=colour,
                   label=f"{model}: server (HTTP)")
        right.axhline(serve["in_process"][model]["throughput_per_s"], color=colour, ls="--",
                      label=f"{model}: in process")
    right.set_xscale("log", base=2)
    right.set_xticks(conc, [str(c) for c in conc])
    right.set_yscale("log")
    right.set_xlabel("concurrent requests")
    right.set_ylabel("requests / s")
    right.set_title("Triton (PyTriton) vs in-process calls")
    right.legend(fontsize=8)
    load = report.get("machine", {})
    fig.suptitle(f"{report['cpus']} CPU cores; other processes meanwhile: {load.get('other_cores', '?')} cores "
                 f"(1-min load {load.get('loadavg_start')} → {load.get('loadavg_end')}, this benchmark's included)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    main()
