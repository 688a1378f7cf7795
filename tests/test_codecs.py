"""Latent codecs: the patch codec's exact layout and round trip; DC-AE through a tiny random AutoencoderDC."""

from __future__ import annotations

import pytest
import torch

from v2flow_rt.config import get_preset
from v2flow_rt.errors import BackendUnavailable, CheckpointError, ShapeError
from v2flow_rt.reference.codecs import DCAECodec, PatchCodec, build_codec


def test_patch_codec_layout_and_round_trip() -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 48) * 2 - 1
    codec = PatchCodec(8, scale=2.0)
    latent = codec.encode(images)
    assert latent.shape == (2, 192, 8, 6)
    # Channel c·64 + dy·8 + dx of cell (i, j) is pixel (8i + dy, 8j + dx) of colour c, times the scale.
    c, dy, dx, i, j = 2, 3, 5, 4, 1
    assert latent[1, c * 64 + dy * 8 + dx, i, j] == 2.0 * images[1, c, 8 * i + dy, 8 * j + dx]
    assert torch.equal(codec.decode(latent), images)
    with pytest.raises(ShapeError, match="multiple of the patch stride"):
        codec.encode(torch.zeros(1, 3, 60, 64))


def test_build_codec_needs_a_local_dcae_folder(tmp_path) -> None:
    assert isinstance(build_codec(get_preset("tiny")), PatchCodec)
    with pytest.raises(BackendUnavailable, match="local folder"):
        build_codec(get_preset("base-256"))
    with pytest.raises(CheckpointError, match="config.json"):
        DCAECodec(tmp_path, 0.41407)


def test_dcae_codec_with_a_tiny_random_autoencoder(tmp_path) -> None:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderDC(
        in_channels=3, latent_channels=32, attention_head_dim=8,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16, 32), decoder_block_out_channels=(8, 16, 32),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
    ).eval()
    vae.save_pretrained(tmp_path / "dcae")
    # This tiny autoencoder downsamples 4×: a 32² image gives the 8×8 grid of base-256.
    with pytest.raises(CheckpointError, match=r"latent_channels 32 at stride 4, but model 'base-256' expects "
                                              r"latent_channels 32 at codec_stride 32"):
        build_codec(get_preset("base-256"), dcae_path=tmp_path / "dcae")
    codec = build_codec(get_preset("base-256", img_size=32, codec_stride=4), dcae_path=tmp_path / "dcae")
    assert isinstance(codec, DCAECodec)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latent = codec.encode(images)
        assert latent.shape == (1, 32, 8, 8)        # this tiny autoencoder downsamples 4×
        torch.testing.assert_close(latent, vae.encode(images).latent * 0.41407)
        torch.testing.assert_close(codec.decode(latent), vae.decode(latent / 0.41407).sample)
