"""Latent codecs: images [B, 3, H, W] in [-1, 1] ↔ scaled latents [B, C, H/s, W/s].

- ``patch``: pixels patchified (space-to-depth) with stride s, so C = 3·s²; no weights. The default
  for small models.
- ``dcae``: diffusers ``AutoencoderDC`` loaded from a local directory (the official
  ``dc-ae-f32c32-sana-1.1`` or any compatible one); needs the ``dcae`` extra (diffusers).

Both return latents already multiplied by ``config.latent_scale`` (0.41407 for DC-AE), which is what
the V2Flow model consumes; ``decode`` divides it back out.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import V2FlowConfig
from ..errors import BackendUnavailable, CheckpointError, ShapeError


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


class DCAECodec(nn.Module):
    """diffusers AutoencoderDC from a local folder (no download); latents scaled by ``scale``."""

    def __init__(self, path: str | Path, scale: float) -> None:
        super().__init__()
        try:
            from diffusers import AutoencoderDC
        except ImportError as exc:
            raise BackendUnavailable("the dcae codec needs diffusers: pip install 'v2flow-rt[dcae]'") from exc
        path = Path(path)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"DC-AE folder {path} has no config.json (expected a diffusers "
                                  f"AutoencoderDC directory, e.g. dc-ae-f32c32-sana-1.1-diffusers)")
        self.vae = AutoencoderDC.from_pretrained(str(path), local_files_only=True).eval()
        self.scale = scale

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images).latent * self.scale

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent / self.scale).sample

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images)


def build_codec(config: V2FlowConfig, dcae_path: str | Path | None = None) -> PatchCodec | DCAECodec:
    """The codec a config names; ``dcae`` needs ``dcae_path`` (or ``config.extra['dcae_path']``)."""
    if config.codec == "patch":
        return PatchCodec(config.codec_stride, config.latent_scale)
    path = dcae_path or config.extra.get("dcae_path")
    if not path:
        raise BackendUnavailable(f"config {config.name!r} uses the DC-AE codec: pass the local folder of a "
                                 f"diffusers AutoencoderDC (no weights can be downloaded)")
    return DCAECodec(path, config.latent_scale)
