"""Quality figures of an export folder through the runtime pipeline: per precision, tokenizer id agreement
and decoder-path PSNR on held-out photo crops, and the one-call graphs against the stage loop.

Floor 4 (beside ``pipeline.py``, which it drives); ``export.folder`` calls it, ``export.onnx`` never does.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ParityError
from ..manifest import Manifest
from ..pipeline import V2FlowPipeline
from .parity import FP32_MAX_REL, compare_output, fp32_tolerance, gate_fp32, tie_mask

if TYPE_CHECKING:
    from ..reference.model import V2Flow


def measure_quality(folder: Path, model: V2Flow, images: np.ndarray, settings: Any, seed: int = 0,
                    ) -> dict[str, dict[str, Any]]:
    """Per precision: tokenizer id agreement with the fp32 graph and decoder-path PSNR vs the originals.

    The decoder path is the runtime's own: ``V2FlowPipeline.from_pretrained(folder, backend="ort",
    precision=...)`` tokenizes ``images`` (held-out photo crops [B,3,H,W] in [-1,1]) and detokenizes the
    ids with ``settings``' solver and steps (the fused ODE graph) and the same ``seed`` for every precision.
    The fp32 entry also records PyTorch's PSNR on the same path, its id agreement with PyTorch, how many
    of the disagreeing ids are not ties, and the fraction of tokens whose best code is tied. With one-call
    graphs, ``one_call`` holds their PSNR, their PSNR against the loop's images (same ids, orders and
    noise) and the one-call tokenize's id agreement with the stage path.
    """
    import os

    import torch

    from ..data import from_model_range
    from ..metrics import psnr
    from ..reference.stage_modules import stage_module

    manifest = Manifest.load(folder, verify=False)
    original = from_model_range(images)
    with torch.no_grad():
        enc = stage_module("codec_encode", model, manifest.spec("codec_encode"))
        dec = stage_module("codec_decode", model, manifest.spec("codec_decode"))
        latent = enc(torch.from_numpy(images))
        ids_torch = model.tokenize(latent).numpy()
        tok = stage_module("tokenizer", model, manifest.spec("tokenizer"))
        ties = tie_mask(tok, manifest.spec("tokenizer"), {"latent": latent.numpy()})
        tokens = model.sample_tokens(model.embed_ids(torch.from_numpy(ids_torch)), settings, seed=seed)
        recon_torch = dec(model.tokens_to_latent(tokens)).numpy()
    torch_psnr = psnr(from_model_range(recon_torch), original)
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or None
    out: dict[str, dict[str, Any]] = {}
    ids_fp32: np.ndarray | None = None
    psnr_fp32 = 0.0
    for precision in manifest.precisions:
        t0 = time.perf_counter()
        pipe = V2FlowPipeline.from_pretrained(folder, backend="ort", precision=precision, threads=threads)
        ids = pipe.tokenize(images, one_call=False)
        pipe.engine.release("tokenizer")    # at full size each tokenizer graph holds the 4 GB readout
        sampling = {"steps": settings.steps, "solver": settings.solver, "temperature": settings.temperature,
                    "cfg": settings.cfg_scale, "num_iter": settings.num_iter, "cfg_mode": settings.cfg_mode}
        recon = pipe.detokenize(ids, seed=seed, one_call=False, **sampling)              # uint8 [B,H,W,3]
        value = psnr(recon, original)
        if ids_fp32 is None:   # fp32 comes first
            ids_fp32, psnr_fp32 = ids, value
        fig: dict[str, Any] = {"images": int(images.shape[0]), "psnr": value, "psnr_delta_vs_fp32": value - psnr_fp32,
                               "token_agreement": float((ids == ids_fp32).mean()),
                               "seconds": time.perf_counter() - t0}
        if pipe.engine.has("detokenize") and pipe.engine.has("tokenize"):
            pipe.engine.release()           # the stage graphs' sessions, before the one-call graphs load
            ids1 = pipe.tokenize(images, one_call=True)
            pipe.engine.release("tokenize")
            recon1 = pipe.detokenize(ids, seed=seed, one_call=True, **sampling)
            fig["one_call"] = {"psnr": psnr(recon1, original), "psnr_vs_loop": psnr(recon1, recon),
                               "token_agreement_with_stage_path": float((ids1 == ids).mean())}
        if precision == "fp32":
            fig["token_agreement_pytorch"] = float((ids == ids_torch).mean())
            # flips among (near-)duplicate codes are ties, not errors (see TIE_EPS)
            fig["token_mismatches_pytorch_untied"] = int(((ids != ids_torch) & ~ties).sum()) if ties is not None \
                else int((ids != ids_torch).sum())
            fig["tied_token_fraction"] = float(ties.mean()) if ties is not None else 0.0
            fig["psnr_pytorch"] = torch_psnr
        out[precision] = fig
        pipe.engine.release()
        del pipe
    return out


# ----------------------------------------------------------------------------- one call vs the stage path

def one_call_rows(m: Manifest, rng: np.random.Generator, bounds: dict[str, float]) -> list[dict[str, Any]]:
    """Per precision: the one-call ``tokenize`` against the stage path's ids (exact) and the one-call
    ``detokenize`` against the sampling loop over the stage graphs of the same precision, fed the same ids,
    orders and noise (fp32 gated at ``FP32_MAX_REL`` or the stage's round-off bound; the others recorded)."""
    rows: list[dict[str, Any]] = []
    cfg = m.config
    ids = rng.integers(0, cfg.codebook_size, (2, cfg.num_tokens), dtype=np.int64)
    images = rng.uniform(-1, 1, (2, 3, cfg.img_size, cfg.img_size)).astype(np.float32)
    seed = int(rng.integers(0, 2**31))
    for precision in m.precisions:
        pipe = V2FlowPipeline.from_pretrained(m.folder or ".", backend="ort", precision=precision, verify=False)
        gated = precision == "fp32"
        eng = pipe.engine
        if eng.has("tokenize") and eng.has("tokenizer") and eng.has("codec_encode"):
            ids_one = pipe.tokenize(images, one_call=True)
            eng.release("tokenize")         # one 4 GB readout at a time at full size
            fig = compare_output(ids_one, pipe.tokenize(images, one_call=False))
            eng.release("tokenizer")
            ok = fig["mismatches"] == 0 or not gated
            rows.append({"stage": "tokenize", "precision": precision, "runner": "vs-stages", "output": "ids", **fig,
                         "ok": ok, "tolerance": "exact ids of the stage path" if gated else "recorded only"})
        if eng.has("detokenize") and eng.has("mar_step"):
            attrs = eng.spec("detokenize").attrs
            kw = {"steps": attrs["steps"], "solver": attrs["solver"], "num_iter": attrs["num_iter"],
                  "cfg_mode": attrs["cfg_mode"], "temperature": attrs["temperature"],
                  "cfg": (cfg.cfg_scale if cfg.cfg_scale != 1.0 else 3.0) if attrs["guided"] else 1.0}
            one = pipe.detokenize(ids, seed=seed, output="float", one_call=True, **kw)
            loop = pipe.detokenize(ids, seed=seed, output="float", one_call=False, **kw)
            fig = compare_output(one, loop)
            bound = bounds.get("images", FP32_MAX_REL)
            row = {"stage": "detokenize", "precision": precision, "runner": "vs-loop", "output": "images", **fig,
                   "tolerance": fp32_tolerance(bound) if gated else "recorded only (judged by quality figures)"}
            try:
                if gated:
                    gate_fp32("detokenize", "images", fig, "one call vs the loop", bound)
                row["ok"] = True
            except ParityError as exc:
                row["ok"], row["error"] = False, str(exc)
            rows.append(row)
    return rows
