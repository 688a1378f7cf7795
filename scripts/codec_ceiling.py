"""How far above the grid baseline can a *learned* fixed-rate code per token get on this CPU?

A plain VQ autoencoder, not V2Flow: a conv encoder (stride-2 stem, then one cell per token) → 32-d
Euclidean VQ with K codes (EMA 0.99, initialised from a batch, dead codes re-seeded) → 3×3 conv decoder
over the grid of codes with a pixel shuffle; MSE, AdamW, batch 32, random crops (scales 1, 0.5, 0.25) of
the 14 training photos, for a fixed wall time. It prints, for held-out crops at crop scales 0.25 / 0.5 /
1.0 (8 per photo, as `v2flow-rt eval`), [PSNR, grid-baseline PSNR] in dB. Unlike the k-means figures of
``grid_ceiling.py``, the code here is learned together with a decoder that reads neighbouring cells.

    python scripts/codec_ceiling.py --codes 4096 --minutes 12 > docs/codec_ceiling.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from v2flow_rt.data import HELDOUT_PHOTOS, TRAIN_PHOTOS, CropSampler, eval_crops, load_photo  # noqa: E402
from v2flow_rt.metrics import grid_baseline, psnr  # noqa: E402
from v2flow_rt.reference.train import ResBlock as Res  # noqa: E402


class EmaVQ:
    """Euclidean VQ with EMA code updates (decay 0.99); codes start as a batch's vectors."""

    def __init__(self, k: int, d: int) -> None:
        self.k, self.d = k, d
        self.book = torch.randn(k, d)                  # replaced by a batch's vectors at the first step
        self.sums = self.book.clone()
        self.count = torch.ones(k)
        self.started = False

    def __call__(self, z: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        b, d, g, _ = z.shape
        f = z.permute(0, 2, 3, 1).reshape(-1, d)                                 # (B·g·g, d)
        if train and not self.started:
            self.book = f[torch.randint(0, len(f), (self.k,))].detach().clone()
            self.sums, self.started = self.book.clone(), True
        dist = f.pow(2).sum(1, keepdim=True) - 2 * f @ self.book.T + self.book.pow(2).sum(1)[None]
        ids = dist.argmin(1)
        q = self.book[ids]
        if train:
            with torch.no_grad():
                onehot = F.one_hot(ids, self.k).float()
                self.count.mul_(0.99).add_(onehot.sum(0), alpha=0.01)
                self.sums.mul_(0.99).add_(onehot.T @ f.detach(), alpha=0.01)
                self.book = self.sums / self.count.clamp_min(1e-5)[:, None]
                dead = self.count < 1e-3
                if dead.any():
                    pick = f[torch.randint(0, len(f), (int(dead.sum()),))].detach()
                    self.book[dead], self.sums[dead], self.count[dead] = pick, pick, 1.0
        commit = F.mse_loss(f, q.detach())
        q = f + (q - f).detach()                                                 # straight-through
        return q.reshape(b, g, g, d).permute(0, 3, 1, 2), commit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codes", type=int, default=4096)
    ap.add_argument("--minutes", type=float, default=12.0)
    ap.add_argument("--cell", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    p, dim, width = a.cell, 32, 128
    enc = nn.Sequential(nn.Conv2d(3, 64, 4, 2, 1), nn.GELU(), nn.Conv2d(64, width, p // 2, p // 2),
                        Res(width), Res(width), nn.GELU(), nn.Conv2d(width, dim, 1))
    dec = nn.Sequential(nn.Conv2d(dim, width, 3, padding=1), Res(width), Res(width), Res(width), nn.GELU(),
                        nn.Conv2d(width, 3 * p * p, 1), nn.PixelShuffle(p))
    vq = EmaVQ(a.codes, dim)
    opt = torch.optim.AdamW([*enc.parameters(), *dec.parameters()], 1e-3, weight_decay=0.0)
    sampler = CropSampler([load_photo(n) for n in TRAIN_PHOTOS], a.size, scales=(1.0, 0.5, 0.25))
    rng, start, step = np.random.default_rng(0), time.time(), 0
    while time.time() - start < a.minutes * 60:
        x = torch.from_numpy(sampler.sample(32, rng))
        q, commit = vq(enc(x), True)
        loss = F.mse_loss(dec(q), x) + 0.25 * commit
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 500 == 0:
            print(f"step {step} loss {loss.item():.4f} {(time.time() - start) / 60:.1f} min", file=sys.stderr)
    out: dict[str, object] = {"codes": a.codes, "cell": p, "size": a.size, "minutes": a.minutes, "steps": step}
    with torch.no_grad():
        for scale in (0.25, 0.5, 1.0):
            held = eval_crops(list(HELDOUT_PHOTOS), a.size, per_image=8, scale=scale)
            rec = dec(vq(enc(torch.from_numpy(held)), False)[0]).numpy()
            out[str(scale)] = [round(psnr(rec, held, 2.0), 2),
                               round(psnr(grid_baseline(held, a.size // p), held, 2.0), 2)]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
