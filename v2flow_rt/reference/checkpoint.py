"""Checkpoint I/O: ``save_pretrained``/``from_pretrained`` folders and official ``checkpoint-last.pth`` files.

Nothing here executes code from a file: pickles are read with ``torch.load(weights_only=True)`` and the
only class allow-listed is ``argparse.Namespace`` (the official ``args`` entry).
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..config import DCAE_SCALE, V2FlowConfig
from ..errors import CheckpointError, ConfigError
from .model import V2Flow

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Official keys this package does not build (the unused class embedding: 67 M parameters).
IGNORED_OFFICIAL_KEYS = ("class_emb.weight",)
ASSETS = Path(__file__).resolve().parent.parent / "assets"


def resolve_model_path(path: str | Path) -> Path:
    """``"default"`` names the bundled model; anything else is a folder path."""
    if str(path) == "default":
        return ASSETS / "default"
    return Path(path)


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temp file in the same folder, then rename, so a crash leaves no partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pretrained(model: V2Flow, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (weights first, config last, each atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
    _atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
    _atomic_write(folder / CONFIG_NAME, lambda p: Path(p).write_text(model.config.to_json()))
    return folder


def load_state_into(model: V2Flow, state: dict[str, torch.Tensor], source: str,
                    allow_unexpected: bool = False) -> None:
    """Copy a state dict into ``model``, raising CheckpointError that names missing/extra/mismatched keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing:
        raise CheckpointError(f"{source}: missing {len(missing)} key(s), e.g. {missing[:5]}")
    if unexpected and not allow_unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected key(s), e.g. {unexpected[:5]} "
                              f"(pass allow_unexpected=True to ignore them)")
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{source}: key {key!r} has shape {list(state[key].shape)}, the model "
                                  f"(config {model.config.name!r}) expects {list(value.shape)}")
    model.load_state_dict({k: state[k] for k in own}, strict=True)


def from_pretrained(path: str | Path, map_location: str | torch.device = "cpu") -> V2Flow:
    """Load a folder written by ``save_pretrained`` (or ``"default"``, the bundled model)."""
    folder = resolve_model_path(path)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise CheckpointError(f"model folder {folder} has no {name}")
    try:
        config = V2FlowConfig.from_file(folder / CONFIG_NAME)
    except ConfigError as exc:
        raise CheckpointError(f"{folder / CONFIG_NAME}: {exc}") from None
    try:
        state = load_file(str(folder / WEIGHTS_NAME), device=str(map_location))
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"{folder / WEIGHTS_NAME} is not a readable safetensors file: {exc}") from None
    model = V2Flow(config, llm_embed=state.get("llm_embed_tokens"))
    load_state_into(model, state, str(folder / WEIGHTS_NAME))
    return model.eval()


# ----------------------------------------------------------------------------- official checkpoints


