"""Reconstruction quality on the held-out photos (or any photos), against what the token grid alone carries.

The grid baseline reduces each crop to one mean colour per token cell and scales it back up
bilinearly (``metrics.grid_baseline``): tokens that carried nothing beyond a colour per cell could not
beat it. Runs on any backend through ``V2FlowPipeline`` (the PyTorch reference by default).

``evaluate`` is the standard suite; ``evaluate_colour`` (``eval --suite colour``) measures the same crops
under hue rotations over the whole circle and a saturation boost, which a model trained on a narrow
palette fails even where the standard suite looks fine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .colour import recolour
from .data import (
    HELDOUT_PHOTOS,
    PHOTOS,
    fitting_crops,
    from_model_range,
    image_files,
    load_image,
    load_photo,
    save_grid,
    to_model_range,
)
from .errors import ImageError
from .metrics import grid_baseline, psnr, ssim
from .pipeline import V2FlowPipeline
from .sampling import SamplerSettings


def _sources(photos: Sequence[str] | None, images: Sequence[str | os.PathLike[str]] | None,
             ) -> tuple[list[str], list[Any]]:
    """(labels, uint8 arrays) of the images to evaluate on: files/folders, else built-in photos (held-out)."""
    if images:
        files = image_files(images)
        return [str(f) for f in files], [load_image(f) for f in files]
    names = list(photos or HELDOUT_PHOTOS)
    unknown = [n for n in names if n not in PHOTOS]
    if unknown:
        raise ImageError(f"unknown built-in photo(s) {unknown}; known: {sorted(PHOTOS)}")
    return names, [load_photo(n) for n in names]


def _settings(cfg: Any, sampling: dict[str, Any]) -> SamplerSettings:
    return SamplerSettings.from_config(cfg, steps=sampling.get("steps"), solver=sampling.get("solver"),
                                       cfg_scale=sampling.get("cfg"), temperature=sampling.get("temperature"),
                                       num_iter=sampling.get("num_iter"))


def _scores(ref: Any, recon: Any, base: Any) -> dict[str, float]:
    """PSNR/SSIM of the reconstructions and of the grid baseline (uint8 [B, H, W, 3] each), and the gain."""
    out = {"psnr": round(psnr(ref, recon), 3), "ssim": round(ssim(ref, recon), 4),
           "grid_baseline_psnr": round(psnr(ref, base), 3), "grid_baseline_ssim": round(ssim(ref, base), 4)}
    out["psnr_gain_db"] = round(out["psnr"] - out["grid_baseline_psnr"], 3)
    return out


def _held_out(cfg: Any, sources: list[str], images: Any) -> bool | None:
    """Whether none of the built-in photos is one the model's config records it was trained on."""
    trained_on = cfg.extra.get("train_photos")
    return None if images or not isinstance(trained_on, list) else not set(sources) & set(trained_on)


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
    sources, arrays = _sources(photos, images)
    pipe = V2FlowPipeline.from_pretrained(model, backend=backend, precision=precision)
    cfg = pipe.config
    crops, cut = fitting_crops(arrays, cfg.img_size, per_image, scale, labels=sources)   # (B, 3, H, W)
    recon = pipe.reconstruct(crops, seed=seed, **sampling)                         # (B, H, W, 3) uint8
    ref, base = from_model_range(crops), from_model_range(grid_baseline(crops, cfg.grid_size))
    if grid_png:
        save_grid(grid_png, [list(ref[:8]), list(base[:8]), list(recon[:8])],
                  labels=["original", "grid baseline", "V2Flow"])
    settings = _settings(cfg, sampling)
    report: dict[str, Any] = {
        "model": str(model), "backend": pipe.engine.backend, "precision": pipe.engine.precision,
        "photos": sources, "scale": scale, "crops": cut, "held_out": _held_out(cfg, sources, images),
        "images": len(crops),
        **_scores(ref, recon, base), "sampler": settings.__dict__, "seed": seed,
    }
    nearest = from_model_range(grid_baseline(crops, cfg.grid_size, upsample="nearest"))
    report["grid_baseline_nearest_psnr"] = round(psnr(ref, nearest), 3)
    return report


# ----------------------------------------------------------------------------- colour suite

