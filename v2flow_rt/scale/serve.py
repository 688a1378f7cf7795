"""``v2flow-rt serve``: tokenize / detokenize / reconstruct on Triton Inference Server through PyTriton
(``pip install 'v2flow-rt[serve]'``; PyTriton bundles the server binary).

Models (``N`` tokens, images ``S``×``S``; the leading batch axis is Triton's, up to ``max_batch``):

| model | inputs | outputs |
|---|---|---|
| ``tokenize`` | ``image`` BYTES [1]: an encoded image file (PNG, JPEG, ...; any size and mode) | ``ids`` INT64 [N] |
| ``detokenize`` | ``ids`` INT64 [N], optional ``seed`` INT64 [1] (default 0) | ``image`` UINT8 [S, S, 3] |
| ``reconstruct`` | ``image`` BYTES [1], optional ``seed`` INT64 [1] | ``image`` UINT8 [S, S, 3], ``ids`` INT64 [N] |

Triton's dynamic batcher groups concurrent requests into one execution, and each execution runs as one
engine batch. A request's result does not depend on what it was batched with: ids are per image, and
``detokenize`` draws each request's orders and noise from its own seed (``batch_detokenize``), so an image
equals ``V2FlowPipeline.detokenize(ids, seed=seed)`` of that request alone.

Triton itself refuses a request of the wrong dtype or shape, naming the input. Values are checked here
(ids within the codebook, image bytes that decode): PyTriton 0.7 answers an execution with one error for
all its requests, so a bad request fails the batch it was grouped with, and the error names the request.
"""

from __future__ import annotations

import os
import signal
import sys
import sysconfig
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..data import decode_image
from ..errors import ServingError, ShapeError
from ..sampling import seeded_randomness

MODELS = ("tokenize", "detokenize", "reconstruct")


def _split(values: Sequence[np.ndarray], counts: Sequence[int]) -> list[np.ndarray]:
    """Items of every request, flattened → one array per request (its own leading batch axis)."""
    bounds = np.cumsum([0, *counts])
    return [np.stack(values[bounds[i]:bounds[i + 1]]) for i in range(len(counts))]


def _images(requests: Sequence[Any]) -> tuple[list[np.ndarray], list[int]]:
    """Decode every item's ``image`` bytes ([b, 1] per request); ImageError naming the request and item."""
    out, counts = [], []
    for i, req in enumerate(requests):
        cells = np.asarray(req["image"]).reshape(-1)
        counts.append(len(cells))
        for j, raw in enumerate(cells):
            out.append(decode_image(bytes(raw), f"request {i} item {j} 'image'"))
    return out, counts


def _seeds(requests: Sequence[Any], counts: Sequence[int]) -> list[int]:
    seeds: list[int] = []
    for req, count in zip(requests, counts):
        given = np.asarray(req.data["seed"]).reshape(-1) if "seed" in req.data else np.zeros(count, np.int64)
        seeds += [int(s) for s in given]
    return seeds


def batch_detokenize(pipe: Any, ids: np.ndarray, seeds: Sequence[int], **sampling: Any) -> np.ndarray:
    """ids [B, N] → images [B, S, S, 3] in one batched call, image i exactly ``pipe.detokenize(ids[i:i+1],
    seed=seeds[i])``: each seed's orders and noise are drawn alone (``seeded_randomness``), then stacked."""
    cfg = pipe.config
    num_iter = sampling.get("num_iter") or cfg.num_iter
    drawn = [seeded_randomness(int(s), 1, cfg.num_tokens, cfg.token_dim, num_iter) for s in seeds]
    orders = np.concatenate([o for o, _ in drawn])                                 # [B, N]
    noise = np.concatenate([z for _, z in drawn])                                  # [B, N, C]
    return pipe.detokenize(ids, orders=orders, noise=noise, **sampling)


