"""Run by test_dataset.py inside a private network namespace: one local Ray instance (2 CPUs) for
tokenize_dataset with two actors, one of which is killed with ``ray.kill`` mid-job, then
detokenize_dataset. Writes what it saw to a JSON report."""

from __future__ import annotations

import json
import sys
import time

import ray


def main(src: str, export: str, out: str, ids_src: str, images_out: str, report: str) -> None:
    from ray._private import state
    from ray._raylet import ActorID

    from v2flow_rt.scale.ray_jobs import detokenize_dataset, tokenize_dataset

    ray.init(num_cpus=2, include_dashboard=False)
    seen: dict[str, object] = {"killed": None}

    def kill_one(done: int, total: int) -> None:
        if seen["killed"] is not None:
            return
        # The first rows can come back while the pool's second actor is still being created (a loaded machine
        # starts workers slowly): wait, bounded, until both are alive, so the kill always leaves a survivor.
        start = time.monotonic()
        deadline = start + 180
        while True:
            actors = state.actors().values()
            pool = [a for a in actors if a["State"] == "ALIVE" and "_Tokenizer" in a["ActorClassName"]]
            if len(pool) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if not pool:
            raise RuntimeError(f"no live tokenizer actor among {[(a['ActorClassName'], a['State']) for a in actors]}")
        handle = ray._private.worker.global_worker.core_worker.get_actor_handle(
            ActorID(bytes.fromhex(pool[0]["ActorID"])))
        ray.kill(handle)
        seen.update(killed=pool[0]["ActorID"], done_at_kill=done, total=total, pool_size=len(pool),
                    waited_s=round(time.monotonic() - start, 2))

    summary = tokenize_dataset(src, export, out, batch_size=4, concurrency=2, cpus_per_actor=0.5, shard_size=8,
                               progress=False, on_progress=kill_one)
    after = state.actors().get(seen["killed"], {})
    seen.update(summary=summary, killed_state=after.get("State"))
    seen["detokenize"] = detokenize_dataset(ids_src, export, images_out, batch_size=2, concurrency=1,
                                            sampling={"steps": 2}, progress=False)
    with open(report, "w") as f:
        json.dump(seen, f)
    ray.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:7])
