"""Visual vocabulary resampler: STC connector, LLM-vocabulary mixing and the cosine-VQ codebook.

Parameter names follow the official checkpoint (timm RegNet blocks inside VideoLLaMA2's STC connector,
lucidrains' ``VectorQuantize``), so official state dicts map 1:1; no timm or quantizer library needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- STC connector


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW map, optionally followed by an activation (timm LayerNormAct2d).

    eps is 1e-5: timm's norm-act conversion drops the 1e-6 of LayerNorm2d (spec §10).
    """

    def __init__(self, channels: int, act: bool = True) -> None:
        super().__init__(channels, eps=1e-5)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return self.act(x.permute(0, 3, 1, 2))


class ConvNormAct(nn.Module):
    """Conv (no bias) → LayerNorm2d (+ SiLU); the norm is called ``bn`` as in timm."""

    def __init__(self, cin: int, cout: int, kernel: int, groups: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False)
        self.bn = LayerNorm2d(cout, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class SEModule(nn.Module):
    """Squeeze-and-excitation with SiLU and a sigmoid gate."""

    def __init__(self, channels: int, rd_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)                       # (B, C, 1, 1)
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(s))))


class Bottleneck(nn.Module):
    """timm RegNet bottleneck, bottle_ratio 1, group size 1 (3×3 depthwise), SE ratio 0.25 of the input."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(cin, cout, 1)
        self.conv2 = ConvNormAct(cout, cout, 3, groups=cout)
        self.se = SEModule(cout, int(round(cin * 0.25)))
        self.conv3 = ConvNormAct(cout, cout, 1, act=False)
        self.downsample = ConvNormAct(cin, cout, 1, act=False) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.conv3(self.se(self.conv2(self.conv1(x))))
        return F.silu(x + shortcut)


class RegStage(nn.Module):
    """``depth`` bottlenecks named b1..b{depth}, stride 1."""

    def __init__(self, depth: int, cin: int, cout: int) -> None:
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", Bottleneck(cin if i == 0 else cout, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.children():
            x = block(x)
        return x


def build_mlp(depth: int, cin: int, cout: int) -> nn.Sequential:
    """Linear(cin→cout) followed by (GELU, Linear(cout→cout)) × (depth − 1), as VideoLLaMA2's build_mlp."""
    layers: list[nn.Module] = [nn.Linear(cin, cout)]
    for _ in range(1, depth):
        layers += [nn.GELU(), nn.Linear(cout, cout)]
    return nn.Sequential(*layers)


class STCConnector(nn.Module):
    """RegStage → (identity pooling) SiLU → RegStage → MLP readout, on a 4-D NCHW latent (t = 1).

    The official ``AvgPool3d((1,1,1))`` is the identity and is dropped; the SiLU after it is kept.
    ``offset`` ≠ 0 appends a constant input channel of that value (``V2FlowConfig.resampler_offset``):
    the first block is a bias-free 1×1 conv then LayerNorm, blind to the length of each latent vector.
    """

    def __init__(self, cin: int, hidden: int, cout: int, depth: int, mlp_depth: int, offset: float = 0.0) -> None:
        super().__init__()
        self.offset = offset
        self.s1 = RegStage(depth, cin + (1 if offset else 0), hidden)
        self.s2 = RegStage(depth, hidden, hidden)
        self.readout = build_mlp(mlp_depth, hidden, cout)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        if self.offset:
            const = torch.full_like(latent[:, :1], self.offset)              # (B, 1, h, w)
            latent = torch.cat([latent, const], dim=1)                       # (B, C+1, h, w)
        x = F.silu(self.s1(latent))                              # (B, hidden, h, w)
        x = self.s2(x)
        x = x.flatten(2).transpose(1, 2)                         # (B, h·w, hidden), raster order
        return self.readout(x)                                   # (B, N, V) logits


# ----------------------------------------------------------------------------- cosine VQ


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=eps)


