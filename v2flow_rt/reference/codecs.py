"""Latent codecs: images [B, 3, H, W] in [-1, 1] ↔ scaled latents [B, C, H/s, W/s].

- ``patch``: pixels patchified (space-to-depth) with stride s, so C = 3·s²; no weights. The default
  for small models.
- ``dcae``: diffusers ``AutoencoderDC`` loaded from a local directory (the official
  ``dc-ae-f32c32-sana-1.1`` or any compatible one); needs the ``dcae`` extra (diffusers).

Both return latents already multiplied by ``config.latent_scale`` (0.41407 for DC-AE), which is what
the V2Flow model consumes; ``decode`` divides it back out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import V2FlowConfig
from ..errors import BackendUnavailable, CheckpointError, ConfigError, ShapeError


class PatchCodec(nn.Module):
    """Space-to-depth codec: channel index = c·s² + dy·s + dx."""

    def __init__(self, stride: int, scale: float = 1.0) -> None:
        super().__init__()
        self.stride, self.scale = stride, scale

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        b, c, h, w = images.shape
        s = self.stride
        if h % s or w % s:
            raise ShapeError(f"image size {h}x{w} is not a multiple of the patch stride {s}")
        x = images.reshape(b, c, h // s, s, w // s, s).permute(0, 1, 3, 5, 2, 4)   # (B, c, s, s, h, w)
        return x.reshape(b, c * s * s, h // s, w // s) * self.scale

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        b, cc, h, w = latent.shape
        s = self.stride
        x = (latent / self.scale).reshape(b, cc // (s * s), s, s, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, cc // (s * s), h * s, w * s)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images)


# A model folder records its DC-AE codec under this config.extra key: an absolute path (a referenced folder)
# or a path relative to the model folder ("codec" when copied in).
DCAE_KEY = "dcae_path"
DCAE_FOLDER = "codec"
_DCAE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def dcae_geometry(folder: str | Path) -> dict[str, Any]:
    """What a diffusers ``AutoencoderDC`` folder's ``config.json`` says, without diffusers: latent channels,
    spatial stride (2^(blocks − 1), as diffusers computes it), its own scaling_factor, and the weights file.

    Raises CheckpointError naming the folder when it is not such a folder (no config.json, not JSON, not an
    AutoencoderDC config, no safetensors weights: a pickled ``.bin`` is refused, it could run code).
    """
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not folder.is_dir():
        raise CheckpointError(f"DC-AE codec folder {folder} does not exist")
    if not cfg_path.is_file():
        raise CheckpointError(f"DC-AE codec folder {folder} has no config.json (expected a diffusers "
                              f"AutoencoderDC directory, e.g. dc-ae-f32c32-sana-1.1-diffusers)")
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{cfg_path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("_class_name") not in (None, "AutoencoderDC") \
            or not isinstance(data.get("encoder_block_out_channels"), list):
        kind = data.get("_class_name") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{cfg_path} is not an AutoencoderDC config (class {kind!r}, needs "
                              f"encoder_block_out_channels and latent_channels)")
    weights = next((folder / w for w in _DCAE_WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise CheckpointError(f"DC-AE codec folder {folder} has no {' or '.join(_DCAE_WEIGHTS)} (pickled .bin "
                              f"weights are not loaded: they could execute code)")
    return {"latent_channels": int(data.get("latent_channels", 32)),
            "stride": 2 ** (len(data["encoder_block_out_channels"]) - 1),
            "scaling_factor": float(data.get("scaling_factor", 1.0)), "weights": weights}


def check_dcae_folder(folder: str | Path, config: V2FlowConfig) -> dict[str, Any]:
    """``dcae_geometry`` of ``folder``, or CheckpointError naming both sides when its latent channels or
    stride differ from what the model was trained on."""
    geo = dcae_geometry(folder)
    if (geo["latent_channels"], geo["stride"]) != (config.latent_channels, config.codec_stride):
        raise CheckpointError(
            f"DC-AE codec folder {folder} gives latent_channels {geo['latent_channels']} at stride "
            f"{geo['stride']}, but model {config.name!r} expects latent_channels {config.latent_channels} at "
            f"codec_stride {config.codec_stride}")
    return geo


def resolve_codec_path(config: V2FlowConfig, model_folder: str | Path) -> V2FlowConfig:
    """Make a recorded relative DC-AE path absolute against the model folder (in place; returns config)."""
    rec = config.extra.get(DCAE_KEY)
    if config.codec == "dcae" and rec and not Path(rec).is_absolute():
        config.extra[DCAE_KEY] = str((Path(model_folder) / rec).resolve())
    return config


class DCAECodec(nn.Module):
    """diffusers AutoencoderDC from a local folder (no download).

    ``encode`` returns ``vae.encode(x).latent · scale`` and ``decode`` takes such a latent and runs
    ``vae.decode(latent / scale)``: the model's latent scale (0.41407 for the official models, whose code
    hard-codes it) is applied exactly once on each side. The folder's own ``scaling_factor`` is not applied
    on top (diffusers' encode/decode do not apply it either).
    """

    def __init__(self, path: str | Path, scale: float, config: V2FlowConfig | None = None) -> None:
        super().__init__()
        geo = check_dcae_folder(path, config) if config is not None else dcae_geometry(path)
        try:
            from diffusers import AutoencoderDC
        except ImportError as exc:
            raise BackendUnavailable("the dcae codec needs diffusers: pip install 'v2flow-rt[dcae]'") from exc
        self.path = Path(path)
        self.vae = AutoencoderDC.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                                 low_cpu_mem_usage=False).eval()
        self.scale, self.stride = scale, geo["stride"]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images).latent * self.scale

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent / self.scale).sample

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images)


def build_codec(config: V2FlowConfig, dcae_path: str | Path | None = None) -> PatchCodec | DCAECodec:
    """The codec a config names; ``dcae`` needs ``dcae_path`` (or the folder the config records).

    Raises BackendUnavailable when a DC-AE model records no codec folder (nothing is ever downloaded),
    CheckpointError when the folder is missing, not an AutoencoderDC folder, or of another geometry.
    """
    if config.codec == "patch":
        return PatchCodec(config.codec_stride, config.latent_scale)
    path = dcae_path or config.extra.get(DCAE_KEY)
    if not path:
        raise BackendUnavailable(
            f"model {config.name!r} uses the DC-AE codec but records no codec folder: pass the local folder of a "
            f"diffusers AutoencoderDC (`v2flow-rt import-official ... --codec DIR`, or `export --codec DIR`); "
            f"no weights are downloaded")
    return DCAECodec(path, config.latent_scale, config)


def make_tiny_dcae(folder: str | Path, latent_channels: int = 32, stride: int = 32, seed: int = 0) -> Path:
    """Write a randomly initialised AutoencoderDC of the given geometry as a local diffusers folder: a
    stand-in codec for benchmarks and tests of official geometries when no trained DC-AE is at hand.

    Its blocks mirror dc-ae-f32c32-sana-1.1 at a tiny width (8-64 channels): ResBlocks in the first half,
    EfficientViT blocks (multiscale linear attention) in the second. Needs diffusers."""
    try:
        from diffusers import AutoencoderDC
    except ImportError as exc:
        raise BackendUnavailable("a DC-AE codec needs diffusers: pip install 'v2flow-rt[dcae]'") from exc
    blocks = int(round(math.log2(stride))) + 1
    if 2 ** (blocks - 1) != stride:
        raise ConfigError(f"a DC-AE stride must be a power of two, got {stride}")
    ch = tuple(min(64, 8 * 2 ** (i // 2)) for i in range(blocks))
    vit = blocks // 2
    types = ("ResBlock",) * (blocks - vit) + ("EfficientViTBlock",) * vit
    scales = ((),) * (blocks - vit) + ((5,),) * vit
    torch.manual_seed(seed)
    vae = AutoencoderDC(in_channels=3, latent_channels=latent_channels, attention_head_dim=8,
                        encoder_block_types=types, decoder_block_types=types,
                        encoder_block_out_channels=ch, decoder_block_out_channels=ch,
                        encoder_layers_per_block=(1,) * blocks, decoder_layers_per_block=(1,) * blocks,
                        encoder_qkv_multiscales=scales, decoder_qkv_multiscales=scales, scaling_factor=0.41407)
    vae.save_pretrained(str(folder), safe_serialization=True)  # type: ignore[attr-defined]  # ModelMixin
    return Path(folder)
