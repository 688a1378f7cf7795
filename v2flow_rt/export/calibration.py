"""Real-photo inputs for every stage: crops pushed through the fp32 PyTorch stages, each stage's inputs
recorded. Used to calibrate the int8-qdq graphs and measure fp16 ranges (TRAIN photos only) and for the
real-photo parity checks (held-out photos).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from ..reference.model import V2Flow
from ..sampling import SamplerSettings, host_ode, sample_tokens, seeded_randomness
from ..stages import keep_indices

Feeds = dict[str, np.ndarray]


class _Recorder:
    """Stage callables for ``sample_tokens`` that run the torch stage modules and record their inputs."""

    def __init__(self, model: V2Flow, modules: dict[str, nn.Module], settings: SamplerSettings,
                 record: dict[str, list[Feeds]], max_rows: int) -> None:
        self.model, self.modules, self.settings, self.record = model, modules, settings, record
        self.fake_latent = model.fake_latent.detach().float().cpu().numpy().reshape(-1)
        self.max_rows = max_rows

    @staticmethod
    def _t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    @torch.no_grad()
    def mar_step(self, tokens: np.ndarray, mask: np.ndarray, buffer: np.ndarray) -> np.ndarray:
        keep = keep_indices(mask, self.model.config.buffer_size)
        feeds = {"tokens": tokens.copy(), "buffer": np.ascontiguousarray(buffer, dtype=np.float32), "keep_idx": keep}
        self.record["mar_step"].append(feeds)
        return self.modules["mar_step"](*[self._t(feeds[k]) for k in ("tokens", "buffer", "keep_idx")]).numpy()

    @torch.no_grad()
    def velocity(self, x: np.ndarray, t: np.ndarray, c: np.ndarray) -> np.ndarray:
        r = self.max_rows
        self.record["velocity"].append({"x": x[:r].copy(), "t": t[:r].copy(), "c": c[:r].copy()})
        return self.modules["velocity"](self._t(x), self._t(t), self._t(c)).numpy()

    def ode(self, noise: np.ndarray, z: np.ndarray, z_uncond: np.ndarray | None, scale: float) -> np.ndarray:
        r = self.max_rows
        if z_uncond is None:
            self.record["ode"].append({"noise": noise[:r].copy(), "z": z[:r].copy()})
        else:
            self.record["ode_cfg"].append({"noise": noise[:r].copy(), "z": z[:r].copy(),
                                           "z_uncond": z_uncond[:r].copy(),
                                           "cfg_scale": np.array([scale], dtype=np.float32)})
        return host_ode(self.velocity, self.settings)(noise, z, z_uncond, scale)


SAMPLED_STAGES = ("mar_step", "velocity", "ode", "ode_cfg")


@torch.no_grad()
def record_stage_inputs(model: V2Flow, modules: dict[str, nn.Module], images: np.ndarray | None,
                        settings: SamplerSettings, seed: int = 0, batch: int = 8, max_rows: int = 256,
                        stages: Sequence[str] | None = None) -> dict[str, list[Feeds]]:
    """Push image crops through the fp32 torch stages and record every stage's inputs.

    Args:
        model: the reference model; ``modules``: its stage modules (``codec_*`` may be absent).
        images: float32 [B, 3, H, W] in [-1, 1] (photo crops); None when there is no codec, in which case
            nothing can be recorded (returns {}).
        settings: sampling settings of the unguided run; a second, guided run on the first batch (the
            config's cfg_scale, or 3.0 when that is 1) records the ``ode_cfg`` inputs.
        batch: images per call; ``max_rows``: rows kept per recorded ODE/velocity call.
        stages: the stages whose inputs are wanted (default all); the sampling loop runs only for
            ``mar_step``/``velocity``/``ode``/``ode_cfg``.

    Returns:
        stage name → list of feed dicts (numpy), one per call, in the stage's input names. ``codec_decode``
        gets the photos' own latents (real latents, not sampled ones); ``detokenize`` the photos' ids with
        the orders and noise of ``seeded_randomness(seed + first image)`` (``cfg_scale`` when guided).
    """
    record: dict[str, list[Feeds]] = defaultdict(list)
    if images is None or "codec_encode" not in modules:
        return {}
    wanted = set(stages) if stages is not None else set(modules)
    cfg = model.config
    runs = []
    if wanted & {"mar_step", "velocity", "ode"}:
        runs.append(replace(settings, cfg_scale=1.0))
    if "ode_cfg" in wanted:
        runs.append(settings if settings.guided else replace(settings, cfg_scale=3.0))
    for start in range(0, images.shape[0], batch):
        imgs = np.ascontiguousarray(images[start:start + batch], dtype=np.float32)
        record["codec_encode"].append({"images": imgs})
        latent = modules["codec_encode"](torch.from_numpy(imgs))
        record["tokenizer"].append({"latent": latent.numpy()})
        record["codec_decode"].append({"latent": latent.numpy()})
        ids = model.tokenize(latent)
        record["token_embed"].append({"ids": ids.numpy()})
        record["tokenize"].append({"images": imgs})
        orders, noise = seeded_randomness(seed + start, len(imgs), cfg.num_tokens, cfg.token_dim, settings.num_iter)
        detok = {"ids": ids.numpy(), "orders": orders, "noise": noise}
        if settings.guided:
            detok["cfg_scale"] = np.array([settings.cfg_scale], dtype=np.float32)
        record["detokenize"].append(detok)
        buffer = model.embed_ids(ids).numpy()
        for run_settings in runs:
            if run_settings.guided and start > 0:   # the first batch's guided run covers ode_cfg's ranges
                continue
            rec = _Recorder(model, modules, run_settings, record, max_rows)
            sample_tokens(rec, buffer, run_settings, seed + start, token_dim=cfg.token_dim, ode=rec.ode)
    return {k: v for k, v in record.items() if k in wanted}


def photo_crops(names: Sequence[str], size: int, per_image: int = 8, scale: float = 0.5) -> np.ndarray:
    """Deterministic crops of built-in photos at the model's size (``data.fitting_crops``):
    float32 [n, 3, size, size] in [-1, 1]."""
    from ..data import fitting_crops, load_photo

    return fitting_crops([load_photo(n) for n in names], size, per_image, scale, labels=list(names))[0]


def train_crops(size: int, n: int, seed: int = 0) -> np.ndarray:
    """``n`` random crops of the TRAIN photos (never the held-out ones) for calibration."""
    from ..data import TRAIN_PHOTOS, CropSampler, load_photo
    from ..errors import ImageError

    photos = [load_photo(p) for p in TRAIN_PHOTOS]
    photos = [p for p in photos if min(p.shape[:2]) >= size]
    if not photos:
        raise ImageError(f"no TRAIN photo is at least {size}x{size} pixels for calibration crops")
    return CropSampler(photos, size).sample(n, np.random.default_rng(seed))