def infer_functions(pipe: Any) -> dict[str, Callable[[list[Any]], list[dict[str, np.ndarray]]]]:
    """The three models' infer callables over one ``V2FlowPipeline``: a list of requests (each with its own
    leading batch axis) in, one response dict per request out. Raises ShapeError / ImageError naming the
    request whose values are wrong."""
    n, k = pipe.config.num_tokens, pipe.config.codebook_size

    def tokenize(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        images, counts = _images(requests)
        ids = pipe.tokenize(images)                                           # [sum b, N] in one engine batch
        return [{"ids": part} for part in _split(list(ids), counts)]

    def check_ids(requests: list[Any]) -> tuple[list[np.ndarray], list[int]]:
        rows, counts = [], []
        for i, req in enumerate(requests):
            block = np.asarray(req["ids"]).reshape(-1, n)                      # Triton checked [b, N] int64
            if block.size and (block.min() < 0 or block.max() >= k):
                raise ShapeError(f"request {i}: 'ids' must be in [0, {k}), got values in "
                                 f"[{block.min()}, {block.max()}]")
            rows += list(block)
            counts.append(len(block))
        return rows, counts

    def decode(ids: Sequence[np.ndarray], seeds: Sequence[int]) -> list[np.ndarray]:
        return list(batch_detokenize(pipe, np.stack(ids), seeds))

    def detokenize(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        rows, counts = check_ids(requests)
        return [{"image": part} for part in _split(decode(rows, _seeds(requests, counts)), counts)]

    def reconstruct(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        images, counts = _images(requests)
        ids = list(pipe.tokenize(images))
        out = _split(decode(ids, _seeds(requests, counts)), counts)
        return [{"image": img, "ids": part} for img, part in zip(out, _split(ids, counts))]

    return {"tokenize": tokenize, "detokenize": detokenize, "reconstruct": reconstruct}


def _tensors(pipe: Any) -> dict[str, tuple[list[Any], list[Any]]]:
    from pytriton.model_config import Tensor

    n, s = pipe.config.num_tokens, pipe.config.img_size
    image_in = Tensor(name="image", dtype=np.bytes_, shape=(1,))
    seed = Tensor(name="seed", dtype=np.int64, shape=(1,), optional=True)
    ids = Tensor(name="ids", dtype=np.int64, shape=(n,))
    image_out = Tensor(name="image", dtype=np.uint8, shape=(s, s, 3))
    return {"tokenize": ([image_in], [ids]), "detokenize": ([ids, seed], [image_out]),
            "reconstruct": ([image_in, seed], [image_out, ids])}


def _libdir_on_loader_path() -> None:
    """Triton's Python-backend stub links libpython3.x.so from the loader path; point it at this interpreter's
    own (a venv over another build of Python would otherwise load a mismatching one, and the models fail
    with "'_thread.RLock' object has no attribute '_recursion_count'")."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
        if libdir not in paths:
            os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *paths])


def _no_sigterm_traceback() -> None:
    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt   # PyTriton's serve() stops the server cleanly on KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)


def run_server(export_dir: str, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
               metrics_port: int = 8002, precision: str = "fp32", threads: int | None = 1, max_batch: int = 16,
               queue_delay_us: int = 2000, instances: int = 1, access_token: str | None = None,
               exit_timeout_s: int = 5, ready: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Serve the export on Triton until SIGINT/SIGTERM; return 0 after a clean stop.

    ``instances`` pipelines per model serve executions in parallel. On a stop, in-flight requests get
    ``exit_timeout_s`` to finish (Triton's default, 30 s, also waits that long for idle keep-alive clients).
    ``access_token`` guards Triton's statistics, model-repository and similar endpoints (PyTriton makes a
    random one when None); ``ready`` is called with the endpoints and token once every model is loaded.
    Raises ServingError without PyTriton.
    """
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig
        from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig
    except ImportError as exc:
        raise ServingError(f"serving needs PyTriton: pip install 'v2flow-rt[serve]' ({exc})") from None
    from ..pipeline import V2FlowPipeline

    _libdir_on_loader_path()
    _no_sigterm_traceback()
    pipes = [V2FlowPipeline.from_pretrained(export_dir, precision=precision, threads=threads)
             for _ in range(max(1, instances))]
    config = TritonConfig(http_address=host, http_port=http_port, grpc_address=host, grpc_port=grpc_port,
                          metrics_address=host, metrics_port=metrics_port, exit_on_error=True,
                          exit_timeout_secs=exit_timeout_s)
    security = TritonSecurityConfig(access_token=access_token)
    batcher = DynamicBatcher(max_queue_delay_microseconds=queue_delay_us)
    tensors = _tensors(pipes[0])
    with Triton(config=config, security_config=security) as triton:
        for name in MODELS:
            inputs, outputs = tensors[name]
            fns = [infer_functions(p)[name] for p in pipes]
            triton.bind(model_name=name, infer_func=fns if len(fns) > 1 else fns[0], inputs=inputs,
                        outputs=outputs, config=ModelConfig(max_batch_size=max_batch, batcher=batcher), strict=True)
        if ready is not None:
            ready({"host": host, "http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port,
                   "models": list(MODELS), "access_token": triton.get_access_token()})
        print(f"v2flow-rt serve: {', '.join(MODELS)} on http://{host}:{http_port} and grpc {host}:{grpc_port} "
              f"(max batch {max_batch}, {len(pipes)} instance(s)); Ctrl-C stops", file=sys.stderr, flush=True)
        triton.serve()
    return 0

