"""``v2flow-rt`` command line: one thin function per verb; the work happens in the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cli_checks import add_debug_flag, run_command
from .errors import ConfigError

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
                             warmup=a.warmup, schedule=a.schedule, aux_recon=a.aux_recon,
                             tokenizer_steps=a.tokenizer_steps, aux_context=a.aux_context,
                             colour_aug=a.colour_aug)
    final = train(config, a.out, settings, llm_embed=embed, resume=not a.no_resume)
    print(f"saved {final}")
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    from .evaluate import evaluate, evaluate_colour

    run = evaluate_colour if a.suite == "colour" else evaluate
    report = run(a.model, backend=a.backend, precision=a.precision, per_image=a.per_image, seed=a.seed,
                 grid_png=a.grid, photos=a.photos, images=a.images, scale=a.scale, steps=a.steps,
                 solver=a.solver, cfg=a.cfg, temperature=a.temperature)
    if a.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        if key == "variants":
            for v in value:
                print(f"  {v['name']:>16}: psnr {v['psnr']:.2f} dB, ssim {v['ssim']:.3f}, grid baseline "
                      f"{v['grid_baseline_psnr']:.2f} dB, gain {v['psnr_gain_db']:+.2f} dB")
        else:
            print(f"{key}: {value}")
    return 0


def _pipeline(a: argparse.Namespace) -> Any:
    from .pipeline import V2FlowPipeline

    # This process is the command's own: ONNX Runtime flushes denormals (2-9 % faster; see OrtEngine).
    fast: dict[str, Any] = {"flush_denormals": True} if a.backend.startswith("ort") else {}
    return V2FlowPipeline.from_pretrained(a.model, backend=a.backend, precision=a.precision, threads=a.threads,
                                          **fast)


def _sampling(a: argparse.Namespace) -> dict[str, Any]:
    return {"steps": a.steps, "solver": a.solver, "cfg": a.cfg, "seed": a.seed, "temperature": a.temperature}


def _cmd_tokenize(a: argparse.Namespace) -> int:
    from .ids import save_ids

    ids = _pipeline(a).tokenize(a.images)
    path = save_ids(a.out, ids, a.images)
    print(f"wrote {path}: {ids.shape[0]} image(s) x {ids.shape[1]} tokens")
    return 0


def _cmd_detokenize(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .data import save_image
    from .ids import load_ids

    ids = load_ids(a.ids)                                                       # [B, L]
    pipe = _pipeline(a)
    out = Path(a.out)
    for i in tqdm(range(len(ids)), desc="detokenize", disable=len(ids) < 2):
        image = pipe.detokenize(ids[i:i + 1], **_sampling(a))[0]
        target = out if len(ids) == 1 else out.parent / f"{out.stem}_{i:03d}{out.suffix or '.png'}"
        save_image(target, image)
    print(f"wrote {len(ids)} image(s) to {out if len(ids) == 1 else out.parent}")
    return 0


def _cmd_reconstruct(a: argparse.Namespace) -> int:
    from .data import load_image, resize_center_crop, save_grid, save_image
    from .metrics import psnr

    pipe = _pipeline(a)
    src = resize_center_crop(load_image(a.image), pipe.config.img_size)
    rec = pipe.reconstruct(src, **_sampling(a))[0]
    if a.side_by_side:
        save_grid(a.out, [[src, rec]])
    else:
        save_image(a.out, rec)
    print(f"wrote {a.out} (PSNR {psnr(src, rec):.2f} dB against the center-cropped input, {pipe.engine.describe()})")
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    from .bench import plot, run_bench
    from .fileio import atomic_write_text

    report = run_bench(a.model, a.export, precisions=tuple(a.precisions.split(",")),
                       torch_modes=tuple(a.torch_modes.split(",")) if a.torch_modes else (), batch=a.batch,
                       repeat=a.repeat, threads=a.threads, steps=a.steps, split=a.split,
                       flush_denormals=not a.keep_denormals)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(a.json, json.dumps(report, indent=2))
    if a.plot:
        plot(report, a.plot)
    if report["machine"]["load"]["warning"]:
        print(f"warning: {report['machine']['load']['warning']}", file=sys.stderr)
    for name, r in report["results"].items():
        print(f"{name:>16}: detokenize {r['detokenize']['median_ms']:8.1f} ms ({r['detokenize_speedup']:.2f}x)  "
              f"tokenize {r['tokenize']['median_ms']:7.2f} ms ({r['tokenize_speedup']:.2f}x)")
        if "detokenize_split" in r:
            sp = r["detokenize_split"]
            print(f"{'':>16}  one-call detokenize graph: {sp['matmul_nodes']} matmul nodes {sp['matmul_ms']:.1f} ms, "
                  f"the other {sp['other_nodes']} nodes {sp['without_matmuls_ms']:.1f} ms")
    print(f"a decode is {report['flops']['detokenize'] / 1e9:.2f} GFLOP of matmuls: at ONNX Runtime's fp32 MatMul rate "
          f"here ({report['matmul_peak']['ort_gflops']:.0f} GFLOP/s) at least {report['detokenize_floor_ms']:.1f} ms")
    return 0


def _cmd_build(a: argparse.Namespace) -> int:
    from .engines.trt import TrtEngine

    for precision in a.precisions.split(","):
        plans = TrtEngine(a.folder, precision).build()
        print(f"{precision}: {len(plans)} TensorRT plan(s) in {plans[0].parent if plans else a.folder}")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    precisions = tuple(p.strip() for p in a.precisions.split(",") if p.strip())
    path = run_demo(a.out, a.model, precisions=precisions, repeat=a.repeat, threads=a.threads, steps=a.steps,
                    export=a.export)
    print(f"report: {path}")
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from .export.folder import export_model

    precisions = [p.strip() for p in a.precision.split(",") if p.strip()]
    manifest = export_model(a.model, a.out, precisions=precisions, opset=a.opset, max_batch=a.max_batch,
                            progress=not a.quiet, steps=a.steps, solver=a.solver, dcae_path=a.codec, aoti=a.aoti,
                            sampler={"temperature": a.temperature, "cfg_scale": a.cfg, "num_iter": a.num_iter},
                            stages=[s.strip() for s in a.stages.split(",") if s.strip()] if a.stages else None)
    print(f"exported {len(manifest.stages)} stage(s) x {', '.join(manifest.precisions)} to {a.out}")
    for precision, q in manifest.quality.items():
        print(f"  {precision:9s} PSNR {q['psnr']:.2f} dB ({q['psnr_delta_vs_fp32']:+.3f} vs fp32), "
              f"token agreement with fp32 {q['token_agreement']:.4f}")
    for note in manifest.notes:
        print(f"  note: {note}")
    return 0


def _cmd_import_official(a: argparse.Namespace) -> int:
    from .reference.checkpoint import import_official_folder

    if a.copy_codec and not a.codec:
        raise ConfigError("--copy-codec needs --codec DCAE_DIR")
    report = import_official_folder(a.checkpoint, a.out, use_ema=a.ema, codec=a.codec, copy_codec=a.copy_codec,
                                    progress=not a.quiet)
    print(f"imported {report['entry']!r} of {a.checkpoint} (epoch {report['epoch']}): {report['config']}, "
          f"{report['parameters'] / 1e6:.1f} M parameters, into {report['folder']}")
    for key, why in report["dropped"].items():
        print(f"  dropped {key}: {why}")
    if report["codec"]:
        print(f"  codec: {report['codec']}")
    else:
        print("  codec: none recorded (pass --codec DCAE_DIR to tokenize or decode images with this model)")
    return 0


def _cmd_init(a: argparse.Namespace) -> int:
    from .reference.checkpoint import init_model_folder

    if a.copy_codec and not a.codec:
        raise ConfigError("--copy-codec needs --codec DCAE_DIR")
    folder = init_model_folder(a.preset, a.out, seed=a.seed, codec=a.codec, copy_codec=a.copy_codec,
                               randomize=a.randomize_zero_layers)
    print(f"wrote a randomly initialised {a.preset} model (seed {a.seed}) to {folder}")
    return 0


def _cmd_validate(a: argparse.Namespace) -> int:
    from .export.validate import validate_folder

    report = validate_folder(a.folder, json=a.json)
    print(report)
    if not report.ok:
        print(f"v2flow-rt validate: error: {len(report.failures)} check(s) failed in {a.folder}", file=sys.stderr)
        return 1
    return 0


def default_backend(model: str) -> str:
    """The backend a verb uses when ``--backend`` is not given: ONNX Runtime for an export folder (what the
    folder is for), PyTorch for a model folder or ``default``."""
    return "ort" if (Path(model) / "manifest.json").is_file() else "torch"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="v2flow-rt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def engine_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="default",
                       help="model folder or 'default' (torch backends); export folder (ort, trt backends)")
        p.add_argument("--backend", default=None, choices=["ort", "ort-cuda", "ort-tensorrt", "trt", "torch",
                                                           "torch-compile", "torch-cudagraph"],
                       help="default: ort for an export folder (it has manifest.json), else torch")
        p.add_argument("--precision", default="fp32")
        p.add_argument("--threads", type=int, default=None)

    def sampling_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--steps", type=int, default=None, help="ODE steps (default: the model's)")
        p.add_argument("--solver", choices=["euler", "heun", "dpm++2m"], default=None)
        p.add_argument("--cfg", type=float, default=None, help="guidance scale (1 = none)")
        p.add_argument("--temperature", type=float, default=None, help="scale of the initial noise")
        p.add_argument("--seed", type=int, default=0)

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
    p.add_argument("--aux-recon", action="store_true",
                   help="add a code→token reconstruction loss (a training-only head)")
    p.add_argument("--tokenizer-steps", type=int, default=0,
                   help="train only the tokenizer (through the --aux-recon head) for this many steps, then "
                        "freeze it and train only the decoder (0: joint training throughout)")
    p.add_argument("--aux-context", type=int, default=0, metavar="BLOCKS",
                   help="make the --aux-recon head see each code's neighbours: this many 3x3 residual conv "
                        "blocks over the token grid (0: a per-token linear map)")
    p.add_argument("--colour-aug", type=float, default=0.0, metavar="P",
                   help="recolour this fraction of training crops (hue over the whole circle, saturation, "
                        "value, colour temperature; 0: the photos' own colours)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="PSNR/SSIM on the held-out photos against the token-grid baseline")
    engine_args(p)
    sampling_args(p)
    p.add_argument("--images", nargs="+", metavar="PATH", help="your own image files or folders instead")
    p.add_argument("--photos", nargs="+", metavar="NAME",
                   help="built-in photos instead of the held-out ones (chelsea, grace_hopper)")
    p.add_argument("--scale", type=float, default=0.5, help="downscale each image by this before cropping")
    p.add_argument("--per-image", type=int, default=8, help="crops per image (an even grid over it)")
    p.add_argument("--grid", help="also write a PNG grid: originals, grid baseline, reconstructions (colour "
                                  "suite: each variant's originals and reconstructions)")
    p.add_argument("--suite", choices=("standard", "colour"), default="standard",
                   help="colour: the same crops under eight hue rotations over the circle and a saturation "
                        "boost; each variant's PSNR/SSIM and gain over its grid baseline, the worst and the mean")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("tokenize", help="images → visual token ids (.npy or .json)")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True)
    engine_args(p)
    p.set_defaults(func=_cmd_tokenize)

    p = sub.add_parser("detokenize", help="token ids (.npy/.json) → images")
    p.add_argument("ids")
    p.add_argument("--out", required=True)
    engine_args(p)
    sampling_args(p)
    p.set_defaults(func=_cmd_detokenize)

    p = sub.add_parser("bench", help="benchmark every backend against PyTorch in one run")
    p.add_argument("--model", default="default")
    p.add_argument("--export", help="export folder (ONNX Runtime backends); omitted: torch only")
    p.add_argument("--precisions", default="fp32,fp16,int8,int8-qdq")
    p.add_argument("--torch-modes", default="torch,torch-compile")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="ODE steps of the decode (default: the model's)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--plot", help="write a PNG chart here")
    p.add_argument("--split", action="store_true",
                   help="also time each ONNX Runtime one-call detokenize graph without its matmul nodes "
                        "(where its time goes)")
    p.add_argument("--keep-denormals", action="store_true",
                   help="every backend computes with denormal floats (default: all flush them to zero)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("build", help="build (or reuse cached) TensorRT plans for an export folder")
    p.add_argument("folder")
    p.add_argument("--precisions", default="fp32")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("demo", help="export, validate, benchmark and reconstruct the bundled default model")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--model", default="default", help="model folder (a DC-AE model with its codec) or 'default'")
    p.add_argument("--precisions", default="fp32,fp16,int8,int8-qdq")
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: the model's)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--export", default=None, help="an existing export folder of this model to use instead of "
                                                   "exporting anew")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("reconstruct", help="tokenize and decode one image")
    p.add_argument("image")
    p.add_argument("--out", required=True)
    p.add_argument("--side-by-side", action="store_true", help="write input and reconstruction side by side")
    engine_args(p)
    sampling_args(p)
    p.set_defaults(func=_cmd_reconstruct)

    p = sub.add_parser("export", help="export a model to ONNX graphs (validated, with a manifest)")
    p.add_argument("model", help="model folder or 'default'")
    p.add_argument("--out", required=True, help="export folder (replaced only once the new export succeeded)")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32,fp16,int8,int8-qdq")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="ODE steps baked into the fused ODE graphs "
                   "(default: the model's)")
    p.add_argument("--solver", choices=["euler", "heun", "dpm++2m"], default=None,
                   help="solver of the fused ODE graphs (default: the model's)")
    p.add_argument("--temperature", type=float, default=None, help="noise scale baked into the one-call "
                   "detokenize graph (default: the model's)")
    p.add_argument("--cfg", type=float, default=None, help="guidance of the one-call detokenize graph: 1 bakes an "
                   "unguided graph, anything else a guided one taking cfg_scale as input (default: the model's)")
    p.add_argument("--num-iter", type=int, default=None, help="masked-AR iterations of the one-call graph")
    p.add_argument("--codec", metavar="DCAE_DIR", help="DC-AE codec folder for a model that records none")
    p.add_argument("--stages", help="comma-separated subset of the stages (default: all)")
    p.add_argument("--aoti", action="store_true", help="also write the one-call graphs as AOTInductor packages "
                   "(tokenize.pt2, detokenize.pt2) for the C++ clients in cpp/")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("import-official", help="an official V2Flow checkpoint-last.pth → a model folder")
    p.add_argument("checkpoint", help="the official training code's checkpoint-last.pth")
    p.add_argument("--out", required=True, help="model folder to write (config.json, model.safetensors)")
    p.add_argument("--ema", action="store_true", help="import model_ema instead of the raw weights (model)")
    p.add_argument("--codec", metavar="DCAE_DIR", help="local diffusers AutoencoderDC folder (config.json + "
                   "safetensors), e.g. dc-ae-f32c32-sana-1.1-diffusers; referenced by its path")
    p.add_argument("--copy-codec", action="store_true", help="copy the codec folder into the model as codec/")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_import_official)

    p = sub.add_parser("init", help="a randomly initialised model folder of a preset (official sizes included)")
    p.add_argument("--preset", required=True, help="tiny or base|large|huge-256|512|1024")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codec", metavar="DCAE_DIR",
                   help="DC-AE codec folder (default for DC-AE presets: a tiny random one, copied in as codec/)")
    p.add_argument("--copy-codec", action="store_true", help="copy --codec into the model as codec/")
    p.add_argument("--randomize-zero-layers", action="store_true",
                   help="also fill the zero-initialised layers (adaLN, velocity output) so no stage outputs zeros")
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("validate", help="re-run the parity checks of an export folder")
    p.add_argument("folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_validate)

    from .llm.commands import add_commands as add_llm_commands  # train-llm, export-llm, generate
    add_llm_commands(sub)
    from .scale.commands import add_commands as add_scale_commands  # tokenize-dataset, serve, triton-repo, ...
    add_scale_commands(sub)
    add_debug_flag(parser, sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "backend" in vars(args) and args.backend is None:     # engine_args' default depends on --model
        args.backend = default_backend(args.model)
    func: Callable[[Any], int] = args.func
    return run_command(func, args)     # options checked first; a user's error is one line and exit 2


if __name__ == "__main__":
    sys.exit(main())