#: Hue rotations (degrees) of the colour suite: eight, evenly spread over the circle (0 = the photos as
#: they are), then each photo with its saturation scaled by ``COLOUR_SATURATION`` at its own hue.
COLOUR_HUES = (0, 45, 90, 135, 180, 225, 270, 315)
COLOUR_SATURATION = 1.6
#: What issue 15 asks of a default model on this suite (gain over the grid baseline, dB).
COLOUR_TARGETS = {"worst_psnr_gain_db": 1.5, "mean_psnr_gain_db": 2.5}


def colour_variants(hues: Sequence[float] = COLOUR_HUES,
                    saturation: float | None = COLOUR_SATURATION) -> list[dict[str, Any]]:
    """The suite's variants: ``{"name", "hue_deg", "saturation"}`` for each hue, then the saturation boost."""
    out = [{"name": f"hue{int(h):+d}" if h else "original", "hue_deg": float(h), "saturation": 1.0}
           for h in hues]
    if saturation is not None and saturation != 1.0:
        out.append({"name": f"saturation x{saturation:g}", "hue_deg": 0.0, "saturation": float(saturation)})
    return out


def evaluate_colour(model: str | Path = "default", backend: str = "torch", precision: str = "fp32",
                    per_image: int = 8, seed: int = 0, grid_png: str | None = None,
                    photos: Sequence[str] | None = None, images: Sequence[str | os.PathLike[str]] | None = None,
                    scale: float = 0.5, hues: Sequence[float] = COLOUR_HUES,
                    saturation: float | None = COLOUR_SATURATION, grid_crops_shown: int = 8,
                    **sampling: Any) -> dict[str, Any]:
    """``evaluate``'s crops under colour changes the training palette may lack: each of ``hues`` (degrees,
    ``colour.recolour`` in HSV) and a saturation boost. For each variant: PSNR, SSIM, the grid baseline's
    and the gain over it (same crops, same seed); then the worst variant (lowest gain), the mean gain, and
    whether ``COLOUR_TARGETS`` are met.

    ``grid_png``: two rows per variant (its originals, V2Flow's reconstructions) of ``grid_crops_shown``
    crops spread evenly over the batch (so every photo shows). Other arguments as ``evaluate``.
    """
    sources, arrays = _sources(photos, images)
    pipe = V2FlowPipeline.from_pretrained(model, backend=backend, precision=precision)
    cfg = pipe.config
    crops, cut = fitting_crops(arrays, cfg.img_size, per_image, scale, labels=sources)   # (B, 3, H, W)
    plain = from_model_range(crops)                                                 # (B, H, W, 3) uint8
    shown = sorted({round(i * (len(crops) - 1) / max(1, grid_crops_shown - 1)) for i in range(grid_crops_shown)})
    variants, rows, labels = [], [], []
    for v in colour_variants(hues, saturation):
        ref = recolour(plain, v["hue_deg"], v["saturation"])
        x = to_model_range(ref)                                                     # (B, 3, H, W)
        recon = pipe.reconstruct(x, seed=seed, **sampling)
        base = from_model_range(grid_baseline(x, cfg.grid_size))
        variants.append({**v, **_scores(ref, recon, base)})
        rows += [list(ref[shown]), list(recon[shown])]
        labels += [f"{v['name']}", f"{v['name']} V2Flow"]
    if grid_png:
        save_grid(grid_png, rows, labels=labels)
    gains = [v["psnr_gain_db"] for v in variants]
    worst = min(variants, key=lambda v: v["psnr_gain_db"])
    mean_gain = round(sum(gains) / len(gains), 3)
    return {
        "suite": "colour", "model": str(model), "backend": pipe.engine.backend, "precision": pipe.engine.precision,
        "photos": sources, "scale": scale, "crops": cut, "held_out": _held_out(cfg, sources, images),
        "images": len(crops), "variants": variants,
        "worst": {"name": worst["name"], "psnr_gain_db": worst["psnr_gain_db"], "psnr": worst["psnr"]},
        "mean_psnr_gain_db": mean_gain,
        "mean_psnr": round(sum(v["psnr"] for v in variants) / len(variants), 3),
        "targets": dict(COLOUR_TARGETS),
        "meets_targets": worst["psnr_gain_db"] >= COLOUR_TARGETS["worst_psnr_gain_db"]
        and mean_gain >= COLOUR_TARGETS["mean_psnr_gain_db"],
        "sampler": _settings(cfg, sampling).__dict__, "seed": seed,
    }
