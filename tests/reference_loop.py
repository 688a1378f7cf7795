"""Independent references for decoding tests, written from the spec (shared/spec/official-v2flow.md §2.4, §10),
not from ``v2flow_rt.sampling``: the velocity net in float64 numpy from the state dict, the official seeded
randomness with explicit loops, and the official sampler (mask schedule, tail of the order first, DPM-Solver++
in its noise-/data-prediction form, guidance on the noise prediction) over a float64 copy of the model.

A broken solver, schedule, noise order, guidance mix or velocity layer in the package makes these disagree.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _ln(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def velocity_float64(model: torch.nn.Module, x: np.ndarray, t: np.ndarray, c: np.ndarray) -> np.ndarray:
    """SimpleMLPAdaLN (spec §2.4) in float64 numpy from the official parameter names: x [M, C], t [M]
    (σ·1000), c [M, Dz] → v [M, C]."""
    p = {k[len("flowloss.net."):]: v.detach().double().numpy() for k, v in model.state_dict().items()
         if k.startswith("flowloss.net.")}

    def lin(name: str, a: np.ndarray) -> np.ndarray:
        return a @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    half = 128                                                     # 256-d sinusoidal embedding
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    args = t.astype(np.float64)[:, None] * freqs[None]
    t_emb = lin("time_embed.mlp.2", _silu(lin("time_embed.mlp.0", np.concatenate([np.cos(args), np.sin(args)], -1))))
    y = t_emb + lin("cond_embed", c.astype(np.float64))           # the modulation vector
    h = lin("input_proj", x.astype(np.float64))
    depth = len({k.split(".")[1] for k in p if k.startswith("res_blocks.")})
    for i in range(depth):
        b = f"res_blocks.{i}"
        shift, scale, gate = np.split(lin(f"{b}.adaLN_modulation.1", _silu(y)), 3, axis=-1)
        u = _ln(h) * p[f"{b}.in_ln.weight"] + p[f"{b}.in_ln.bias"]
        h = h + gate * lin(f"{b}.mlp.2", _silu(lin(f"{b}.mlp.0", u * (1 + scale) + shift)))
    shift, scale = np.split(lin("final_layer.adaLN_modulation.1", _silu(y)), 2, axis=-1)
    return lin("final_layer.linear", _ln(h) * (1 + scale) + shift)


def official_mask_lengths(seq_len: int, num_iter: int) -> list[int]:
    """Tokens still masked after each iteration (spec §10): ⌊L·cos(π/2·(k+1)/num_iter)⌋ clamped, last 0."""
    out, remaining = [], seq_len
    for k in range(num_iter):
        n = 0 if k == num_iter - 1 else max(1, min(remaining - 1, int(seq_len * math.cos(math.pi / 2 * (k + 1)
                                                                                           / num_iter))))
        out.append(n)
        remaining = n
    return out


def official_randomness(seed: int, batch: int, seq_len: int, dim: int, num_iter: int,
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(orders [B, L], noise [B, L, C]) a seed stands for: one numpy Generator draws the B permutations, then
    per iteration one standard-normal row per predicted token, batch-major then by position."""
    rng = np.random.default_rng(seed)
    orders = np.stack([rng.permutation(seq_len) for _ in range(batch)]).astype(np.int64)
    noise = np.zeros((batch, seq_len, dim), np.float32)
    prev = seq_len
    for n in official_mask_lengths(seq_len, num_iter):
        predicted = [set(orders[b, n:prev].tolist()) for b in range(batch)]
        rows = rng.standard_normal((sum(len(s) for s in predicted), dim)).astype(np.float32)
        r = 0
        for b in range(batch):
            for pos in range(seq_len):
                if pos in predicted[b]:
                    noise[b, pos] = rows[r]
                    r += 1
        prev = n
    return orders, noise


def official_sample_tokens(model: torch.nn.Module, buffer: torch.Tensor, steps: int, num_iter: int = 4,
                           cfg_scale: float = 1.0, temperature: float = 1.0, shift: float = 3.0,
                           seed: int = 0) -> np.ndarray:
    """The official linear_flow sampler (spec §10) in float64 over a copy of ``model``: buffer [B, N, D] →
    tokens [B, L, C] float64. Guidance (official mode) mixes noise predictions with ``fake_latent`` as the
    velocity net's unconditional c."""
    m64 = copy.deepcopy(model).double().eval()
    cfg = model.config
    bsz, seq, dim = buffer.shape[0], cfg.num_tokens, cfg.token_dim
    orders, noise = official_randomness(seed, bsz, seq, dim, num_iter)
    s = 1.0 - np.linspace(1.0, 0.001, steps + 1)
    sigmas = (shift * s / (1 + (shift - 1) * s))[::-1]
    fake = m64.fake_latent.detach().reshape(1, -1)
    tokens = torch.zeros(bsz, seq, dim, dtype=torch.float64)
    mask = torch.ones(bsz, seq, dtype=torch.bool)
    prev = seq
    with torch.no_grad():
        for n in official_mask_lengths(seq, num_iter):
            z = m64.mar_step(tokens, mask, buffer.double())                          # (B, L, Dz)
            pred = torch.zeros(bsz, seq, dtype=torch.bool)
            for b in range(bsz):
                pred[b, torch.from_numpy(orders[b, n:prev])] = True
            zc = z[pred]                                                             # (M, Dz), (b, pos) order
            x = torch.from_numpy(noise).double()[pred] * temperature

            def noise_pred(x: torch.Tensor, sigma: float, zc: torch.Tensor = zc) -> torch.Tensor:
                t = torch.full((x.shape[0],), sigma * 1000.0, dtype=torch.float64)
                n_c = (1 - sigma) * m64.velocity(x, t, zc) + x
                if cfg_scale == 1.0:
                    return n_c
                n_u = (1 - sigma) * m64.velocity(x, t, fake.expand_as(zc)) + x
                return n_u + cfg_scale * (n_c - n_u)

            x0_prev, h_prev = None, 0.0
            for i in range(steps):
                sig, sig_next = float(sigmas[i]), float(sigmas[i + 1])
                x0 = (x - sig * noise_pred(x, sig)) / (1 - sig)
                if sig_next == 0.0:
                    x = x0                                   # the final step returns the x0 prediction
                    break
                h = math.log((1 - sig_next) / sig_next) - math.log((1 - sig) / sig)
                d = x0 if x0_prev is None else (1 + h / (2 * h_prev)) * x0 - h / (2 * h_prev) * x0_prev
                x = (sig_next / sig) * x - (1 - sig_next) * math.expm1(-h) * d
                x0_prev, h_prev = x0, h
            tokens[pred] = x
            mask = mask & ~pred
            prev = n
    return tokens.numpy()
