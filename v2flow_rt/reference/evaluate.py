"""Reconstruction quality of a model on the held-out photos, against what the token grid alone carries.

The grid baseline reduces each crop to one mean colour per token cell and scales it back up
bilinearly (``metrics.grid_baseline``): a model whose tokens carry nothing beyond a colour per cell
cannot beat it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import (
    HELDOUT_PHOTOS,
    eval_crops,
    from_model_range,
    load_image,
    resize_center_crop,
    save_grid,
    save_image,
    to_model_range,
)
from ..metrics import grid_baseline, psnr, ssim
from ..sampling import SamplerSettings
from .checkpoint import from_pretrained
from .codecs import build_codec
from .model import V2Flow


@torch.no_grad()
def reconstruct_array(model: V2Flow, images: np.ndarray, settings: SamplerSettings, seed: int = 0,
                      chunk: int = 16, dcae_path: str | None = None) -> np.ndarray:
    """images float32 [B, 3, H, W] in [-1, 1] → reconstructions, same shape (tokenize, then decode)."""
    codec = build_codec(model.config, dcae_path)
    out = []
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + chunk]))
        ids = model.tokenize(codec.encode(x))                                    # (b, N)
        tokens = model.sample_tokens(model.embed_ids(ids), settings, seed=seed + start)
        out.append(codec.decode(model.tokens_to_latent(tokens)).clamp(-1, 1).numpy())
    return np.concatenate(out)


def evaluate(model_path: str | Path = "default", per_image: int = 8, seed: int = 0, grid_png: str | None = None,
             **sampler_overrides: Any) -> dict[str, Any]:
    """PSNR/SSIM of reconstructions and of the grid baseline on deterministic held-out crops."""
    model = from_pretrained(model_path)
    cfg = model.config
    settings = SamplerSettings.from_config(cfg, **sampler_overrides)
    crops = eval_crops(list(HELDOUT_PHOTOS), cfg.img_size, per_image=per_image)      # (B, 3, H, W)
    recon = reconstruct_array(model, crops, settings, seed)
    base = grid_baseline(crops, cfg.grid_size)
    ref_u8, rec_u8, base_u8 = (from_model_range(a) for a in (crops, recon, base))   # (B, H, W, 3) uint8
    if grid_png:
        rows = [list(ref_u8[:8]), list(base_u8[:8]), list(rec_u8[:8])]
        save_grid(grid_png, rows, labels=["original", "grid baseline", "V2Flow"])
    report: dict[str, Any] = {
        "model": str(model_path), "photos": list(HELDOUT_PHOTOS), "images": len(crops),
        "psnr": round(psnr(ref_u8, rec_u8), 3), "ssim": round(ssim(ref_u8, rec_u8), 4),
        "grid_baseline_psnr": round(psnr(ref_u8, base_u8), 3), "grid_baseline_ssim": round(ssim(ref_u8, base_u8), 4),
        "sampler": settings.__dict__, "seed": seed,
    }
    report["psnr_gain_db"] = round(report["psnr"] - report["grid_baseline_psnr"], 3)
    return report


def reconstruct_file(model_path: str | Path, image: str | Path, out: str | Path, seed: int = 0,
                     side_by_side: bool = False, **sampler_overrides: Any) -> float:
    """Reconstruct one image file (center-cropped and resized to the model's size); returns PSNR."""
    model = from_pretrained(model_path)
    cfg = model.config
    src = resize_center_crop(load_image(image), cfg.img_size)                       # (H, W, 3) uint8
    settings = SamplerSettings.from_config(cfg, **sampler_overrides)
    rec = from_model_range(reconstruct_array(model, to_model_range(src), settings, seed))[0]
    if side_by_side:
        save_grid(out, [[src, rec]])
    else:
        save_image(out, rec)
    return psnr(src, rec)
