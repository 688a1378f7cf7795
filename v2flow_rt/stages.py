"""The stage contract: one spec per exported sub-network, read by the exporter, the validator, the engine
builders and the runtime alike. Numpy only.

A ``StageSpec`` names its inputs and outputs with dtypes and symbolic shapes; symbolic dims have
min/opt/max ranges (TensorRT optimisation profiles, ONNX dynamic axes, random sample inputs).

Stages (shapes for a config with N tokens of C values, encoder width D, decoder width Dz):

| stage | inputs → outputs |
|---|---|
| ``codec_encode`` | images [B,3,H,W] in [-1,1] → latent [B,C,g,g] (scaled) |
| ``tokenizer`` | latent [B,C,g,g] → ids [B,N] int64 |
| ``token_embed`` | ids [B,N] int64 → buffer [B,N,D] (the entry point for ids from an LLM) |
| ``mar_step`` | tokens [B,L,C], buffer [B,N,D], keep_idx [B,S] int64 → z [B,L,Dz]; S = N + known tokens |
| ``velocity`` | x [M,C], t [M] (σ·1000), c [M,Dz] → v [M,C] |
| ``ode`` | noise [M,C], z [M,Dz] → x0 [M,C] (all solver steps in one graph) |
| ``ode_cfg`` | noise [M,C], z [M,Dz], z_uncond [M,Dz], cfg_scale [1] → x0 [M,C] (guided) |
| ``codec_decode`` | latent [B,C,g,g] → images [B,3,H,W] |
| ``tokenize`` | images [B,3,H,W] → ids [B,N] int64: codec_encode and tokenizer in one graph |
| ``detokenize`` | ids [B,N], orders [B,N] int64, noise [B,N,C] (, cfg_scale [1]) → images [B,3,H,W]: the whole |
| | decode in one graph (every masked-AR iteration and solver step unrolled; ``reference.one_call``) |

``keep_idx`` lists, per sample and in increasing order, the positions of the [buffer; tokens] sequence
that the encoder sees (the whole buffer, then the known tokens at N + position), so the graph has no
data-dependent shapes: the host computes it from the mask (``keep_indices``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import V2FlowConfig
from .errors import ShapeError
from .sampling import SamplerSettings, mask_lengths, tokens_per_iteration

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                  # numpy dtype name: float32, int64
    shape: tuple[Dim, ...]      # ints are fixed, strings are symbolic dims of the stage

    def resolve(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else int(dims[d]) for d in self.shape)


@dataclass(frozen=True)
class StageSpec:
    """One exported sub-network: I/O names, dtypes, symbolic shapes and their min/opt/max ranges."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, tuple[int, int, int]]           # symbolic dim → (min, opt, max)
    attrs: dict[str, Any] = field(default_factory=dict)   # baked-in settings (solver, steps, ...)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """ONNX-style {tensor name: {axis: dim name}} for inputs and outputs."""
        out: dict[str, dict[int, str]] = {}
        for t in self.inputs + self.outputs:
            axes = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if axes:
                out[t.name] = axes
        return out

    def shape_dict(self, **dims: int) -> dict[str, tuple[int, ...]]:
        """Exact shapes of every input and output for concrete dims (defaults: the opt value)."""
        full = {k: dims.get(k, v[1]) for k, v in self.dims.items()}
        return {t.name: t.resolve(full) for t in self.inputs + self.outputs}

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """{input name: (min shape, opt shape, max shape)} for a TensorRT optimisation profile."""
        pick = [{k: v[i] for k, v in self.dims.items()} for i in range(3)]
        return {t.name: (t.resolve(pick[0]), t.resolve(pick[1]), t.resolve(pick[2])) for t in self.inputs}

    def sample_inputs(self, rng: np.random.Generator, **dims: int) -> dict[str, np.ndarray]:
        """Fresh random valid inputs (ids in range, keep_idx sorted and valid) at the given dims."""
        full = {k: dims.get(k, v[1]) for k, v in self.dims.items()}
        feeds: dict[str, np.ndarray] = {}
        for t in self.inputs:
            shape = t.resolve(full)
            if t.name == "ids":
                feeds[t.name] = rng.integers(0, self.attrs["codebook_size"], size=shape, dtype=np.int64)
            elif t.name == "keep_idx":
                n, seq = self.attrs["buffer_size"], self.attrs["num_tokens"]
                known = shape[1] - n
                rows = [np.concatenate([np.arange(n), n + np.sort(rng.permutation(seq)[:known])]) for _ in
                        range(shape[0])]
                feeds[t.name] = np.stack(rows).astype(np.int64)
            elif t.name == "t":
                feeds[t.name] = (rng.random(shape) * 1000.0).astype(np.float32)
            elif t.name == "orders":
                feeds[t.name] = np.stack([rng.permutation(shape[1]) for _ in range(shape[0])]).astype(np.int64)
            elif t.name == "cfg_scale":
                feeds[t.name] = np.array([1.0 + 3.0 * rng.random()], dtype=np.float32)
            elif t.name == "images":
                feeds[t.name] = rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
            else:
                feeds[t.name] = rng.standard_normal(shape).astype(np.float32)
        return feeds

    def check_inputs(self, feeds: dict[str, np.ndarray]) -> dict[str, int]:
        """Raise ShapeError naming the input if a feed is missing or mis-shaped; return the bound dims."""
        bound: dict[str, int] = {}
        for t in self.inputs:
            if t.name not in feeds:
                raise ShapeError(f"stage {self.name!r}: missing input {t.name!r} (needs {self.input_names})")
            a = feeds[t.name]
            if a.dtype != np.dtype(t.dtype):
                raise ShapeError(f"stage {self.name!r}: input {t.name!r} must be {t.dtype}, got {a.dtype}")
            if a.ndim != len(t.shape):
                raise ShapeError(f"stage {self.name!r}: input {t.name!r} must have shape {list(t.shape)}, "
                                 f"got {list(a.shape)}")
            for axis, (want, got) in enumerate(zip(t.shape, a.shape)):
                if isinstance(want, int):
                    if want != got:
                        raise ShapeError(f"stage {self.name!r}: input {t.name!r} axis {axis} must be {want}, "
                                         f"got {got} (shape {list(a.shape)})")
                elif bound.setdefault(want, got) != got:
                    raise ShapeError(f"stage {self.name!r}: dim {want!r} is {bound[want]} elsewhere but "
                                     f"{got} in input {t.name!r}")
        return bound


