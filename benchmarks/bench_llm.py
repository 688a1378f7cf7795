"""Visual-token generation speed: the ONNX Runtime KV-cache loop vs transformers' ``generate``.

Both generate exactly N visual tokens per prompt, greedy, with the logits restricted to the visual
vocabulary (a ``LogitsProcessor`` for ``generate``, the loop's own masking for ORT), from the same
tokenized prompt + ``<boi>``: N forward passes each (prefill included). Runs are interleaved
(warm-up first) and the figure is the median over repeats of the per-repeat ratio of tokens/second, all
in one process with the same thread count for torch and ORT.

    python benchmarks/bench_llm.py [--lm default] [--threads 1] [--repeats 7] [--batch 1]

prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lm", default="default", help="expanded LM folder ('default': the bundled t2i LM)")
    parser.add_argument("--onnx", help="its export folder (default: lm/onnx or the cache, exported if missing)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", default="a photo of an astronaut")
    a = parser.parse_args(argv)

    import onnxruntime as ort
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    from v2flow_rt.llm.export import VARIANT_FILES
    from v2flow_rt.llm.generate import (
        GenerationSettings,
        OrtStep,
        PromptEncoder,
        StepFn,
        TorchStep,
        generate_visual_tokens,
    )
    from v2flow_rt.llm.generate import left_pad as pad
    from v2flow_rt.llm.t2i import llm_onnx_dir, resolve_lm_path
    from v2flow_rt.llm.vocab import VisualVocab

    torch.set_num_threads(a.threads)
    lm_dir = resolve_lm_path(a.lm)
    vocab = VisualVocab.from_dir(lm_dir)
    onnx_dir = Path(a.onnx) if a.onnx else llm_onnx_dir(lm_dir, a.threads)
    prompts = PromptEncoder(lm_dir)([a.prompt] * a.batch)
    model = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
    lo, hi = vocab.offset, vocab.offset + vocab.codebook_size

    class VisualOnly(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            out = torch.full_like(scores, -float("inf"))
            out[:, lo:hi] = scores[:, lo:hi]
            return out

    ids, mask = pad([p + [vocab.boi_id] for p in prompts], vocab.pad_id)
    hf_inputs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    greedy = GenerationSettings(temperature=0)

    def hf_generate() -> np.ndarray:
        with torch.inference_mode():
            out = model.generate(**hf_inputs, max_new_tokens=vocab.num_tokens, min_new_tokens=vocab.num_tokens,
                                 do_sample=False, pad_token_id=vocab.pad_id, eos_token_id=None,
                                 logits_processor=LogitsProcessorList([VisualOnly()]))
        return out[:, ids.shape[1]:].numpy() - lo

    def loop(step: StepFn) -> Callable[[], np.ndarray]:
        return lambda: generate_visual_tokens(step, prompts, vocab, greedy)

    runners: dict[str, Callable[[], np.ndarray]] = {"transformers_generate": hf_generate,
                                                    "torch_loop": loop(TorchStep(model))}
    for name in ("fp32", "int8", "int8-block"):
        if (onnx_dir / VARIANT_FILES[name]).is_file():
            runners[f"ort_{name}"] = loop(OrtStep.from_file(onnx_dir / VARIANT_FILES[name], a.threads))

    codes = {name: run() for name, run in runners.items()}
    for _ in range(a.warmup - 1):
        for run in runners.values():
            run()
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(a.repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    tokens = a.batch * vocab.num_tokens
    tps = {name: [tokens / s for s in values] for name, values in seconds.items()}
    ratio = {name: statistics.median(t / h for t, h in zip(tps[name], tps["transformers_generate"]))
             for name in runners if name != "transformers_generate"}
    report = {
        "lm": str(lm_dir), "onnx": str(onnx_dir), "batch": a.batch, "tokens_per_run": tokens,
        "threads": a.threads, "repeats": a.repeats,
        "tokens_per_second_median": {n: round(statistics.median(v), 1) for n, v in tps.items()},
        "median_ratio_vs_transformers_generate": {n: round(r, 2) for n, r in ratio.items()},
        "greedy_tokens_equal_to_generate": {n: bool(np.array_equal(c, codes["transformers_generate"]))
                                            for n, c in codes.items()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "onnxruntime": ort.__version__, "python": platform.python_version()},
        "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