def read_official(path: str | Path) -> dict[str, Any]:
    """Read an official ``checkpoint-last.pth`` without executing code (mmap'd when possible)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc).split("\n")[0]
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(f"{path}: refusing to unpickle it, it holds objects that could execute code "
                                  f"({text})") from None
        raise CheckpointError(f"{path} is not a readable torch checkpoint (truncated or corrupt?): {text}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: expected a dict with 'model' (and 'model_ema', 'args'), found {keys}")
    return ckpt


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def config_from_official(state: dict[str, torch.Tensor], args: Any = None) -> V2FlowConfig:
    """Infer the geometry from tensor shapes (and ``args`` for heads, image size and flow sizes)."""
    def shape(key: str) -> list[int]:
        if key not in state:
            raise CheckpointError(f"official state dict has no key {key!r}; is this a V2Flow checkpoint?")
        return list(state[key].shape)

    d, c = shape("z_proj.weight")
    dd = shape("decoder_embed.weight")[0]
    seq = shape("diffusion_pos_embed_learned")[1]
    buffer = shape("encoder_pos_embed_learned")[1] - seq
    vocab, llm_dim = shape("llm_embed_tokens")
    stride = int(getattr(args, "vae_stride", 32) or 32)
    grid = int(round(seq ** 0.5))
    name = str(getattr(args, "model", "") or "")
    size = next((s for s in ("base", "large", "huge") if s in name), None)
    heads = {"base": 12, "large": 16, "huge": 16}.get(size or "", max(1, d // 64))
    return V2FlowConfig(
        name=f"official-{size or 'custom'}-{grid * stride}", img_size=grid * stride, codec="dcae",
        codec_stride=stride, latent_channels=c, latent_scale=DCAE_SCALE, llm_vocab_size=vocab, llm_dim=llm_dim,
        resampler_hidden=shape("downsampler.s1.b1.conv1.conv.weight")[0],
        resampler_depth=_count(state, r"downsampler\.s1\.b(\d+)\."),
        readout_depth=_count(state, r"downsampler\.readout\.(\d+)\.weight"),
        codebook_size=shape("quantizer._codebook.embed")[1],
        encoder_dim=d, encoder_depth=_count(state, r"encoder_blocks\.(\d+)\."), encoder_heads=heads,
        decoder_dim=dd, decoder_depth=_count(state, r"decoder_blocks\.(\d+)\."), decoder_heads=heads,
        buffer_size=buffer, flow_width=shape("flowloss.net.input_proj.weight")[0],
        flow_depth=_count(state, r"flowloss\.net\.res_blocks\.(\d+)\."), cfg_scale=4.5,
        extra={"imported_from": "official checkpoint-last.pth"},
    ).validate()


def import_official(path: str | Path, use_ema: bool = False, allow_unexpected: bool = False) -> V2Flow:
    """Build a model from an official ``checkpoint-last.pth`` (raw weights by default, as the official
    ``--evaluate`` does; ``use_ema=True`` takes ``model_ema``)."""
    ckpt = read_official(path)
    key = "model_ema" if use_ema else "model"
    if key not in ckpt:
        raise CheckpointError(f"{path}: no {key!r} entry (found {sorted(ckpt)})")
    state = {k: v for k, v in ckpt[key].items() if k not in IGNORED_OFFICIAL_KEYS}
    try:
        config = config_from_official(state, ckpt.get("args"))
    except ConfigError as exc:
        raise CheckpointError(f"{path}: the tensors describe an inconsistent geometry: {exc}") from None
    model = V2Flow(config, llm_embed=state["llm_embed_tokens"])
    load_state_into(model, state, f"{path}[{key!r}]", allow_unexpected=allow_unexpected)
    return model.eval()


def export_official(model: V2Flow, path: str | Path, ema_state: dict[str, torch.Tensor] | None = None,
                    with_class_emb: bool = True) -> Path:
    """Write the official layout ``{'model', 'model_ema', 'epoch', 'args'}`` (round-trips through import).

    Raises CheckpointError for a model with a ``resampler_offset`` channel, which the official code lacks.
    """
    cfg = model.config
    if cfg.resampler_offset:
        raise CheckpointError(f"model {cfg.name!r} has a constant resampler input channel (resampler_offset="
                              f"{cfg.resampler_offset}); the official code has none and could not load it")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if with_class_emb:
        state["class_emb.weight"] = torch.zeros(cfg.codebook_size, cfg.llm_dim)
    ema = dict(state) if ema_state is None else {**state, **{k: v.detach().cpu() for k, v in ema_state.items()}}
    size = cfg.name.split("-")[0] if cfg.name.split("-")[0] in ("base", "large", "huge") else "custom"
    args = argparse.Namespace(model=f"v2flow_{size}", img_size=cfg.img_size, vae_stride=cfg.codec_stride,
                              vae_embed_dim=cfg.latent_channels, patch_size=1, buffer_size=cfg.buffer_size,
                              flowloss_w=cfg.flow_width, flowloss_d=cfg.flow_depth, num_iter=cfg.num_iter)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": state, "model_ema": ema, "epoch": 0, "args": args}
    _atomic_write(out, lambda p: torch.save(payload, p))
    return out