def keep_indices(mask: np.ndarray, buffer_size: int) -> np.ndarray:
    """mask [B, L] bool (True = unknown) → keep_idx [B, N + K] int64 for ``mar_step``."""
    known = (~mask).sum(axis=1)
    if (known != known[0]).any():
        raise ShapeError(f"every sample must have the same number of known tokens, got {known.tolist()}")
    pos = np.argsort(mask, axis=1, kind="stable")[:, : int(known[0])]
    pos.sort(axis=1)
    head = np.broadcast_to(np.arange(buffer_size), (mask.shape[0], buffer_size))
    return np.concatenate([head, pos + buffer_size], axis=1).astype(np.int64)


STAGE_NAMES = ("codec_encode", "tokenizer", "token_embed", "mar_step", "velocity", "ode", "ode_cfg",
               "codec_decode", "tokenize", "detokenize")
ONE_CALL_STAGES = ("tokenize", "detokenize")
# What a one-call detokenize graph bakes in: a request must ask for exactly these to be served by it.
BAKED_SAMPLER_FIELDS = ("num_iter", "steps", "solver", "shift", "cfg_mode", "cfg_schedule", "temperature", "guided")


def baked_sampler(settings: SamplerSettings) -> dict[str, Any]:
    """The settings a detokenize graph bakes in, as recorded in its spec's attrs (guidance: on or off; the
    scale itself is an input of a guided graph)."""
    return {"num_iter": settings.num_iter, "steps": settings.steps, "solver": settings.solver,
            "shift": float(settings.shift), "cfg_mode": settings.cfg_mode, "cfg_schedule": settings.cfg_schedule,
            "temperature": float(settings.temperature), "guided": settings.guided}


