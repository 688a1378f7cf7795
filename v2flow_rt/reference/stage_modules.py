"""One ``torch.nn.Module`` per exported stage, with exactly the I/O names and order of ``stages.stage_specs``.

Each wrapper holds only the parts of the reference model its stage needs and computes what the reference
computes, in the same order of operations except where noted below:

| module | reference it mirrors |
|---|---|
| ``CodecEncode`` / ``CodecDecode`` | ``PatchCodec`` / ``DCAECodec`` ``encode`` / ``decode`` |
| ``Tokenizer`` | ``V2Flow.tokenize`` (deterministic softmax path) |
| ``TokenEmbed`` | ``V2Flow.embed_ids`` (without the host-side range check) |
| ``MarStep`` | ``forward_mae_decoder(forward_mae_encoder(tokens, buffer, keep_idx), keep_idx)`` |
| ``Velocity`` | ``V2Flow.velocity`` |
| ``Ode`` / ``OdeCfg`` | ``sampling.integrate`` over ``V2Flow.velocity`` (the host solver, all steps unrolled) |

The fused ODE graphs call the very solver functions of ``sampling.solvers`` on torch tensors, so the
solver math exists once. What does not depend on the state x is hoisted out of the steps: ``cond_embed(z)``
runs once per call, the time embeddings of the σ the solver evaluates are constants computed at
construction, and the adaLN modulations, which depend on (σ, z) only, are computed for several σ in one
matmul (all of the velocity net's modulation Linears stacked into one, ``SimpleMLPAdaLN.stacked_modulation``,
over the rows of ``group`` evaluations at once). The values are the reference's up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import V2FlowConfig
from ..errors import BackendUnavailable, ConfigError, ExportError
from ..sampling import SamplerSettings
from ..sampling.solvers import evaluated_sigmas, sigma_grid, solver_func
from ..stages import BAKED_SAMPLER_FIELDS, ONE_CALL_STAGES, STAGE_NAMES, StageSpec
from .codecs import DCAECodec, PatchCodec, build_codec
from .model import V2Flow
from .resampler import l2norm
from .transformer import SimpleMLPAdaLN

Codec = PatchCodec | DCAECodec


class CodecEncode(nn.Module):
    """images [B, 3, H, W] in [-1, 1] → scaled latent [B, C, g, g]."""

    def __init__(self, codec: Codec) -> None:
        super().__init__()
        self.codec = codec

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(images)


class CodecDecode(nn.Module):
    """scaled latent [B, C, g, g] → images [B, 3, H, W]."""

    def __init__(self, codec: Codec) -> None:
        super().__init__()
        self.codec = codec

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latent)


class Tokenizer(nn.Module):
    """latent [B, C, g, g] → ids [B, N] int64: downsampler → softmax → @E → l2norm → @codebookᵀ → argmax."""

    def __init__(self, model: V2Flow) -> None:
        super().__init__()
        self.downsampler = model.downsampler
        self.register_buffer("llm_embed_tokens", model.llm_embed_tokens.detach().clone())   # [V, d]
        self.register_buffer("codebook_t", model.quantizer.codebook.detach().t().contiguous())  # [d, K]

    def similarities(self, latent: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each token's vocabulary mix to every code [B, N, K] (for tie checks)."""
        p = self.downsampler(latent).softmax(dim=-1)                          # (B, N, V)
        mixed = p @ self.llm_embed_tokens                                     # (B, N, d)
        return l2norm(mixed) @ self.codebook_t                                # (B, N, K)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.similarities(latent).argmax(dim=-1)                       # (B, N)


class TokenEmbed(nn.Module):
    """ids [B, N] int64 → buffer [B, N, D] = projector(codebook[ids])."""

    def __init__(self, model: V2Flow) -> None:
        super().__init__()
        self.register_buffer("codebook", model.quantizer.codebook.detach().clone())     # [K, d]
        self.projector = model.projector

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.projector(F.embedding(ids, self.codebook))


class MarStep(nn.Module):
    """tokens [B, L, C], buffer [B, N, D], keep_idx [B, N+K] int64 → z [B, L, Dz] (gather/scatter, no NonZero).

    Delegates to the reference ``forward_mae_encoder`` / ``forward_mae_decoder`` (the model is held
    whole; its other parts are not reached by the traced graph).
    """

    def __init__(self, model: V2Flow) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, buffer: torch.Tensor, keep_idx: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """``positions`` [B, M]: z at those token positions only [B, M, Dz] (the one-call graph's use)."""
        x = self.model.forward_mae_encoder(tokens, buffer, keep_idx)          # (B, N+K, D)
        return self.model.forward_mae_decoder(x, keep_idx, positions)         # (B, L|M, Dz)


