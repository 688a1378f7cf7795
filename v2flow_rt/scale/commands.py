"""The scale-out verbs of the ``v2flow-rt`` command line: ``tokenize-dataset``, ``detokenize-dataset``,
``serve``, ``triton-repo``. ``cli.build_parser`` calls ``add_commands``; each verb is a thin function."""

from __future__ import annotations

import argparse
import json


def _engine(a: argparse.Namespace) -> dict[str, object]:
    return {"backend": a.backend, "precision": a.precision, "threads": a.threads, "batch_size": a.batch_size,
            "concurrency": a.concurrency, "cpus_per_actor": a.cpus_per_actor, "num_gpus": a.num_gpus,
            "ray_address": a.ray_address, "num_cpus": a.num_cpus, "progress": not a.quiet}


def _cmd_tokenize_dataset(a: argparse.Namespace) -> int:
    from .ray_jobs import tokenize_dataset

    s = tokenize_dataset(a.src, a.model, a.out, fmt=a.format, image_column=a.image_column, key_column=a.key_column,
                         shard_size=a.shard_size, overwrite=a.overwrite, **_engine(a))  # type: ignore[arg-type]
    print(f"{a.out}: {s['rows']} row(s) and {s['errors']} error(s) written in {s['shards_written']} shard(s); "
          f"{s['shards_skipped']} of {s['shards']} shard(s) were already complete ({s['seconds']:.1f} s)")
    return 0


def _cmd_detokenize_dataset(a: argparse.Namespace) -> int:
    from .ray_jobs import detokenize_dataset

    sampling = {k: v for k, v in {"steps": a.steps, "solver": a.solver, "cfg": a.cfg,
                                  "temperature": a.temperature}.items() if v is not None}
    s = detokenize_dataset(a.src, a.model, a.out, seed=a.seed, sampling=sampling, **_engine(a))  # type: ignore[arg-type]
    print(f"{a.out}: {s['written']} image(s) written, {s['errors']} error(s), {s['skipped']} already there "
          f"({s['seconds']:.1f} s)")
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from ..fileio import atomic_write_text
    from .serve import run_server

    def ready(info: dict[str, object]) -> None:
        if a.ready_file:                  # holds the access token: created readable by its owner only
            path = Path(a.ready_file)
            atomic_write_text(path, json.dumps(info), mode=0o600)   # whole or absent, never half

    return run_server(a.model, host=a.host, http_port=a.http_port, grpc_port=a.grpc_port,
                      metrics_port=a.metrics_port, precision=a.precision, threads=a.threads, max_batch=a.max_batch,
                      queue_delay_us=a.queue_delay_us, instances=a.instances,
                      access_token=os.environ.get("V2FLOW_SERVE_TOKEN"), exit_timeout_s=a.exit_timeout, ready=ready)


def _cmd_triton_repo(a: argparse.Namespace) -> int:
    from .triton_repo import write_repository

    models = write_repository(a.model, a.out, stages=a.stages.split(",") if a.stages else None,
                              precision=a.precision, platform=a.platform, queue_delay_us=a.queue_delay_us)
    print(json.dumps({"repository": a.out, "models": models}, indent=1))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the scale-out verbs on the ``v2flow-rt`` subparsers."""
    def ray_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("src")
        p.add_argument("--model", required=True, help="export folder (manifest.json)")
        p.add_argument("--out", required=True)
        p.add_argument("--backend", default="ort", choices=["ort", "ort-cuda", "ort-tensorrt", "trt"])
        p.add_argument("--precision", default="fp32")
        p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per actor")
        p.add_argument("--batch-size", type=int, default=16, help="images per map_batches call")
        p.add_argument("--concurrency", type=int, default=1, help="actors (V2FlowPipelines) in the pool")
        p.add_argument("--cpus-per-actor", type=float, default=None,
                       help="Ray CPUs per actor (default: leave one CPU for the read tasks, at most 1 each)")
        p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (GPU backends)")
        p.add_argument("--ray-address", default=None,
                       help="a running Ray cluster ('auto', ray://HOST:10001); default: start a local instance")
        p.add_argument("--num-cpus", type=float, default=None, help="CPUs of the local instance (default: all)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("tokenize-dataset", help="tokenize an image dataset to Parquet shards on Ray Data")
    ray_args(p)
    p.add_argument("--format", default="auto", choices=["auto", "images", "parquet", "webdataset"])
    p.add_argument("--image-column", default="image", help="Parquet column with the image bytes")
    p.add_argument("--key-column", default=None, help="Parquet column with the keys (default: __key__ or key)")
    p.add_argument("--shard-size", type=int, default=1024, help="images per output shard")
    p.add_argument("--overwrite", action="store_true", help="replace what another job left in --out")
    p.set_defaults(func=_cmd_tokenize_dataset)

    p = sub.add_parser("detokenize-dataset", help="decode a tokenize-dataset output to PNG files on Ray Data")
    ray_args(p)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--solver", choices=["euler", "heun", "dpm++2m"], default=None)
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="job seed; each image uses a seed from it and its key")
    p.set_defaults(func=_cmd_detokenize_dataset, batch_size=4)

    p = sub.add_parser("serve", help="serve tokenize / detokenize / reconstruct on Triton (PyTriton)")
    p.add_argument("model", help="export folder (manifest.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per model instance")
    p.add_argument("--max-batch", type=int, default=16, help="largest batch Triton's dynamic batcher forms")
    p.add_argument("--queue-delay-us", type=int, default=2000, help="how long the batcher waits to fill a batch")
    p.add_argument("--instances", type=int, default=1, help="model instances (threads) per model")
    p.add_argument("--exit-timeout", type=int, default=5, help="seconds in-flight requests get on shutdown")
    p.add_argument("--ready-file", help="write the endpoints and the statistics access token here (JSON) once "
                                        "every model is loaded (token: $V2FLOW_SERVE_TOKEN, else a random one)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("triton-repo", help="write a Triton model repository of an export's graphs")
    p.add_argument("model", help="export folder (manifest.json)")
    p.add_argument("--out", required=True, help="repository folder")
    p.add_argument("--stages", default=None, help="comma-separated graphs (default: the one-call graphs)")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--platform", default="onnxruntime_onnx", choices=["onnxruntime_onnx", "tensorrt_plan"])
    p.add_argument("--queue-delay-us", type=int, default=2000)
    p.set_defaults(func=_cmd_triton_repo)
