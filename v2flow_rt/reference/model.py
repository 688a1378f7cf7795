"""The PyTorch reference V2Flow: resampler → cosine VQ → projector → MAR encoder/decoder → velocity net.

This module defines what "correct" means for every exported stage. Names follow the paper and MAR
(``forward_mae_encoder``, ``forward_mae_decoder``, ``sample_tokens``), parameters follow the official
checkpoint (see ``shared/spec/official-v2flow.md`` §6.2). Deviations from the official code, on purpose:

- tokenization is deterministic by default (plain softmax); the official code adds Gumbel noise at
  inference too. Pass ``gumbel_seed`` to get seeded Gumbel noise.
- the unused ``class_emb`` (67 M parameters) is not built; import drops it, export can write it back.
- masked tokens are skipped with an index gather whose length comes from the input, not with
  ``nonzero``, so the graph has no data-dependent shapes (the result is identical).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import V2FlowConfig
from ..errors import ConfigError, ShapeError
from ..sampling import SamplerSettings, sample_tokens
from ..sampling.loop import OdeFn
from ..stages import keep_indices as stages_keep_indices
from .resampler import STCConnector, VectorQuantize, build_mlp
from .transformer import Block, FlowLoss, SimpleMLPAdaLN, scatter_rows


def keep_indices(mask: torch.Tensor, buffer_size: int) -> torch.Tensor:
    """``stages.keep_indices`` (the one definition) on a torch mask [B, L] (True/1 = unknown) → int64
    [B, N + K] on the mask's device: the buffer, then the known tokens in increasing position order."""
    keep = stages_keep_indices(mask.detach().bool().cpu().numpy(), buffer_size)
    return torch.from_numpy(keep).to(mask.device)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """MAE-style 2-D sin-cos position table [grid², dim] in raster order (half the channels per axis)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        angle = coord[:, None] * omega[None]
        parts += [torch.sin(angle), torch.cos(angle)]
    table = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(table, (0, dim - table.shape[1])).float()


class V2Flow(nn.Module):
    """The whole tokenizer and decoder. ``llm_embed`` [V, d] is the frozen LLM input-embedding table."""

    def __init__(self, config: V2FlowConfig, llm_embed: torch.Tensor | None = None) -> None:
        super().__init__()
        cfg = self.config = config.validate()
        n, c, d, dd = cfg.num_tokens, cfg.token_dim, cfg.encoder_dim, cfg.decoder_dim
        # --- visual vocabulary resampler
        self.downsampler = STCConnector(c, cfg.resampler_hidden, cfg.llm_vocab_size, cfg.resampler_depth,
                                        cfg.readout_depth, cfg.resampler_offset)
        if llm_embed is None:
            llm_embed = torch.randn(cfg.llm_vocab_size, cfg.llm_dim) * 0.02
        if tuple(llm_embed.shape) != (cfg.llm_vocab_size, cfg.llm_dim):
            raise ShapeError(f"llm_embed must be [{cfg.llm_vocab_size}, {cfg.llm_dim}] (llm_vocab_size, "
                             f"llm_dim), got {list(llm_embed.shape)}")
        self.register_buffer("llm_embed_tokens", llm_embed.float().clone())
        self.quantizer = VectorQuantize(cfg.llm_dim, cfg.codebook_size, cfg.codebook_decay,
                                        cfg.commitment_weight, cfg.dead_code_threshold)
        self.projector = build_mlp(1, cfg.llm_dim, d)
        self.fake_latent = nn.Parameter(torch.zeros(1, d))
        # --- MAR encoder
        self.z_proj = nn.Linear(c, d)
        self.z_proj_ln = nn.LayerNorm(d, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, cfg.buffer_size + n, d))
        self.encoder_blocks = nn.ModuleList([
            Block(d, cfg.encoder_heads, cfg.mlp_ratio, cfg.attn_dropout, cfg.proj_dropout)
            for _ in range(cfg.encoder_depth)])
        self.encoder_norm = nn.LayerNorm(d, eps=1e-6)
        # --- MAR decoder
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, cfg.buffer_size + n, dd))
        self.decoder_blocks = nn.ModuleList([
            Block(dd, cfg.decoder_heads, cfg.mlp_ratio, cfg.attn_dropout, cfg.proj_dropout)
            for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, n, dd))
        self._init_weights()
        self.flowloss = FlowLoss(SimpleMLPAdaLN(c, cfg.flow_width, c, dd, cfg.flow_depth))

    def _init_weights(self) -> None:
        for p in (self.fake_latent, self.encoder_pos_embed_learned, self.mask_token,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        if self.config.pos_init == "sincos-shared":
            # Buffer slot i holds the visual token of grid position i. Giving both the same 2-D sin-cos
            # embedding at init lets attention pair them from the first step; with the official random
            # init that pairing must be discovered, which is slow for small models on little compute.
            g = self.config.grid_size
            with torch.no_grad():
                for p in (self.encoder_pos_embed_learned, self.decoder_pos_embed_learned):
                    table = sincos_2d(p.shape[-1], g)
                    p.copy_(torch.cat([table, table])[None])
                self.diffusion_pos_embed_learned.copy_(sincos_2d(self.diffusion_pos_embed_learned.shape[-1], g)[None])
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ layout helpers
    @staticmethod
    def latent_to_tokens(latent: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] → [B, h·w, C] in raster order (MAR patchify with patch size 1)."""
        return latent.flatten(2).transpose(1, 2)

    def tokens_to_latent(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, C] → [B, C, h, w]."""
        g = self.config.grid_size
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], g, g)

    def _check_latent(self, latent: torch.Tensor) -> None:
        cfg = self.config
        want = (cfg.latent_channels, cfg.grid_size, cfg.grid_size)
        if latent.ndim != 4 or tuple(latent.shape[1:]) != want:
            raise ShapeError(f"latent must be [B, {want[0]}, {want[1]}, {want[2]}] for config "
                             f"{cfg.name!r}, got {list(latent.shape)}")

    # ------------------------------------------------------------------ tokenizer
    def vocabulary_mix(self, latent: torch.Tensor, gumbel: torch.Generator | None = None,
                       gumbel_noise: bool = False) -> torch.Tensor:
        """latent [B, C, h, w] (already scaled) → p·E [B, N, llm_dim].

        p = softmax(logits) (deterministic) or, with ``gumbel_noise``, Gumbel-softmax with τ = 1 drawn
        from ``gumbel`` (seeded) as in official training.
        """
        self._check_latent(latent)
        logits = self.downsampler(latent)                                    # (B, N, V)
        if gumbel_noise:
            u = torch.rand(logits.shape, generator=gumbel, device=logits.device).clamp_(1e-10, 1 - 1e-7)
            logits = logits - torch.log(-torch.log(u))
        p = logits.softmax(dim=-1)
        return p @ self.llm_embed_tokens                                     # (B, N, llm_dim)

    @torch.no_grad()
    def tokenize(self, latent: torch.Tensor, gumbel_seed: int | None = None) -> torch.Tensor:
        """latent [B, C, h, w] (scaled) → token ids [B, N] int64 (deterministic unless gumbel_seed)."""
        gen = None
        if gumbel_seed is not None:
            gen = torch.Generator(device=latent.device).manual_seed(gumbel_seed)
        mixed = self.vocabulary_mix(latent, gen, gumbel_noise=gumbel_seed is not None)
        return self.quantizer.lookup(mixed)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, N] → decoder condition [B, N, D] = projector(codebook[ids]) (the LLM entry point)."""
        k = self.config.codebook_size
        if ids.dtype not in (torch.int64, torch.int32) or ids.ndim != 2:
            raise ShapeError(f"ids must be an integer tensor [B, N], got {ids.dtype} {list(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k):
            raise ShapeError(f"token ids must be in [0, {k}), got range [{int(ids.min())}, {int(ids.max())}]")
        return self.projector(F.embedding(ids.long(), self.quantizer.codebook))

    # ------------------------------------------------------------------ masked transformer
    def forward_mae_encoder(self, tokens: torch.Tensor, buffer: torch.Tensor,
                            keep_idx: torch.Tensor) -> torch.Tensor:
        """tokens [B, L, C], buffer [B, N, D], keep_idx [B, N+K] → encoded known sequence [B, N+K, D]."""
        x = torch.cat([buffer, self.z_proj(tokens)], dim=1)                   # (B, N+L, D)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        x = torch.gather(x, 1, keep_idx[..., None].expand(-1, -1, x.shape[-1]))   # (B, N+K, D)
        for block in self.encoder_blocks:
            x = block(x)
        return self.encoder_norm(x)

    def forward_mae_decoder(self, x: torch.Tensor, keep_idx: torch.Tensor,
                            positions: torch.Tensor | None = None) -> torch.Tensor:
        """encoded [B, N+K, D], keep_idx → per-token condition z [B, L, Dz].

        ``positions`` [B, M] int64 (token positions in [0, L)): z at those positions only [B, M, Dz], equal
        to the full output gathered there; the last block computes attention outputs, projection and MLP
        only at their rows, which is what sampling needs: one iteration predicts M of the L tokens.
        """
        cfg = self.config
        x = self.decoder_embed(x)                                            # (B, N+K, Dz)
        full = self.mask_token.expand(x.shape[0], cfg.buffer_size + cfg.num_tokens, -1)
        full = scatter_rows(full, keep_idx, x)                                # (B, N+L, Dz)
        x = full + self.decoder_pos_embed_learned
        if positions is None:
            for block in self.decoder_blocks:
                x = block(x)
            x = self.decoder_norm(x)[:, cfg.buffer_size:]                    # (B, L, Dz)
            return x + self.diffusion_pos_embed_learned
        for block in self.decoder_blocks[:-1]:
            x = block(x)
        x = self.decoder_blocks[-1](x, positions + cfg.buffer_size)          # (B, M, Dz)
        pos = self.diffusion_pos_embed_learned.expand(x.shape[0], -1, -1)
        return self.decoder_norm(x) + torch.gather(pos, 1, positions[..., None].expand(-1, -1, x.shape[-1]))

    def mar_step(self, tokens: torch.Tensor, mask: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        """tokens [B, L, C], mask [B, L] (True = unknown), buffer [B, N, D] → z [B, L, Dz]."""
        keep = keep_indices(mask, self.config.buffer_size)
        return self.forward_mae_decoder(self.forward_mae_encoder(tokens, buffer, keep), keep)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [M, C], t [M] (σ·1000), c [M, Dz] → v = ε − x0 [M, C]."""
        return self.flowloss.net(x, t, c)

    # ------------------------------------------------------------------ training objective
    def forward(self, latent: torch.Tensor, generator: torch.Generator | None = None,
                aux_head: nn.Module | None = None, phase: str = "joint") -> dict[str, torch.Tensor]:
        """Training losses for a batch of scaled latents [B, C, h, w] (model in train mode).

        linear-flow objective: σ = shift(sigmoid(N(0,1))), x_σ = (1−σ)·x0 + σ·ε, target v = ε − x0, on
        masked tokens only, ``diffusion_batch_mul`` noise draws per token; plus the VQ commitment loss.
        ``aux_head`` (training only, not part of the model): a map from the quantized codes [B, N, d] to
        the tokens [B, L, C] (per token, or reading neighbours: ``train.ContextHead``), whose MSE is added;
        it gives the tokenizer a direct reconstruction gradient.
        ``phase``: ``"joint"`` trains everything; ``"tokenizer"`` only the resampler and codebook (VQ +
        ``aux_head`` losses; no masked transformer or flow); ``"decoder"`` freezes them (no gradient, no
        codebook update) and trains the rest on the fixed codes.
        """
        cfg = self.config
        dev = latent.device
        bsz, seq = latent.shape[0], cfg.num_tokens
        if phase not in ("joint", "tokenizer", "decoder"):
            raise ConfigError(f"phase must be 'joint', 'tokenizer' or 'decoder', got {phase!r}")
        if phase == "tokenizer" and aux_head is None:
            raise ConfigError("the tokenizer phase trains through aux_head; pass one")
        tokens = self.latent_to_tokens(latent)                               # (B, L, C)
        zero = torch.zeros((), device=dev)
        if phase == "decoder":
            with torch.no_grad():
                ids = self.quantizer.lookup(self.vocabulary_mix(latent))      # (B, N)
                quantized, loss_vq = F.embedding(ids, self.quantizer.codebook), zero
        else:
            mixed = self.vocabulary_mix(latent, generator, gumbel_noise=cfg.gumbel_train and self.training)
            quantized, ids, loss_vq = self.quantizer(mixed)
        loss_aux = F.mse_loss(aux_head(quantized), tokens) if aux_head is not None else zero
        stats = {"vq": loss_vq.detach(), "aux": loss_aux.detach(), "codes": torch.tensor(ids.unique().numel())}
        if phase == "tokenizer":
            return {"loss": loss_vq + loss_aux, "flow": zero, **stats}
        buffer = self.projector(quantized)                                   # (B, N, D)
        drop = torch.rand(bsz, generator=generator, device=dev) < cfg.label_drop_prob
        buffer = torch.where(drop[:, None, None], self.fake_latent[None].expand_as(buffer), buffer)
        # One truncated-normal mask ratio per batch (centre 1, σ 0.25, truncated to [min, 1]).
        normal = torch.distributions.Normal(1.0, 0.25)
        lo, hi = normal.cdf(torch.tensor(cfg.mask_ratio_min)), normal.cdf(torch.tensor(1.0))
        u = torch.rand((), generator=generator)
        ratio = float(normal.icdf(lo + (hi - lo) * u).clamp(cfg.mask_ratio_min, 1.0))
        num_masked = max(1, min(seq, math.ceil(seq * ratio)))
        orders = torch.argsort(torch.rand(bsz, seq, generator=generator, device=dev), dim=1)
        mask = torch.zeros(bsz, seq, dtype=torch.bool, device=dev)
        mask.scatter_(1, orders[:, :num_masked], True)
        z = self.mar_step(tokens, mask, buffer)                              # (B, L, Dz)
        idx = orders[:, :num_masked]
        z_m = torch.gather(z, 1, idx[..., None].expand(-1, -1, z.shape[-1])).reshape(-1, z.shape[-1])
        x0 = torch.gather(tokens, 1, idx[..., None].expand(-1, -1, tokens.shape[-1])).reshape(-1, tokens.shape[-1])
        rep = cfg.diffusion_batch_mul
        z_m, x0 = z_m.repeat(rep, 1), x0.repeat(rep, 1)                      # (rep·B·Km, ·)
        s = torch.sigmoid(torch.randn(x0.shape[0], generator=generator, device=dev))
        sigma = cfg.time_shift * s / (1 + (cfg.time_shift - 1) * s)
        noise = torch.randn(x0.shape, generator=generator, device=dev)
        x_t = (1 - sigma[:, None]) * x0 + sigma[:, None] * noise
        pred = self.velocity(x_t, sigma * 1000.0, z_m)
        loss_flow = F.mse_loss(pred, noise - x0)
        loss = loss_flow + loss_vq + loss_aux
        return {"loss": loss, "flow": loss_flow.detach(), **stats}

    # ------------------------------------------------------------------ sampling
    def stages(self) -> "TorchStages":
        return TorchStages(self)

    @torch.no_grad()
    def sample_tokens(self, buffer: torch.Tensor, settings: SamplerSettings | None = None,
                      seed: int | None = 0, *, ode: OdeFn | None = None,
                      on_iteration: Callable[[int, np.ndarray], None] | None = None,
                      orders: np.ndarray | None = None, noise: np.ndarray | None = None,
                      **overrides: Any) -> torch.Tensor:
        """buffer [B, N, D] → sampled latent tokens [B, L, C], through the one numpy sampling loop.

        ``ode``, ``on_iteration``, ``orders`` and ``noise`` are passed to ``sampling.sample_tokens``
        (explicit randomness instead of ``seed``; a fused solver; a per-iteration hook).
        """
        settings = settings or SamplerSettings.from_config(self.config, **overrides)
        out = sample_tokens(self.stages(), buffer.detach().cpu().numpy(), settings, seed,
                            token_dim=self.config.token_dim, ode=ode, on_iteration=on_iteration,
                            orders=orders, noise=noise)
        return torch.from_numpy(out).to(buffer.device)


class TorchStages:
    """Numpy-in/numpy-out stage callables over the reference model, for the sampling loop."""

    def __init__(self, model: V2Flow) -> None:
        self.model = model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.fake_latent = model.fake_latent.detach().float().cpu().numpy().reshape(-1)

    def _t(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    @torch.no_grad()
    def mar_step(self, tokens: np.ndarray, mask: np.ndarray, buffer: np.ndarray) -> np.ndarray:
        z = self.model.mar_step(self._t(tokens).to(self.dtype), self._t(mask), self._t(buffer).to(self.dtype))
        return z.float().cpu().numpy()

    @torch.no_grad()
    def velocity(self, x: np.ndarray, t: np.ndarray, c: np.ndarray) -> np.ndarray:
        v = self.model.velocity(self._t(x).to(self.dtype), self._t(t), self._t(c).to(self.dtype))
        return v.float().cpu().numpy()
