"""The one-call graphs: the whole tokenize and the whole detokenize each as one module, for one engine call.

``Tokenize``: images [B, 3, S, S] in [-1, 1] → ids [B, N] int64 (codec encode, resampler, VQ).

``Detokenize``: ids [B, N] int64, orders [B, N] int64 (a permutation of the positions per row), noise
[B, N, C] float32 (every token's standard-normal initial noise at its position) and, for a guided graph,
cfg_scale [1] → images [B, 3, S, S]. Inside, the masked-AR iterations of ``sampling.sample_tokens`` are
unrolled at their static token counts and each iteration's ODE is the fused solver of ``stage_modules``
(every step unrolled). Nothing of the schedule is written here a second time: the counts come from
``sampling.mask_lengths``, the guidance weights from ``sampling.cfg_weight``, the solver from
``sampling.solvers`` through ``Ode`` / ``OdeCfg``, and the bookkeeping mirrors the loop step for step:

- iteration k keeps ``order[:, :mask_len_k]`` masked and predicts ``order[:, mask_len_k:mask_len_{k-1}]``
  (the tail of the order first); the encoder sees the buffer and the known tokens in increasing position
  order, as ``stages.keep_indices`` gives them to the stage graphs;
- the masked transformer's last block runs only at the predicted positions (``forward_mae_decoder``'s
  ``positions``): the loop computes z everywhere and uses those rows, the same values;
- the predicted tokens start from ``noise`` at their positions times the temperature;
- guidance as the loop does it: ``fake_latent`` as the unconditional ``c`` (official) or a second masked
  transformer pass on the ``fake_latent`` buffer (mar).

Given the orders and noise ``sampling.seeded_randomness(seed, ...)`` draws, the graph computes what
``V2FlowPipeline.detokenize(..., seed=seed)`` computes through the loop (to floating-point rounding).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..sampling import SamplerSettings, cfg_weight, mask_lengths, tokens_per_iteration
from .model import V2Flow
from .stage_modules import Codec, CodecDecode, CodecEncode, MarStep, Ode, OdeCfg, TokenEmbed, Tokenizer
from .transformer import scatter_rows


class Tokenize(nn.Module):
    """images [B, 3, S, S] → ids [B, N] int64."""

    def __init__(self, model: V2Flow, codec: Codec) -> None:
        super().__init__()
        self.encode = CodecEncode(codec)
        self.tokenizer = Tokenizer(model)

    def similarities(self, images: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each token's vocabulary mix to every code [B, N, K] (for tie checks)."""
        return self.tokenizer.similarities(self.encode(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokenizer(self.encode(images))                           # (B, N)


class Detokenize(nn.Module):
    """ids [B, N], orders [B, N], noise [B, N, C] (, cfg_scale [1]) → images [B, 3, S, S].

    ``max_batch``: the most images one call takes; with the largest iteration's token count it bounds the
    rows of one ODE solve, and so how many evaluations' modulations one matmul computes (``_FusedOde``)."""

    def __init__(self, model: V2Flow, codec: Codec, settings: SamplerSettings, max_batch: int) -> None:
        super().__init__()
        cfg = model.config
        self.settings = settings.check()
        self.num_tokens, self.token_dim, self.grid = cfg.num_tokens, cfg.token_dim, cfg.grid_size
        self.embed = TokenEmbed(model)
        self.mar = MarStep(model)
        self.decode = CodecDecode(codec)
        self.guided = settings.guided
        if self.guided and settings.cfg_mode == "official" and cfg.encoder_dim != cfg.decoder_dim:
            raise ConfigError(f"official CFG feeds fake_latent (dim {cfg.encoder_dim}) to the velocity net, whose "
                              f"condition dim is {cfg.decoder_dim}; use cfg_mode='mar'")
        self.lengths = mask_lengths(cfg.num_tokens, settings.num_iter)
        most = max_batch * max(tokens_per_iteration(cfg.num_tokens, settings.num_iter))   # rows of one solve
        ode = OdeCfg if self.guided else Ode
        self.ode = ode(model, settings.solver, settings.steps, settings.shift, max_rows=most)
        self.register_buffer("fake_latent", model.fake_latent.detach().reshape(-1).clone())   # (D,)
        self.weights = [cfg_weight(settings.cfg_schedule, cfg.num_tokens, n) for n in self.lengths]

    def forward(self, ids: torch.Tensor, orders: torch.Tensor, noise: torch.Tensor,
                cfg_scale: torch.Tensor | None = None) -> torch.Tensor:
        n, c = self.num_tokens, self.token_dim
        b = ids.shape[0]
        buffer = self.embed(ids)                                                        # (B, N, D)
        fake_buffer = self.fake_latent.expand_as(buffer) if self.guided else buffer
        head = torch.arange(n, device=ids.device).expand(b, n)                          # the buffer slots
        tokens = torch.zeros(b, n, c, dtype=noise.dtype, device=noise.device)
        prev = n
        for next_len, weight in zip(self.lengths, self.weights):
            if prev < n:       # known tokens in increasing position order, after the buffer
                known = torch.sort(orders[:, prev:], dim=1).values                      # (B, N − prev)
                keep = torch.cat([head, known + n], dim=1)
            else:
                keep = head
            pred = orders[:, next_len:prev]                                             # (B, M)
            m = prev - next_len
            z_pred = self.mar(tokens, buffer, keep, pred).reshape(b * m, -1)            # (B·M, Dz)
            x = torch.gather(noise, 1, pred[..., None].expand(-1, -1, c)).reshape(b * m, c)
            x = x * self.settings.temperature
            if self.guided:
                assert cfg_scale is not None        # the guided graph's spec makes it an input
                scale = 1.0 + (cfg_scale - 1.0) * weight
                if self.settings.cfg_mode == "mar":
                    z_u = self.mar(tokens, fake_buffer, keep, pred).reshape(b * m, -1)
                else:
                    z_u = self.fake_latent.expand(b * m, -1)
                x0 = self.ode(x, z_pred, z_u, scale)                                    # (B·M, C)
            else:
                x0 = self.ode(x, z_pred)
            tokens = scatter_rows(tokens, pred, x0.reshape(b, m, c))                    # (B, N, C)
            prev = next_len
        latent = tokens.transpose(1, 2).reshape(b, c, self.grid, self.grid)             # (B, C, g, g)
        return self.decode(latent)
