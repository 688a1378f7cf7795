"""``v2flow-rt`` command line: one thin function per verb; the work happens in the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import V2FlowError

BASE_LM = Path(__file__).resolve().parent / "assets" / "base_lm"


def _cmd_train(a: argparse.Namespace) -> int:
    import torch

    from .config import V2FlowConfig, get_preset
    from .llm.base_lm import load_embedding_table
    from .reference.train import TrainSettings, train

    config = V2FlowConfig.from_file(a.config) if a.config else get_preset(a.preset)
    embed = torch.from_numpy(load_embedding_table(a.llm)) if a.llm else None
    settings = TrainSettings(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                             max_minutes=a.max_minutes, threads=a.threads, ema_decay=a.ema_decay,
                             warmup=a.warmup, schedule=a.schedule)
    final = train(config, a.out, settings, llm_embed=embed, resume=not a.no_resume)
    print(f"saved {final}")
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    from .reference.evaluate import evaluate

    report = evaluate(a.model, per_image=a.per_image, seed=a.seed, grid_png=a.grid, temperature=a.temperature,
                      steps=a.steps, solver=a.solver)
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0


def _cmd_reconstruct(a: argparse.Namespace) -> int:
    from .reference.evaluate import reconstruct_file

    psnr = reconstruct_file(a.model, a.image, a.out, seed=a.seed, side_by_side=a.side_by_side,
                            temperature=a.temperature)
    print(f"wrote {a.out} (PSNR {psnr:.2f} dB against the resized input)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="v2flow-rt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a V2Flow model on the built-in photos")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--config", help="a config.json instead of a preset")
    p.add_argument("--out", required=True, help="output folder (train_state.pt, final/)")
    p.add_argument("--llm", default=str(BASE_LM), help="LM folder or .pt/.safetensors with the embedding table")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop and save after this wall time")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing train_state.pt")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="PSNR/SSIM on the held-out photos against the token-grid baseline")
    p.add_argument("--model", default="default")
    p.add_argument("--per-image", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--solver", default=None)
    p.add_argument("--grid", help="also write a PNG grid: originals, grid baseline, reconstructions")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("reconstruct", help="tokenize and decode one image")
    p.add_argument("image")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--side-by-side", action="store_true", help="write input and reconstruction side by side")
    p.set_defaults(func=_cmd_reconstruct)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[Any], int] = args.func
    try:
        return func(args)
    except V2FlowError as exc:
        print(f"v2flow-rt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
