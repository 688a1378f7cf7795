"""The one masked-autoregressive rectified-flow sampling loop (numpy + stage callables).

Every backend runs this loop; only the stage executors differ. A backend provides:

- ``mar_step(tokens [B,L,C], mask [B,L] bool, buffer [B,N,D]) -> z [B,L,Dz]``: the masked transformer
  (True in ``mask`` = token unknown; ``buffer`` is the visual-token condition or ``fake_latent``
  repeated for the unconditional branch);
- ``velocity(x [M,C], t [M], c [M,Dz]) -> v [M,C]`` with ``t = σ·1000``;
- optionally ``ode(noise [M,C], z [M,Dz], z_uncond [M,Dz] | None, cfg_scale) -> x0 [M,C]``, a fused solve
  of all ODE steps (one call per AR iteration instead of one per step);
- ``fake_latent``: the learned unconditional vector [D].

All randomness (orders, noise) comes from one seeded ``numpy.random.Generator``, so the same seed gives
the same result on every backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from ..errors import ConfigError, ShapeError
from .schedule import mask_from_order, mask_lengths, random_orders
from .solvers import integrate, solver_func


class Stages(Protocol):
    fake_latent: np.ndarray

    def mar_step(self, tokens: np.ndarray, mask: np.ndarray, buffer: np.ndarray) -> np.ndarray: ...

    def velocity(self, x: np.ndarray, t: np.ndarray, c: np.ndarray) -> np.ndarray: ...


OdeFn = Callable[[np.ndarray, np.ndarray, "np.ndarray | None", float], np.ndarray]

# Bounds a request is checked against before any work: past them a run takes hours or the numbers are noise.
MAX_STEPS = 1000          # ODE steps per iteration
MAX_NUM_ITER = 4096       # masked-AR iterations (at most one per token anyway)
MAX_TEMPERATURE = 10.0    # scale of the initial noise (1 is the trained one)
MAX_CFG = 100.0           # guidance scale (official models use 4.5)


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    """``value`` as an int in [lo, hi], or ConfigError naming ``name``, the bound and what was given."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{name} must be {bound}, got {value}")
    return int(value)


