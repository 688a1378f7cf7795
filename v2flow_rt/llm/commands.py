"""The LLM verbs of the ``v2flow-rt`` command line: ``train-llm``, ``export-llm``, ``generate``.

``cli.build_parser`` calls ``add_commands``; each verb is a thin function over the library.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
from pathlib import Path

BASE_LM = Path(__file__).resolve().parent.parent / "assets" / "base_lm"


def _cmd_train_llm(a: argparse.Namespace) -> int:
    from .train import LLMTrainSettings, train_llm

    settings = LLMTrainSettings(steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup,
                                prompt_drop=a.prompt_drop, crops_per_subject=a.crops_per_subject, seed=a.seed,
                                max_minutes=a.max_minutes, threads=a.threads)
    final = train_llm(a.lm, a.model, a.out, settings, resume=not a.no_resume)
    print(f"saved {final}")
    if a.bundle:
        bundle(final, Path(a.bundle), _command_line("train-llm", a))
        print(f"bundled into {a.bundle}")
    return 0


def _command_line(verb: str, a: argparse.Namespace) -> str:
    """The parsed options as one ``v2flow-rt`` command (every option spelled out, defaults included)."""
    parts = ["v2flow-rt", verb]
    for key, value in vars(a).items():
        if key in ("func", "command") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return shlex.join(parts)


def bundle(final: Path, dest: Path, command: str) -> None:
    """Copy a trained ``final/`` folder to ``dest`` with a README.md recording the command that made it."""
    from ..fileio import staged_folder

    record = json.loads((final / "training.json").read_text(encoding="utf-8"))
    with staged_folder(dest) as tmp:
        shutil.copytree(final, tmp, dirs_exist_ok=True)
        (tmp / "README.md").write_text(
            "# Bundled text-to-image LM\n\n"
            "The base LM (`assets/base_lm`) with V2Flow's visual tokens added to its vocabulary and fine-tuned on\n"
            "(caption, crop) pairs of the built-in training photos (captions: `v2flow_rt/llm/captions.py`).\n"
            "`training.json` holds the settings, steps and captions; `v2flow.json` the visual-token layout, the\n"
            "sha256 of the V2Flow weights it was trained with and the fingerprint of their tokenizer (resampler,\n"
            "LLM table, codebook), which the decoder it is used with must match (`assets/default`).\n\n"
            f"Made with ({record.get('trained_steps')} steps, {record.get('minutes')} min):\n\n"
            f"```\n{command}\n```\n", encoding="utf-8")


def _cmd_export_llm(a: argparse.Namespace) -> int:
    from .export import export_llm
    from .t2i import resolve_lm_path

    manifest = export_llm(resolve_lm_path(a.lm), a.out, precisions=tuple(a.precisions), threads=a.threads)
    data = json.loads(manifest.read_text(encoding="utf-8"))
    for name, v in data["variants"].items():
        tf = v["teacher_forced"]
        print(f"{name}: {v['file']} {v['bytes'] / 1e6:.1f} MB; vs fp32: greedy token agreement "
              f"{v['token_agreement']:.3f}, teacher-forced KL {tf['kl_nats']:.4f} nats, "
              f"top-1 {tf['top1_agreement']:.3f}")
    print(f"wrote {manifest}")
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    import numpy as np

    from ..data import save_grid, save_image
    from .generate import GenerationSettings
    from .t2i import TextToImage

    t2i = TextToImage.from_pretrained(a.lm, a.model, backend=a.backend, precision=a.precision,
                                      decoder_onnx=a.decoder_onnx, threads=a.threads)
    settings = GenerationSettings(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, cfg_scale=a.cfg)
    rows = []
    for i in range(a.num):
        seed = a.seed + i
        rows.append(t2i(a.prompt, seed=seed, settings=settings, temperature=a.decoder_temperature)[0])
    if a.num == 1:
        save_image(a.out, rows[0])
    else:
        save_grid(a.out, [rows])
    print(f"wrote {a.out} ({a.num} image(s) of {a.prompt!r}, {a.backend}, seeds {a.seed}..{a.seed + a.num - 1}; "
          f"mean colour {np.mean(np.stack(rows), axis=(0, 1, 2)).round(1).tolist()})")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the LLM verbs on the ``v2flow-rt`` subparsers."""
    from .t2i import GENERATION_DECODER_TEMPERATURE

    p = sub.add_parser("train-llm", help="fine-tune an LM to write V2Flow visual tokens from captions")
    p.add_argument("--lm", default=str(BASE_LM), help="a causal LM folder (expanded first unless it has v2flow.json)")
    p.add_argument("--model", default="default", help="the V2Flow model whose tokenizer makes the targets")
    p.add_argument("--out", required=True, help="output folder (expanded/, train_state.pt, final/)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--prompt-drop", type=float, default=0.1, help="probability of the empty prompt (for CFG)")
    p.add_argument("--crops-per-subject", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop and save after this wall time")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing train_state.pt")
    p.add_argument("--bundle", help="also copy final/ here with a README.md recording this command")
    p.set_defaults(func=_cmd_train_llm)

    p = sub.add_parser("export-llm", help="export an expanded LM to ONNX (fp32, fp16, int8) with quality figures")
    p.add_argument("--lm", default="default", help="expanded LM folder ('default': the bundled t2i LM)")
    p.add_argument("--out", required=True)
    p.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "int8", "int8-block"])
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_export_llm)

    p = sub.add_parser("generate", help="text → LLM visual tokens → V2Flow decoder → image")
    p.add_argument("prompt")
    p.add_argument("--out", required=True, help="output image (a row of images when --num > 1)")
    p.add_argument("--lm", default="default", help="expanded, trained LM folder ('default': bundled)")
    p.add_argument("--model", default="default", help="the V2Flow model folder the LM was trained on")
    p.add_argument("--backend", choices=["torch", "ort"], default="torch")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8", "int8-block"], default="fp32",
                   help="LLM graph variant (ort)")
    p.add_argument("--decoder-onnx", help="a V2Flow export folder for --backend ort (default: cached export)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num", type=int, default=1, help="images, with seeds seed, seed+1, …")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="0: greedy; with --cfg 3, 0.8 followed prompts best of those measured on the bundled LM")
    p.add_argument("--decoder-temperature", type=float, default=GENERATION_DECODER_TEMPERATURE,
                   help="the V2Flow decoder's ODE noise scale (1: a sample of the fine detail, as the official "
                        "sampler draws it; 0: the smooth, most likely image)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--cfg", type=float, default=3.0,
                   help="classifier-free guidance scale on the LLM logits (1: off)")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=_cmd_generate)