class CosineCodebook(nn.Module):
    """Buffers of lucidrains' CosineSimCodebook: unit-norm codes updated by EMA (never by gradient)."""

    initted: torch.Tensor
    cluster_size: torch.Tensor
    embed_avg: torch.Tensor
    embed: torch.Tensor

    def __init__(self, size: int, dim: int, decay: float, dead_code_threshold: float = 0.0) -> None:
        super().__init__()
        self.decay = decay
        self.dead_code_threshold = dead_code_threshold
        embed = l2norm(nn.init.kaiming_uniform_(torch.empty(1, size, dim)))
        self.register_buffer("initted", torch.tensor([1.0]))
        self.register_buffer("cluster_size", torch.zeros(1, size))
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("embed", embed)

    @torch.no_grad()
    def ema_update(self, x_n: torch.Tensor, ids: torch.Tensor) -> None:
        """EMA update from normalised inputs [M, d] and their code ids [M] (laplace-smoothed)."""
        size = self.embed.shape[1]
        bins = torch.bincount(ids, minlength=size).to(x_n.dtype)             # (K,)
        embed_sum = torch.zeros_like(self.embed_avg[0]).index_add_(0, ids, x_n)   # (K, d)
        self.cluster_size.mul_(self.decay).add_(bins[None], alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(embed_sum[None], alpha=1 - self.decay)
        total = self.cluster_size.sum(-1, keepdim=True)
        smoothed = (self.cluster_size + 1e-5) / (total + size * 1e-5) * total
        self.embed.copy_(l2norm(self.embed_avg / smoothed[..., None]))
        if self.dead_code_threshold > 0:
            dead = self.cluster_size[0] < self.dead_code_threshold
            n_dead = int(dead.sum())
            if n_dead:
                # Re-seed dead codes from this batch's inputs (an option; the official run never does).
                pick = torch.randint(0, x_n.shape[0], (n_dead,), device=x_n.device)
                self.embed[0, dead] = x_n[pick]
                self.embed_avg[0, dead] = x_n[pick]
                self.cluster_size[0, dead] = 1.0


def rotate_to(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Rotation trick (arXiv 2410.06424): value ``tgt``, gradient to ``src`` through a fixed rotation."""
    norm_src = src.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    norm_tgt = tgt.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    u = (src / norm_src).detach()
    q = (tgt / norm_tgt).detach()
    w = l2norm(u + q).detach()
    e = src
    rotated = (e - 2 * (e * w).sum(-1, keepdim=True) * w
               + 2 * (e * u).sum(-1, keepdim=True) * q)
    return rotated * (norm_tgt / norm_src).detach()


class VectorQuantize(nn.Module):
    """Cosine-similarity VQ: l2norm → matmul → argmax → gather; EMA codes and rotation trick in training."""

    def __init__(self, dim: int, size: int, decay: float, commitment_weight: float,
                 dead_code_threshold: float = 0.0) -> None:
        super().__init__()
        self.commitment_weight = commitment_weight
        self._codebook = CosineCodebook(size, dim, decay, dead_code_threshold)

    @property
    def codebook(self) -> torch.Tensor:
        """The unit-norm code table [K, d]."""
        return self._codebook.embed[0]

    def lookup(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest code ids by cosine similarity: x [..., d] → ids [...] int64."""
        return (l2norm(x) @ self.codebook.t()).argmax(dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, N, d] → (quantized [B, N, d], ids [B, N], commitment loss scalar)."""
        x_n = l2norm(x.float())
        ids = (x_n @ self.codebook.t()).argmax(dim=-1)                        # (B, N)
        code = F.embedding(ids, self.codebook)                                # (B, N, d)
        if not self.training:
            return code, ids, x.new_zeros(())
        # Like the official library: quantize and commit against the codes before this step's EMA update.
        code = code.clone()
        self._codebook.ema_update(x_n.reshape(-1, x_n.shape[-1]).detach(), ids.reshape(-1))
        loss = F.mse_loss(x_n, code.detach()) * self.commitment_weight
        return rotate_to(x_n, code), ids, loss
