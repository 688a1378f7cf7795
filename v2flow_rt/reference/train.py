"""Training: linear-flow objective + VQ commitment, AdamW, parameter EMA, clipping, resumable checkpoints.

Fixes relative to the official recipe (spec §4, §7): boolean flags are real booleans, the flow MLP's
biases and norms are not weight-decayed, the learning rate warms up then decays (the official run is
warm-up only), data are random crops of real photos rather than a cached-latent folder.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..colour import ColourJitter
from ..config import V2FlowConfig
from ..data import TRAIN_IMAGES, CropSampler, load_photo
from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_write
from .checkpoint import safe_torch_load, save_pretrained
from .codecs import build_codec
from .model import V2Flow

STATE_NAME = "train_state.pt"


@dataclass
class TrainSettings:
    steps: int = 6000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.02
    warmup: int = 200
    schedule: str = "cosine"          # or "constant" (the official choice)
    ema_decay: float = 0.999
    grad_clip: float = 3.0
    seed: int = 0
    crop_scales: tuple[float, ...] = (1.0, 0.5, 0.25)
    max_minutes: float = 0.0          # stop (and save) after this wall time; 0 = no limit
    save_every: int = 500
    threads: int = 0                  # torch threads; 0 = torch's default
    aux_recon: bool = False           # add a code → token reconstruction loss (see V2Flow.forward)
    # > 0: the first tokenizer_steps train only the tokenizer (through the aux head), the rest only the
    # decoder on the frozen codes (the aux head is no longer run); each phase warms up and follows
    # ``schedule`` on its own (so the codes settle before they are frozen). 0: joint training throughout.
    tokenizer_steps: int = 0
    # 3x3 residual conv blocks in the aux head over the grid of codes; 0 = a per-token linear map. With
    # blocks, the head sees each code's neighbours, so the tokenizer learns codes a decoder with context
    # (the masked transformer) can use, not only codes that stand for their own cell.
    aux_context: int = 0
    # Probability that a training crop is recoloured (``colour.ColourJitter``: hue over the whole circle,
    # saturation, value, colour temperature); 0 = the photos' own colours only.
    colour_aug: float = 0.0


class ResBlock(torch.nn.Module):
    """x + conv3x3(GELU(conv3x3(GELU(x)))), channels kept."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.b = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(torch.nn.functional.gelu(self.a(torch.nn.functional.gelu(x))))


class ContextHead(torch.nn.Module):
    """Training-only aux head: codes [B, N, d] on the token grid → tokens [B, N, C] through 3×3 convs."""

    def __init__(self, dim: int, token_dim: int, grid: int, blocks: int, width: int = 128) -> None:
        super().__init__()
        self.grid = grid
        self.net = torch.nn.Sequential(torch.nn.Conv2d(dim, width, 3, padding=1),
                                       *[ResBlock(width) for _ in range(blocks)],
                                       torch.nn.GELU(), torch.nn.Conv2d(width, token_dim, 1))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        b, _, d = codes.shape
        x = codes.transpose(1, 2).reshape(b, d, self.grid, self.grid)        # (B, d, g, g)
        return self.net(x).flatten(2).transpose(1, 2)                        # (B, N, C)


def build_aux_head(config: V2FlowConfig, settings: TrainSettings) -> torch.nn.Module | None:
    """The training-only code → token head of ``aux_recon`` (None without it)."""
    if not settings.aux_recon:
        return None
    if settings.aux_context:
        return ContextHead(config.llm_dim, config.token_dim, config.grid_size, settings.aux_context)
    return torch.nn.Linear(config.llm_dim, config.token_dim)