class Velocity(nn.Module):
    """x [M, C], t [M] (σ·1000), c [M, Dz] → v [M, C]."""

    def __init__(self, model: V2Flow) -> None:
        super().__init__()
        self.net: SimpleMLPAdaLN = model.flowloss.net

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, c)


# A matmul over the adaLN modulations of G evaluations writes G · rows · (3·depth + 2)·W floats: G is the
# most evaluations whose block stays within this at the largest row count the graph is built for.
HOISTED_MODULATION_BYTES = 512 * 2**20


class _FusedOde(nn.Module):
    """Shared part of the fused ODE graphs: the solver over the velocity net, with the time embeddings as
    constants and the modulations of ``group`` evaluations per matmul.

    ``max_rows``: the most token rows one call takes (noise rows; a guided call runs twice as many through
    the net), which bounds ``group`` by ``HOISTED_MODULATION_BYTES``."""

    copies = 1                                          # rows through the velocity net per noise row

    def __init__(self, model: V2Flow, solver: str, steps: int, shift: float, *, max_rows: int) -> None:
        super().__init__()
        try:
            self._solver_fn = solver_func(solver)
        except ConfigError as exc:                      # an export asked for it: the export's error
            raise ExportError(str(exc)) from None
        self.net: SimpleMLPAdaLN = model.flowloss.net
        self.solver, self.steps, self.shift = solver, steps, shift
        sigmas = sigma_grid(steps, shift)
        evaluated = evaluated_sigmas(solver, sigmas)
        # The host loop feeds t = float32(σ·1000) per row (sampling.loop.guided_velocity); the same float32
        # value here gives the same embedding, bit for bit, as the reference velocity call.
        t = torch.tensor([s * 1000.0 for s in evaluated], dtype=torch.float32)
        with torch.no_grad():
            emb = self.net.time_embed(t)                                      # (E, W)
            mod_weight, mod_bias = self.net.stacked_modulation()
        self.register_buffer("time_emb", emb.detach().clone())
        self.register_buffer("mod_weight", mod_weight.detach().clone())     # [(3·depth + 2)·W, W]
        self.register_buffer("mod_bias", mod_bias.detach().clone())
        self._index = {s: i for i, s in enumerate(evaluated)}
        per_eval = max(1, max_rows) * self.copies * mod_weight.shape[0] * mod_bias.element_size()
        self.group = max(1, min(len(evaluated), HOISTED_MODULATION_BYTES // per_eval))
        # Plain Python floats: no numpy inside forward, so torch.compile traces the loop cleanly.
        self._sigmas = tuple(float(s) for s in sigmas)

    def _modulations(self, c_emb: torch.Tensor) -> Callable[[float], list[torch.Tensor]]:
        """σ → every adaLN modulation of the rows of ``c_emb`` (the condition embedding) at σ, as the
        (3·depth + 2) chunks [M, W] that ``SimpleMLPAdaLN.from_modulation`` takes. Evaluations are grouped in
        the solver's order, ``group`` to a group, and a group's modulations are computed in one matmul when
        its first σ is asked for.

        The matmul's rows are laid out (row, σ) so that its output [M, G·(3·depth + 2)·W] splits into every
        chunk of every σ of the group along its last axis, whose sizes are static: one Split node of 2-D
        pieces per group in the exported graph (a (σ, row) layout needs a split per σ, then one per chunk,
        and copies the block twice)."""
        done: dict[int, list[torch.Tensor]] = {}
        width = self.mod_weight.shape[1]
        chunks = self.mod_weight.shape[0] // width

        def at(sigma: float) -> list[torch.Tensor]:
            i = self._index.get(sigma)
            if i is None:  # the solvers only evaluate where the dry run saw them; anything else is a solver change
                raise ExportError(f"solver {self.solver!r} evaluated σ={sigma}, which its dry run on the "
                                  f"{self.steps}-step grid did not")
            if i not in done:
                first = i - i % self.group
                y = c_emb.unsqueeze(1) + self.time_emb[first:first + self.group].unsqueeze(0)   # (M, G, W)
                mods = F.linear(F.silu(y), self.mod_weight, self.mod_bias)                    # (M, G, K·W)
                pieces = mods.reshape(mods.shape[0], -1).split(width, dim=1)                  # G·K of (M, W)
                for j in range(mods.shape[1]):
                    done[first + j] = list(pieces[j * chunks:(j + 1) * chunks])
            return done[i]

        return at

    def _solve(self, f: Callable[[torch.Tensor, float], torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
        # Same solver function as ``sampling.integrate(solver, f, x, steps, shift)``, on the same grid.
        return self._solver_fn(f, noise, self._sigmas)


class Ode(_FusedOde):
    """noise [M, C], z [M, Dz] → x0 [M, C]: every solver step in one graph."""

    def forward(self, noise: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        mods = self._modulations(self.net.cond_embed(z))                      # cond_embed once per call

        def f(x: torch.Tensor, sigma: float) -> torch.Tensor:
            return self.net.from_modulation(x, mods(sigma))

        return self._solve(f, noise)


class OdeCfg(_FusedOde):
    """noise [M, C], z [M, Dz], z_uncond [M, Dz], cfg_scale [1] → guided x0 [M, C].

    Cond and uncond rows run as one batched [2M] call per evaluation, mixed v_u + s·(v_c − v_u), exactly
    as ``sampling.loop.guided_velocity`` does on the host.
    """

    copies = 2

    def forward(self, noise: torch.Tensor, z: torch.Tensor, z_uncond: torch.Tensor,
                cfg_scale: torch.Tensor) -> torch.Tensor:
        m = noise.shape[0]
        mods = self._modulations(self.net.cond_embed(torch.cat([z, z_uncond], dim=0)))   # (2M) rows

        def f(x: torch.Tensor, sigma: float) -> torch.Tensor:
            v = self.net.from_modulation(torch.cat([x, x], dim=0), mods(sigma))          # (2M, C)
            v_c, v_u = v[:m], v[m:]
            return v_u + cfg_scale * (v_c - v_u)

        return self._solve(f, noise)


def stage_module(name: str, model: V2Flow, spec: StageSpec, codec: Codec | None = None) -> nn.Module:
    """The eval-mode wrapper of stage ``name`` (ODE settings from ``spec.attrs``)."""
    if name in ("codec_encode", "codec_decode"):
        if codec is None:
            codec = build_codec(model.config)
        mod: nn.Module = CodecEncode(codec) if name == "codec_encode" else CodecDecode(codec)
    elif name == "tokenizer":
        mod = Tokenizer(model)
    elif name == "token_embed":
        mod = TokenEmbed(model)
    elif name == "mar_step":
        mod = MarStep(model)
    elif name == "velocity":
        mod = Velocity(model)
    elif name in ("ode", "ode_cfg"):
        cls = Ode if name == "ode" else OdeCfg
        mod = cls(model, str(spec.attrs["solver"]), int(spec.attrs["steps"]), float(spec.attrs["shift"]),
                  max_rows=spec.dims["rows"][2])
    elif name in ONE_CALL_STAGES:
        from .one_call import Detokenize, Tokenize

        if codec is None:
            codec = build_codec(model.config)
        if name == "tokenize":
            mod = Tokenize(model, codec)
        else:
            fields = {k: spec.attrs[k] for k in BAKED_SAMPLER_FIELDS if k != "guided"}
            settings = SamplerSettings(**fields, cfg_scale=2.0 if spec.attrs["guided"] else 1.0)
            mod = Detokenize(model, codec, settings, max_batch=spec.dims["batch"][2])
    else:
        raise ExportError(f"unknown stage {name!r}; stages are {list(STAGE_NAMES)}")
    return mod.eval()


def stage_modules(model: V2Flow, specs: dict[str, StageSpec], codec: Codec | None = None,
                  ) -> dict[str, nn.Module]:
    """``stage_module`` for every spec, sharing one codec."""
    return {name: stage_module(name, model, spec, codec) for name, spec in specs.items()}


def codec_available(config: V2FlowConfig, dcae_path: str | None = None) -> tuple[Codec | None, str]:
    """(codec, "") when the config's codec can be built here, (None, why not) when no codec folder is
    recorded or diffusers is missing. A recorded folder that is missing, broken or of another geometry
    raises CheckpointError: a wrong codec must never be skipped quietly."""
    try:
        return build_codec(config, dcae_path), ""
    except BackendUnavailable as exc:
        return None, str(exc)
