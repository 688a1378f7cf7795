"""Official-layout fixtures written from the spec, not from this package's model: the state-dict key list
of the official code (spec §6.2), random tensors in that layout, a ``checkpoint-last.pth`` as the official
training code writes it, and a tiny random DC-AE codec of the official f32c32 geometry."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from v2flow_rt.config import V2FlowConfig


def official_key_shapes(cfg: V2FlowConfig) -> dict[str, tuple[int, ...]]:
    """The official state-dict layout written out from the spec's key list (§6.2), not from our model."""
    h, c, v, d = cfg.resampler_hidden, cfg.latent_channels, cfg.llm_vocab_size, cfg.llm_dim
    e, dd, w, k = cfg.encoder_dim, cfg.decoder_dim, cfg.flow_width, cfg.codebook_size
    n = cfg.num_tokens
    keys: dict[str, tuple[int, ...]] = {}
    for stage, cin0 in (("s1", c), ("s2", h)):
        for i in range(1, cfg.resampler_depth + 1):
            cin = cin0 if i == 1 else h
            p = f"downsampler.{stage}.b{i}."
            rd = round(cin * 0.25)
            keys |= {p + "conv1.conv.weight": (h, cin, 1, 1), p + "conv2.conv.weight": (h, 1, 3, 3),
                     p + "conv3.conv.weight": (h, h, 1, 1), p + "se.fc1.weight": (rd, h, 1, 1),
                     p + "se.fc1.bias": (rd,), p + "se.fc2.weight": (h, rd, 1, 1), p + "se.fc2.bias": (h,)}
            for conv in ("conv1", "conv2", "conv3"):
                keys |= {p + f"{conv}.bn.weight": (h,), p + f"{conv}.bn.bias": (h,)}
            if cin != h:
                keys |= {p + "downsample.conv.weight": (h, cin, 1, 1), p + "downsample.bn.weight": (h,),
                         p + "downsample.bn.bias": (h,)}
    keys |= {"downsampler.readout.0.weight": (v, h), "downsampler.readout.0.bias": (v,)}
    for j in range(1, cfg.readout_depth):
        keys |= {f"downsampler.readout.{2 * j}.weight": (v, v), f"downsampler.readout.{2 * j}.bias": (v,)}
    keys |= {"llm_embed_tokens": (v, d), "quantizer._codebook.embed": (1, k, d),
             "quantizer._codebook.embed_avg": (1, k, d), "quantizer._codebook.cluster_size": (1, k),
             "quantizer._codebook.initted": (1,), "projector.0.weight": (e, d), "projector.0.bias": (e,),
             "class_emb.weight": (k, d), "fake_latent": (1, e),
             "z_proj.weight": (e, c), "z_proj.bias": (e,), "z_proj_ln.weight": (e,), "z_proj_ln.bias": (e,),
             "encoder_pos_embed_learned": (1, 2 * n, e), "encoder_norm.weight": (e,), "encoder_norm.bias": (e,),
             "decoder_embed.weight": (dd, e), "decoder_embed.bias": (dd,), "mask_token": (1, 1, dd),
             "decoder_pos_embed_learned": (1, 2 * n, dd), "decoder_norm.weight": (dd,),
             "decoder_norm.bias": (dd,), "diffusion_pos_embed_learned": (1, n, dd)}
    for prefix, depth, dim in (("encoder_blocks", cfg.encoder_depth, e), ("decoder_blocks", cfg.decoder_depth, dd)):
        for i in range(depth):
            p = f"{prefix}.{i}."
            keys |= {p + "norm1.weight": (dim,), p + "norm1.bias": (dim,), p + "norm2.weight": (dim,),
                     p + "norm2.bias": (dim,), p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,),
                     p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
                     p + "mlp.fc1.weight": (4 * dim, dim), p + "mlp.fc1.bias": (4 * dim,),
                     p + "mlp.fc2.weight": (dim, 4 * dim), p + "mlp.fc2.bias": (dim,)}
    f = "flowloss.net."
    keys |= {f + "time_embed.mlp.0.weight": (w, 256), f + "time_embed.mlp.0.bias": (w,),
             f + "time_embed.mlp.2.weight": (w, w), f + "time_embed.mlp.2.bias": (w,),
             f + "cond_embed.weight": (w, dd), f + "cond_embed.bias": (w,),
             f + "input_proj.weight": (w, c), f + "input_proj.bias": (w,),
             f + "final_layer.linear.weight": (c, w), f + "final_layer.linear.bias": (c,),
             f + "final_layer.adaLN_modulation.1.weight": (2 * w, w),
             f + "final_layer.adaLN_modulation.1.bias": (2 * w,)}
    for i in range(cfg.flow_depth):
        p = f + f"res_blocks.{i}."
        keys |= {p + "in_ln.weight": (w,), p + "in_ln.bias": (w,), p + "mlp.0.weight": (w, w), p + "mlp.0.bias": (w,),
                 p + "mlp.2.weight": (w, w), p + "mlp.2.bias": (w,),
                 p + "adaLN_modulation.1.weight": (3 * w, w), p + "adaLN_modulation.1.bias": (3 * w,)}
    return keys


def random_official_state(cfg: V2FlowConfig, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Random tensors in the official layout: every weight non-zero (no zero-initialised layer), unit-norm
    codes as the official EMA codebook keeps them."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=g) * scale for k, s in official_key_shapes(cfg).items()}
    code = torch.nn.functional.normalize(torch.randn(official_key_shapes(cfg)["quantizer._codebook.embed"],
                                                     generator=g), dim=-1)
    state["quantizer._codebook.embed"] = code
    state["quantizer._codebook.initted"] = torch.ones(1)
    return state


def write_official_checkpoint(cfg: V2FlowConfig, path: Path, seed: int = 0, readout_gain: float = 1.0,
                              **args_overrides: object,
                              ) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A ``checkpoint-last.pth`` laid out as the official ``misc.save_model`` writes it: model, model_ema,
    optimizer, epoch, scaler and the argparse ``args`` Namespace. Returns (path, raw state, EMA state).

    ``readout_gain`` multiplies the last readout layer: at the random scale the vocabulary softmax is nearly
    uniform, every token mixes the same mean embedding and snaps to the same code; a trained readout is peaked.
    """
    raw, ema = random_official_state(cfg, seed), random_official_state(cfg, seed + 1)
    last = f"downsampler.readout.{2 * (cfg.readout_depth - 1)}.weight"
    for state in (raw, ema):
        state[last] *= readout_gain
    size = cfg.name.split("-")[0] if cfg.name.split("-")[0] in ("base", "large", "huge") else "base"
    fields = dict(model=f"v2flow_{size}", img_size=cfg.img_size, vae_stride=cfg.codec_stride,
                  vae_embed_dim=cfg.latent_channels, patch_size=1, buffer_size=cfg.buffer_size,
                  flowloss_w=cfg.flow_width, flowloss_d=cfg.flow_depth, visual_vocabulary=True, num_iter=4,
                  flow_method="linear_flow")
    fields.update(args_overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": raw, "model_ema": ema, "optimizer": {"state": {}, "param_groups": [{"lr": 3e-4}]},
                "epoch": 12, "scaler": {"scale": 65536.0, "growth_factor": 2.0},
                "args": argparse.Namespace(**fields)}, path)
    return path, raw, ema
