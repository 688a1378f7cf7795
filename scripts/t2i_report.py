"""Prompt conditioning of a text-to-image LM, and the README grid of prompts × seeds.

For every training caption (``llm/captions.py``) and each seed, generate an image (LLM visual tokens →
V2Flow decoder) and check whether its colour statistic (``llm.t2i.image_features``: 8-bin per-channel
histogram + mean colour; k-NN distance to each subject's training crops) is nearest to its own subject.
References are the subjects' training crops as the decoder renders them (``accuracy``) and as they are
(``accuracy_vs_raw_crops``, capped by the decoder's fidelity: ``ceiling_vs_raw_crops``).
Prints one JSON object and writes the grid (first caption of each subject × seeds).

    python scripts/t2i_report.py [--lm default] [--model default] [--seeds 0 1 2 3] [--cfg 3] [--temperature 0.8]
                                 [--grid docs/t2i_grid.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lm", default="default")
    parser.add_argument("--model", default="default")
    parser.add_argument("--backend", choices=["torch", "ort"], default="torch")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    # Defaults: those of ``v2flow-rt generate``.
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--decoder-temperature", type=float, default=None,
                        help="the V2Flow decoder's (default: generation's, llm.t2i.GENERATION_DECODER_TEMPERATURE)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", default="docs/t2i_grid.png", help="'' to skip")
    parser.add_argument("--grid-seeds", type=int, default=6)
    parser.add_argument("--references", type=int, default=64, help="training crops per subject to compare with")
    a = parser.parse_args(argv)

    from v2flow_rt.data import save_grid
    from v2flow_rt.llm.captions import SUBJECTS
    from v2flow_rt.llm.generate import GenerationSettings
    from v2flow_rt.llm.t2i import TextToImage, decoder_sampling, evaluate_conditioning

    start = time.time()
    t2i = TextToImage.from_pretrained(a.lm, a.model, backend=a.backend, threads=a.threads)
    settings = GenerationSettings(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, cfg_scale=a.cfg)
    report = evaluate_conditioning(t2i, seeds=a.seeds, settings=settings, per_subject=a.references,
                                   temperature=a.decoder_temperature)
    images, refs = report.pop("images"), report.pop("references")
    decoder_temperature = decoder_sampling({"temperature": a.decoder_temperature})["temperature"]
    report.update({"lm": a.lm, "model": a.model, "backend": a.backend,
                   "settings": {"temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p, "cfg": a.cfg,
                                "decoder_temperature": decoder_temperature},
                   "statistic": "8-bin per-channel colour histogram + mean colour; mean L2 to the 5 nearest "
                                "training crops of each subject (as decoded by the V2Flow model; "
                                "'accuracy_vs_raw_crops': as they are); nearest subject wins",
                   "seconds": round(time.time() - start, 1)})
    # Per caption (images are caption-major, one per seed): the fraction of seeds whose image is nearest
    # to its own subject's training crops, as decoded and as they are.
    def per_caption(confusion: dict[str, list[str]]) -> dict[str, float]:
        n = len(a.seeds)
        return {caption: float(np.mean([p == name for p in confusion[name][i * n:(i + 1) * n]]))
                for name, (_, captions) in SUBJECTS.items() for i, caption in enumerate(captions)}

    report["per_caption"] = per_caption(report["confusion"])
    report["per_caption_vs_raw_crops"] = per_caption(report.pop("confusion_vs_raw_crops"))
    report["confusion"] = {k: {str(n): int(c) for n, c in zip(*np.unique(v, return_counts=True))}
                           for k, v in report["confusion"].items()}
    print(json.dumps(report, indent=2))
    if a.grid:
        seeds = list(range(a.grid_seeds))
        rows, labels = [], []
        for _, captions in SUBJECTS.values():
            rows.append(list(np.concatenate([t2i([captions[0]], seed=s, settings=settings,
                                                 temperature=a.decoder_temperature) for s in seeds])))
            labels.append(captions[0])
        save_grid(a.grid, rows, labels=labels)
        print(f"wrote {a.grid}", file=sys.stderr)
    del images, refs
    return report


if __name__ == "__main__":
    main()