def param_groups(model: V2Flow, weight_decay: float) -> list[dict[str, Any]]:
    """No decay on 1-D parameters and biases (norms, biases)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, s: TrainSettings) -> float:
    if s.tokenizer_steps:   # two phases, each scheduled on its own
        first = step < s.tokenizer_steps
        phase = dataclasses.replace(s, tokenizer_steps=0,
                                    steps=s.tokenizer_steps if first else s.steps - s.tokenizer_steps)
        return lr_at(step if first else step - s.tokenizer_steps, phase)
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    if s.schedule == "constant":
        return s.lr
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def ema_update(ema: V2Flow, model: V2Flow, decay: float) -> None:
    """Parameter EMA; buffers (codebook EMA state) are copied from the live model, as officially."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def train(config: V2FlowConfig, out_dir: str | Path, settings: TrainSettings,
          llm_embed: torch.Tensor | None = None, photos: list[str] | None = None,
          resume: bool = True, progress: bool = True) -> Path:
    """Train a model; writes ``train_state.pt`` periodically and ``final/`` (EMA weights) at the end.

    Returns the ``final`` folder (a ``from_pretrained`` model).
    """
    from tqdm import tqdm

    if config.codec != "patch":
        raise ConfigError("built-in training runs on the patch codec; DC-AE training needs cached latents")
    if settings.aux_context < 0:
        raise ConfigError(f"aux_context must be >= 0, got {settings.aux_context}")
    if settings.aux_context and not settings.aux_recon:
        raise ConfigError("aux_context shapes the aux head: set aux_recon too")
    if settings.tokenizer_steps and not settings.aux_recon:
        raise ConfigError("tokenizer_steps trains the tokenizer through the aux head: set aux_recon too")
    if not 0 <= settings.tokenizer_steps < settings.steps:
        raise ConfigError(f"tokenizer_steps must be in [0, steps={settings.steps}), got {settings.tokenizer_steps}")
    if settings.schedule not in ("cosine", "constant"):
        raise ConfigError(f"schedule must be 'cosine' or 'constant', got {settings.schedule!r}")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not 0.0 <= settings.colour_aug <= 1.0:
        raise ConfigError(f"colour_aug is a probability in [0, 1], got {settings.colour_aug}")
    names = list(photos or TRAIN_IMAGES)
    jitter = ColourJitter(p=settings.colour_aug) if settings.colour_aug else None
    sampler = CropSampler([load_photo(n) for n in names], config.img_size, settings.crop_scales, flip=True,
                          colour=jitter)
    codec = build_codec(config)
    torch.manual_seed(settings.seed)
    model = V2Flow(config, llm_embed=llm_embed).train()
    ema = copy.deepcopy(model).eval()
    # The auxiliary head lives beside the model, so the saved model keeps the official layout.
    aux_head = build_aux_head(config, settings)
    groups = param_groups(model, settings.weight_decay)
    if aux_head is not None:
        groups.append({"params": list(aux_head.parameters()), "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    step = 0
    state_path = out / STATE_NAME
    if resume and state_path.is_file():
        st = safe_torch_load(state_path)
        state_keys = ("config", "model", "ema", "optimizer", "torch_rng", "step")
        if not isinstance(st, dict) or any(k not in st for k in state_keys):
            raise CheckpointError(f"cannot resume from {state_path}: not a training state written by this package "
                                  f"(expected a dict with {list(state_keys)}); use --no-resume or a new --out")
        if st.get("config") != config.to_dict():
            raise CheckpointError(f"{state_path} was written for a different config; use a new output folder")
        model.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        if aux_head is not None and "aux_head" in st:
            aux_head.load_state_dict(st["aux_head"])
        opt.load_state_dict(st["optimizer"])
        gen.set_state(st["torch_rng"])
        rng = np.random.default_rng(int(st["step"]) + settings.seed * 1_000_003)
        step = int(st["step"])

    def save_state() -> None:
        payload = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                   "step": step, "torch_rng": gen.get_state(), "config": config.to_dict(),
                   **({"aux_head": aux_head.state_dict()} if aux_head is not None else {})}
        atomic_write(state_path, lambda p: torch.save(payload, p))

    start = time.time()
    log = (out / "train_log.jsonl").open("a")
    bar = tqdm(total=settings.steps, initial=step, disable=not progress, desc="train", dynamic_ncols=True)
    while step < settings.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, settings)
        phase = "joint"
        if settings.tokenizer_steps:
            phase = "tokenizer" if step < settings.tokenizer_steps else "decoder"
            if step == settings.tokenizer_steps:
                # The tokenizer is frozen from here on: the saved (EMA) model must hold exactly it.
                ema.downsampler.load_state_dict(model.downsampler.state_dict())
        batch = torch.from_numpy(sampler.sample(settings.batch_size, rng))           # (B, 3, H, W)
        with torch.no_grad():
            latent = codec.encode(batch)
        # Once the codes are frozen the aux head has nothing left to teach: skip it (~15 % of a step).
        losses = model(latent, gen, aux_head if phase != "decoder" else None, phase=phase)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], settings.grad_clip)
        opt.step()
        ema_update(ema, model, settings.ema_decay)
        step += 1
        bar.update(1)
        if step % 25 == 0 or step == 1:
            rec = {"step": step, "loss": float(losses["loss"].detach()), "flow": float(losses["flow"]),
                   "vq": float(losses["vq"]), "aux": float(losses["aux"]), "grad_norm": float(grad_norm),
                   "codes_in_batch": int(losses["codes"]),
                   "lr": opt.param_groups[0]["lr"], "minutes": (time.time() - start) / 60}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(flow=f"{rec['flow']:.4f}", vq=f"{rec['vq']:.4f}", codes=rec["codes_in_batch"])
        if step % settings.save_every == 0:
            save_state()
        if settings.max_minutes and (time.time() - start) / 60 >= settings.max_minutes:
            break
    bar.close()
    log.close()
    save_state()
    cfg = ema.config
    cfg.extra = {**cfg.extra, "trained_steps": step, "train_photos": names,
                 "train_settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()}}
    return save_pretrained(ema, out / "final")
