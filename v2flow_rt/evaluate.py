"""Reconstruction quality on the held-out photos, against what the token grid alone carries.

The grid baseline reduces each crop to one mean colour per token cell and scales it back up
bilinearly (``metrics.grid_baseline``): tokens that carried nothing beyond a colour per cell could not
beat it. Runs on any backend through ``V2FlowPipeline`` (the PyTorch reference by default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .data import HELDOUT_PHOTOS, eval_crops, from_model_range, save_grid
from .metrics import grid_baseline, psnr, ssim
from .pipeline import V2FlowPipeline
from .sampling import SamplerSettings


def evaluate(model: str | Path = "default", backend: str = "torch", precision: str = "fp32", per_image: int = 8,
             seed: int = 0, grid_png: str | None = None, **sampling: Any) -> dict[str, Any]:
    """PSNR/SSIM of reconstructions and of the grid baseline on deterministic held-out crops.

    ``sampling``: ``steps``, ``solver``, ``cfg``, ``temperature``, ``num_iter`` (default: the model's).
    """
    pipe = V2FlowPipeline.from_pretrained(model, backend=backend, precision=precision)
    cfg = pipe.config
    crops = eval_crops(list(HELDOUT_PHOTOS), cfg.img_size, per_image=per_image)      # (B, 3, H, W)
    recon = pipe.reconstruct(crops, seed=seed, **sampling)                           # (B, H, W, 3) uint8
    ref, base = from_model_range(crops), from_model_range(grid_baseline(crops, cfg.grid_size))
    if grid_png:
        save_grid(grid_png, [list(ref[:8]), list(base[:8]), list(recon[:8])],
                  labels=["original", "grid baseline", "V2Flow"])
    settings = SamplerSettings.from_config(cfg, steps=sampling.get("steps"), solver=sampling.get("solver"),
                                           cfg_scale=sampling.get("cfg"), temperature=sampling.get("temperature"),
                                           num_iter=sampling.get("num_iter"))
    report: dict[str, Any] = {
        "model": str(model), "backend": pipe.engine.backend, "precision": pipe.engine.precision,
        "photos": list(HELDOUT_PHOTOS), "images": len(crops),
        "psnr": round(psnr(ref, recon), 3), "ssim": round(ssim(ref, recon), 4),
        "grid_baseline_psnr": round(psnr(ref, base), 3), "grid_baseline_ssim": round(ssim(ref, base), 4),
        "sampler": settings.__dict__, "seed": seed,
    }
    report["psnr_gain_db"] = round(report["psnr"] - report["grid_baseline_psnr"], 3)
    nearest = from_model_range(grid_baseline(crops, cfg.grid_size, upsample="nearest"))
    report["grid_baseline_nearest_psnr"] = round(psnr(ref, nearest), 3)
    return report