def check_float(name: str, value: Any, lo: float, hi: float) -> float:
    """``value`` as a finite float in [lo, hi], or ConfigError naming ``name``, the range and what was given."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not (np.isfinite(value) and lo <= value <= hi):
        raise ConfigError(f"{name} must be a finite number in [{lo:g}, {hi:g}], got {value}")
    return float(value)


def check_seed(seed: Any) -> int | None:
    """A seed is None (fresh randomness) or an integer in [0, 2**63)."""
    return None if seed is None else check_int("seed", seed, 0, 2 ** 63 - 1)


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample. ``cfg_mode='official'`` is V2Flow's linear_flow path: guidance at every ODE
    evaluation with ``fake_latent`` fed straight to the velocity net as the unconditional ``c``;
    ``'mar'`` runs the masked transformer a second time on the ``fake_latent`` buffer (MAR-style)."""

    num_iter: int = 4
    steps: int = 20
    solver: str = "dpm++2m"
    shift: float = 3.0
    cfg_scale: float = 1.0
    cfg_mode: str = "official"
    cfg_schedule: str = "constant"
    temperature: float = 1.0

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> "SamplerSettings":
        base = cls(num_iter=cfg.num_iter, steps=cfg.ode_steps, solver=cfg.solver, shift=cfg.time_shift,
                   cfg_scale=cfg.cfg_scale, cfg_mode=cfg.cfg_mode, cfg_schedule=cfg.cfg_schedule,
                   temperature=cfg.temperature)
        return replace(base, **{k: v for k, v in overrides.items() if v is not None}).check()

    def check(self) -> "SamplerSettings":
        solver_func(self.solver)                          # ConfigError naming the choices
        if self.cfg_mode not in ("official", "mar"):
            raise ConfigError(f"cfg_mode must be 'official' or 'mar', got {self.cfg_mode!r}")
        if self.cfg_schedule not in ("constant", "linear"):
            raise ConfigError(f"cfg_schedule must be 'constant' or 'linear', got {self.cfg_schedule!r}")
        check_int("steps", self.steps, 1, MAX_STEPS)
        check_int("num_iter", self.num_iter, 1, MAX_NUM_ITER)
        check_float("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        check_float("cfg_scale", self.cfg_scale, 0.0, MAX_CFG)
        check_float("shift", self.shift, 1e-6, 1e6)
        return self

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0


def guided_velocity(velocity: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
                    z: np.ndarray, z_uncond: np.ndarray | None, scale: float,
                    ) -> Callable[[np.ndarray, float], np.ndarray]:
    """f(x, σ) for the solvers: one batched call of [cond; uncond] rows when guided, no wasted halves."""
    m = z.shape[0]
    zz = z if z_uncond is None else np.concatenate([z, z_uncond], axis=0)

    def f(x: np.ndarray, sigma: float) -> np.ndarray:
        xx = x if z_uncond is None else np.concatenate([x, x], axis=0)
        t = np.full((xx.shape[0],), sigma * 1000.0, dtype=np.float32)
        v = velocity(xx.astype(np.float32, copy=False), t, zz)
        if z_uncond is None:
            return v
        return v[m:] + scale * (v[:m] - v[m:])

    return f


def host_ode(velocity: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
             settings: SamplerSettings) -> OdeFn:
    """An ``ode`` callable that runs the solver on the host, calling ``velocity`` once per evaluation."""
    def ode(noise: np.ndarray, z: np.ndarray, z_uncond: np.ndarray | None, scale: float) -> np.ndarray:
        f = guided_velocity(velocity, z, z_uncond, scale)
        return integrate(settings.solver, f, noise, settings.steps, settings.shift)
    return ode


def seeded_randomness(seed: int | None, batch: int, seq_len: int, token_dim: int,
                      num_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """The orders and initial noise a seed stands for: (orders [B, L] int64, noise [B, L, C] float32).

    One ``numpy.random.Generator`` draws the B orders first, then, iteration by iteration, one standard
    normal row per predicted token in (batch, position) order (spec §10), as the official loop does.
    ``sample_tokens(..., seed=s)`` is ``sample_tokens(..., orders=o, noise=n)`` with these values, so a
    host that cannot run numpy's generator can pass the same randomness explicitly.
    """
    rng = np.random.default_rng(check_seed(seed))
    orders = random_orders(rng, batch, seq_len)
    noise = np.zeros((batch, seq_len, token_dim), dtype=np.float32)
    mask = np.ones((batch, seq_len), dtype=bool)
    for next_len in mask_lengths(seq_len, num_iter):
        mask_next = mask_from_order(orders, next_len)
        pred = mask & ~mask_next                                                # [B, L]
        noise[pred] = rng.standard_normal((int(pred.sum()), token_dim)).astype(np.float32)
        mask = mask_next
    return orders, noise


def check_orders(orders: Any, batch: int, seq_len: int) -> np.ndarray:
    """Raise ShapeError unless ``orders`` is int64 [batch, seq_len] with a permutation of 0..L-1 per row."""
    if not isinstance(orders, np.ndarray) or orders.dtype != np.int64:
        got = orders.dtype if isinstance(orders, np.ndarray) else type(orders).__name__
        raise ShapeError(f"orders must be a numpy int64 array [B, L] = [{batch}, {seq_len}], got {got}")
    if orders.shape != (batch, seq_len):
        raise ShapeError(f"orders must have shape [B, L] = [{batch}, {seq_len}], got {list(orders.shape)}")
    want = np.arange(seq_len)
    bad = [b for b in range(batch) if not np.array_equal(np.sort(orders[b]), want)]
    if bad:
        raise ShapeError(f"orders row {bad[0]} is not a permutation of 0..{seq_len - 1} (each position exactly "
                         f"once); {len(bad)} of {batch} rows are not")
    return orders


def check_noise(noise: Any, batch: int, seq_len: int, token_dim: int) -> np.ndarray:
    """Raise ShapeError unless ``noise`` is finite float32 [batch, seq_len, token_dim]."""
    want = [batch, seq_len, token_dim]
    if not isinstance(noise, np.ndarray) or noise.dtype != np.float32:
        got = noise.dtype if isinstance(noise, np.ndarray) else type(noise).__name__
        raise ShapeError(f"noise must be a numpy float32 array [B, L, C] = {want}, got {got}")
    if list(noise.shape) != want:
        raise ShapeError(f"noise must have shape [B, L, C] = {want}, got {list(noise.shape)}")
    if not np.isfinite(noise).all():
        raise ShapeError(f"noise holds {int((~np.isfinite(noise)).sum())} non-finite value(s)")
    return noise


def sample_tokens(stages: Stages, buffer: np.ndarray, settings: SamplerSettings, seed: int | None = 0,
                  token_dim: int | None = None, ode: OdeFn | None = None,
                  on_iteration: Callable[[int, np.ndarray], None] | None = None,
                  orders: np.ndarray | None = None, noise: np.ndarray | None = None) -> np.ndarray:
    """Generate every token of a batch by masked-AR iterations of per-token ODE solves.

    Args:
        stages: the backend's stage callables (see module docstring).
        buffer: the visual-token condition [B, N, D] (projector output), float32.
        settings: sampling settings.
        seed: seed of the orders and noise (None draws a fresh one); ignored for whichever of ``orders``
            and ``noise`` is given.
        token_dim: C, the per-token latent size (must be given).
        ode: a fused solver; defaults to the host solver over ``stages.velocity``.
        on_iteration: called as ``on_iteration(k, pred_mask [B,L])`` before each iteration's ODE solve.
        orders: int64 [B, L], one permutation of the positions per row; the tail of each order is
            predicted first (``mask_from_order``).
        noise: float32 [B, L, C], the standard-normal initial noise of every token at its position
            (scaled by ``settings.temperature`` before the solve).

    Returns:
        tokens [B, L, C] float32: the sampled latent tokens (still multiplied by the latent scale).

    Raises:
        ShapeError: a bad buffer, missing token_dim, or orders / noise of the wrong type, shape or values.
    """
    settings = settings.check()
    if buffer.ndim != 3:
        raise ShapeError(f"buffer must be [B, N, D], got shape {buffer.shape}")
    if token_dim is None:
        raise ShapeError("token_dim (values per token) must be given")
    bsz, seq_len = buffer.shape[0], buffer.shape[1]
    if orders is not None:
        check_orders(orders, bsz, seq_len)
    if noise is not None:
        check_noise(noise, bsz, seq_len, token_dim)
    if orders is None or noise is None:
        seeded_orders, seeded_noise = seeded_randomness(seed, bsz, seq_len, token_dim, settings.num_iter)
        orders = seeded_orders if orders is None else orders
        noise = seeded_noise if noise is None else noise
    ode = ode or host_ode(stages.velocity, settings)
    buffer = np.ascontiguousarray(buffer, dtype=np.float32)
    fake = np.asarray(stages.fake_latent, dtype=np.float32).reshape(-1)
    fake_buffer = np.broadcast_to(fake, buffer.shape).astype(np.float32) if settings.guided else None

    mask = np.ones((bsz, seq_len), dtype=bool)
    tokens = np.zeros((bsz, seq_len, token_dim), dtype=np.float32)
    for k, next_len in enumerate(mask_lengths(seq_len, settings.num_iter)):
        z = stages.mar_step(tokens, mask, buffer)                               # [B, L, Dz]
        mask_next = mask_from_order(orders, next_len)
        pred = mask & ~mask_next                                                # [B, L]
        if on_iteration is not None:
            on_iteration(k, pred)
        z_pred = z[pred]                                                        # [M, Dz], (b, pos) order
        scale = iteration_cfg_scale(settings, seq_len, next_len)
        z_uncond = None
        if scale != 1.0:
            if fake_buffer is not None and settings.cfg_mode == "mar":
                z_uncond = stages.mar_step(tokens, mask, fake_buffer)[pred]
            else:
                if fake.shape[0] != z_pred.shape[1]:
                    raise ConfigError(
                        f"official CFG feeds fake_latent (dim {fake.shape[0]}) to the velocity net, whose "
                        f"condition dim is {z_pred.shape[1]}; use cfg_mode='mar'")
                z_uncond = np.broadcast_to(fake, z_pred.shape).astype(np.float32)
        x0 = ode(noise[pred] * np.float32(settings.temperature), z_pred, z_uncond, scale)
        tokens[pred] = np.asarray(x0, dtype=np.float32)
        mask = mask_next
    return tokens


def cfg_weight(schedule: str, seq_len: int, next_len: int) -> float:
    """w in ``scale = 1 + (cfg_scale − 1)·w`` for an iteration that leaves ``next_len`` tokens masked: 1 for a
    constant schedule, the fraction of known tokens after it for MAR's linear one."""
    return (seq_len - next_len) / seq_len if schedule == "linear" else 1.0


def iteration_cfg_scale(settings: SamplerSettings, seq_len: int, next_len: int) -> float:
    """The guidance scale of an iteration that leaves ``next_len`` tokens masked (MAR's linear schedule
    raises it from 1 as tokens become known; constant otherwise)."""
    return 1.0 + (settings.cfg_scale - 1.0) * cfg_weight(settings.cfg_schedule, seq_len, next_len)
