"""Reconstruction quality on the held-out photos (or any photos), against what the token grid alone carries.

The grid baseline reduces each crop to one mean colour per token cell and scales it back up
bilinearly (``metrics.grid_baseline``): tokens that carried nothing beyond a colour per cell could not
beat it. Runs on any backend through ``V2FlowPipeline`` (the PyTorch reference by default).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .data import (
    HELDOUT_PHOTOS,
    PHOTOS,
    fitting_crops,
    from_model_range,
    image_files,
    load_image,
    load_photo,
    save_grid,
)
from .errors import ImageError
from .metrics import grid_baseline, psnr, ssim
from .pipeline import V2FlowPipeline
from .sampling import SamplerSettings


def evaluate(model: str | Path = "default", backend: str = "torch", precision: str = "fp32", per_image: int = 8,
             seed: int = 0, grid_png: str | None = None, photos: Sequence[str] | None = None,
             images: Sequence[str | os.PathLike[str]] | None = None, scale: float = 0.5,
             **sampling: Any) -> dict[str, Any]:
    """PSNR/SSIM of reconstructions and of the grid baseline on deterministic crops (``data.fitting_crops``:
    the grid of crops at ``scale``, at full scale, or one resized centre crop per image for models larger
    than the images allow; the report's ``crops`` says which).

    The crops come from ``images`` (files, or folders of them) if given, else from the built-in
    ``photos`` (default: the held-out ones), each downscaled by ``scale``. ``held_out`` in the report
    says whether none of them is a photo the model was trained on (as its config records; ``None``
    when it does not record them). ``sampling``: ``steps``, ``solver``, ``cfg``, ``temperature``,
    ``num_iter`` (default: the model's).
    """
    if images:
        files = image_files(images)
        sources, arrays = [str(f) for f in files], [load_image(f) for f in files]
    else:
        names = list(photos or HELDOUT_PHOTOS)
        unknown = [n for n in names if n not in PHOTOS]
        if unknown:
            raise ImageError(f"unknown built-in photo(s) {unknown}; known: {sorted(PHOTOS)}")
        sources, arrays = names, [load_photo(n) for n in names]
    pipe = V2FlowPipeline.from_pretrained(model, backend=backend, precision=precision)
    cfg = pipe.config
    crops, cut = fitting_crops(arrays, cfg.img_size, per_image, scale, labels=sources)   # (B, 3, H, W)
    recon = pipe.reconstruct(crops, seed=seed, **sampling)                         # (B, H, W, 3) uint8
    ref, base = from_model_range(crops), from_model_range(grid_baseline(crops, cfg.grid_size))
    if grid_png:
        save_grid(grid_png, [list(ref[:8]), list(base[:8]), list(recon[:8])],
                  labels=["original", "grid baseline", "V2Flow"])
    trained_on = cfg.extra.get("train_photos")
    held_out = None if images or not isinstance(trained_on, list) else not set(sources) & set(trained_on)
    settings = SamplerSettings.from_config(cfg, steps=sampling.get("steps"), solver=sampling.get("solver"),
                                           cfg_scale=sampling.get("cfg"), temperature=sampling.get("temperature"),
                                           num_iter=sampling.get("num_iter"))
    report: dict[str, Any] = {
        "model": str(model), "backend": pipe.engine.backend, "precision": pipe.engine.precision,
        "photos": sources, "scale": scale, "crops": cut, "held_out": held_out, "images": len(crops),
        "psnr": round(psnr(ref, recon), 3), "ssim": round(ssim(ref, recon), 4),
        "grid_baseline_psnr": round(psnr(ref, base), 3), "grid_baseline_ssim": round(ssim(ref, base), 4),
        "sampler": settings.__dict__, "seed": seed,
    }
    report["psnr_gain_db"] = round(report["psnr"] - report["grid_baseline_psnr"], 3)
    nearest = from_model_range(grid_baseline(crops, cfg.grid_size, upsample="nearest"))
    report["grid_baseline_nearest_psnr"] = round(psnr(ref, nearest), 3)
    return report
