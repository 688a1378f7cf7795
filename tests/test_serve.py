"""``v2flow-rt serve`` on Triton (PyTriton), started on free loopback ports and driven with tritonclient over
HTTP and gRPC: results equal the in-process pipeline, dynamic batching forms batches, bad requests get
errors while the server stays up, and it stops within seconds."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from dataset_fixtures import kill_session, make_images, python_env

pytest.importorskip("pytriton", reason="serving needs the [serve] extra (nvidia-pytriton)")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

HOST = "127.0.0.1"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind((HOST, 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def server(default_export, tmp_path_factory):
    """The server in its own process (as a user runs it), with a 20 ms batching window."""
    root = tmp_path_factory.mktemp("serve")
    http, grpc, metrics = _free_ports(3)
    ready = root / "ready.json"
    cmd = [sys.executable, "-m", "v2flow_rt.cli", "serve", str(default_export), "--host", HOST, "--http-port",
           str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--queue-delay-us", "20000",
           "--ready-file", str(ready)]
    log = open(root / "serve.log", "w")
    proc = subprocess.Popen(cmd, env=python_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if not ready.exists():
        proc.kill()
        pytest.fail(f"server did not come up: {(root / 'serve.log').read_text()[-3000:]}")
    info = json.loads(ready.read_text())
    assert oct(ready.stat().st_mode & 0o777) == "0o600"            # it holds the access token
    yield {"proc": proc, "http": f"{HOST}:{http}", "grpc": f"{HOST}:{grpc}", "token": info["access_token"],
           "log": root / "serve.log"}
    if proc.poll() is None:
        proc.kill()
    kill_session(proc.pid)
    log.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[bytes]:
    files = make_images(tmp_path_factory.mktemp("serve_images"), n=64, seed=1)
    return [v for k, v in sorted(files.items()) if not k.startswith("bad/")]


@pytest.fixture(scope="module")
def pipe(default_export):
    from v2flow_rt.pipeline import V2FlowPipeline

    return V2FlowPipeline.from_pretrained(default_export, threads=1)


def _bytes_input(module, data: list[bytes]):
    inp = module.InferInput("image", [len(data), 1], "BYTES")
    inp.set_data_from_numpy(np.array([[d] for d in data], dtype=object))
    return inp


def _ids_input(module, ids: np.ndarray, dtype: str = "INT64"):
    inp = module.InferInput("ids", list(ids.shape), dtype)
    inp.set_data_from_numpy(ids)
    return inp


def _seed_input(module, seeds: list[int]):
    inp = module.InferInput("seed", [len(seeds), 1], "INT64")
    inp.set_data_from_numpy(np.array(seeds, dtype=np.int64)[:, None])
    return inp


def _batch_counts(client, model: str, token: str, at_least: int, wait_s: float = 10.0) -> dict[int, int]:
    """{batch size: executions} from Triton's statistics for `model`.

    Triton records a batch's statistics once the backend has finished it, which can be after its responses
    reached the client (CI once read 48 of 64 requests right after the last answer): read again, for at most
    `wait_s`, until they cover `at_least` requests.
    """
    deadline = time.monotonic() + wait_s
    while True:
        stats = client.get_inference_statistics(model, headers={"triton-access-token": token})
        batches = {int(b["batch_size"]): int(b["compute_infer"]["count"])
                   for b in stats["model_stats"][0]["batch_stats"]}
        if sum(size * count for size, count in batches.items()) >= at_least or time.monotonic() > deadline:
            return batches
        time.sleep(0.1)


def test_concurrent_requests_equal_the_in_process_pipeline_and_are_batched(server, images, pipe) -> None:
    from v2flow_rt.data import decode_image

    want = pipe.tokenize([decode_image(d, "x") for d in images])         # [64, N]
    http = httpclient.InferenceServerClient(server["http"], concurrency=32)
    grpc = grpcclient.InferenceServerClient(server["grpc"])
    assert http.is_server_live() and http.is_server_ready() and grpc.is_server_ready()
    assert all(http.is_model_ready(m) for m in ("tokenize", "detokenize", "reconstruct"))

    # 64 requests in flight at once: even ones over HTTP (gevent pool), odd ones over gRPC (callbacks)
    got: dict[int, np.ndarray] = {}
    pending = {i: http.async_infer("tokenize", [_bytes_input(httpclient, [images[i]])])
               for i in range(0, len(images), 2)}
    done = threading.Semaphore(0)

    def on_grpc(i: int, result, error) -> None:
        got[i] = error if error is not None else result.as_numpy("ids")[0]
        done.release()
    for i in range(1, len(images), 2):
        grpc.async_infer("tokenize", [_bytes_input(grpcclient, [images[i]])], callback=partial(on_grpc, i))
    got.update({i: req.get_result().as_numpy("ids")[0] for i, req in pending.items()})
    for _ in range(len(images) // 2):
        assert done.acquire(timeout=120)
    np.testing.assert_array_equal(np.stack([got[i] for i in range(len(images))]), want)

    batches = _batch_counts(http, "tokenize", server["token"], at_least=len(images))
    assert sum(size * count for size, count in batches.items()) >= len(images), batches
    assert max(batches) > 1, batches                                     # the dynamic batcher grouped requests

    # decoding: each request on its own seed, whatever it is batched with
    ids = want[:3]
    requests = [http.async_infer("detokenize", [_ids_input(httpclient, ids[i:i + 1]), _seed_input(httpclient, [i + 7])])
                for i in range(3)]
    rec = grpc.infer("reconstruct", [_bytes_input(grpcclient, images[:2]), _seed_input(grpcclient, [3, 4])])
    results = [r.get_result() for r in requests]
    for i in range(3):
        np.testing.assert_array_equal(results[i].as_numpy("image")[0], pipe.detokenize(ids[i:i + 1], seed=i + 7)[0])
    np.testing.assert_array_equal(rec.as_numpy("ids"), want[:2])
    for j in range(2):
        np.testing.assert_array_equal(rec.as_numpy("image")[j], pipe.detokenize(want[j:j + 1], seed=3 + j)[0])
    http.close()
    grpc.close()


def test_bad_requests_get_errors_and_the_server_answers_afterwards(server, images, pipe) -> None:
    http = httpclient.InferenceServerClient(server["http"])
    grpc = grpcclient.InferenceServerClient(server["grpc"])
    n = pipe.config.num_tokens
    good = np.zeros((1, n), dtype=np.int64)
    bad_range = good.copy()
    bad_range[0, 3] = pipe.config.codebook_size
    cases = [
        (http, "detokenize", [_ids_input(httpclient, good.astype(np.float32), "FP32")], "FP32"),
        (grpc, "detokenize", [_ids_input(grpcclient, good[:, :-1])], "ids"),
        (http, "detokenize", [_ids_input(httpclient, bad_range)], "request 0: 'ids' must be in \\[0, 4096\\)"),
        (grpc, "tokenize", [_bytes_input(grpcclient, [b"not an image"])], "request 0 item 0 'image'"),
        (http, "tokenize", [_ids_input(httpclient, good)], "unexpected inference input 'ids'"),
    ]
    for client, model, inputs, needle in cases:
        with pytest.raises(InferenceServerException, match=needle):
            client.infer(model, inputs)
    assert http.is_server_ready()
    got = grpc.infer("tokenize", [_bytes_input(grpcclient, images[:1])]).as_numpy("ids")
    from v2flow_rt.data import decode_image
    np.testing.assert_array_equal(got, pipe.tokenize(decode_image(images[0], "x")))
    http.close()
    grpc.close()


def test_the_server_stops_cleanly_within_seconds(server) -> None:
    proc = server["proc"]
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    rc = proc.wait(timeout=30)
    elapsed = time.monotonic() - t0
    assert rc == 0 and elapsed < 15, (rc, elapsed, Path(server["log"]).read_text()[-2000:])
    for address in (server["http"], server["grpc"]):                  # nothing listens there any more
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((HOST, int(address.rsplit(":", 1)[1])), timeout=2).close()