def stage_specs(cfg: V2FlowConfig, max_batch: int = 16, opt_batch: int = 1, steps: int | None = None,
                solver: str | None = None, shift: float | None = None, num_iter: int | None = None,
                cfg_scale: float | None = None, cfg_mode: str | None = None, cfg_schedule: str | None = None,
                temperature: float | None = None) -> dict[str, StageSpec]:
    """Every stage spec for a config. Token-row dims (M) range up to ``max_batch`` images' worth.

    The sampler settings (default: the config's) are baked into ``ode``/``ode_cfg`` (solver, steps,
    shift) and into the one-call ``detokenize`` (all of ``BAKED_SAMPLER_FIELDS``; a guided one takes
    ``cfg_scale`` as an input).
    """
    n, c, g = cfg.num_tokens, cfg.token_dim, cfg.grid_size
    d, dz, hw = cfg.encoder_dim, cfg.decoder_dim, cfg.img_size
    batch = (1, opt_batch, max_batch)
    rows = (1, max(1, opt_batch * n // cfg.num_iter), max_batch * n)
    common = {"codebook_size": cfg.codebook_size, "buffer_size": cfg.buffer_size, "num_tokens": n}
    sampler = SamplerSettings.from_config(cfg, steps=steps, solver=solver, shift=shift, num_iter=num_iter,
                                          cfg_scale=cfg_scale, cfg_mode=cfg_mode, cfg_schedule=cfg_schedule,
                                          temperature=temperature)
    ode_attrs = {"solver": sampler.solver, "steps": sampler.steps, "shift": sampler.shift}
    baked = {**baked_sampler(sampler), "tokens_per_iteration": tokens_per_iteration(n, sampler.num_iter),
             "mask_lengths": mask_lengths(n, sampler.num_iter)}
    detok_in: list[tuple[str, str, tuple[Dim, ...]]] = [("ids", "int64", ("batch", n)),
                                                        ("orders", "int64", ("batch", n)),
                                                        ("noise", "float32", ("batch", n, c))]
    if sampler.guided:
        detok_in.append(("cfg_scale", "float32", (1,)))
    f32, i64 = "float32", "int64"

    def spec(name: str, ins: list[tuple[str, str, tuple[Dim, ...]]], outs: list[tuple[str, str, tuple[Dim, ...]]],
             dims: dict[str, tuple[int, int, int]], **attrs: Any) -> StageSpec:
        return StageSpec(name, tuple(TensorSpec(*t) for t in ins), tuple(TensorSpec(*t) for t in outs), dims,
                         {**common, **attrs})

    return {
        "codec_encode": spec("codec_encode", [("images", f32, ("batch", 3, hw, hw))],
                             [("latent", f32, ("batch", c, g, g))], {"batch": batch}),
        "tokenizer": spec("tokenizer", [("latent", f32, ("batch", c, g, g))], [("ids", i64, ("batch", n))],
                          {"batch": batch}),
        "token_embed": spec("token_embed", [("ids", i64, ("batch", n))], [("buffer", f32, ("batch", n, d))],
                            {"batch": batch}),
        "mar_step": spec("mar_step",
                         [("tokens", f32, ("batch", n, c)), ("buffer", f32, ("batch", n, d)),
                          ("keep_idx", i64, ("batch", "keep"))],
                         [("z", f32, ("batch", n, dz))],
                         {"batch": (1, opt_batch, 2 * max_batch), "keep": (n, n + n // 2, 2 * n - 1)}),
        "velocity": spec("velocity", [("x", f32, ("rows", c)), ("t", f32, ("rows",)), ("c", f32, ("rows", dz))],
                         [("v", f32, ("rows", c))], {"rows": (rows[0], rows[1], 2 * rows[2])}),
        "ode": spec("ode", [("noise", f32, ("rows", c)), ("z", f32, ("rows", dz))], [("x0", f32, ("rows", c))],
                    {"rows": rows}, **ode_attrs),
        "ode_cfg": spec("ode_cfg",
                        [("noise", f32, ("rows", c)), ("z", f32, ("rows", dz)), ("z_uncond", f32, ("rows", dz)),
                         ("cfg_scale", f32, (1,))],
                        [("x0", f32, ("rows", c))], {"rows": rows}, **ode_attrs),
        "codec_decode": spec("codec_decode", [("latent", f32, ("batch", c, g, g))],
                             [("images", f32, ("batch", 3, hw, hw))], {"batch": batch}),
        "tokenize": spec("tokenize", [("images", f32, ("batch", 3, hw, hw))], [("ids", i64, ("batch", n))],
                         {"batch": batch}),
        "detokenize": spec("detokenize", detok_in, [("images", f32, ("batch", 3, hw, hw))], {"batch": batch},
                           **baked),
    }
