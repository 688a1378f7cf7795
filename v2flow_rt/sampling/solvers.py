"""Rectified-flow ODE solvers over a shifted σ grid.

Convention (V2Flow ``linear_flow``): ``x_σ = (1 − σ)·x0 + σ·ε``, the net predicts ``v = ε − x0`` and
takes ``σ·1000`` as its time input; sampling integrates ``dx/dσ = v`` from σ ≈ 1 down to 0.

The solvers use only ``+``, ``−`` and ``×`` by Python floats on the state, so the very same code runs
on numpy arrays (the host loop) and on torch tensors (the fused ODE graph that is exported to ONNX).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import ConfigError

T = Any  # np.ndarray or torch.Tensor: anything with arithmetic operators by Python floats


def shift_sigma(s: np.ndarray | float, shift: float) -> np.ndarray | float:
    """SD3/Sana time shift: σ' = shift·s / (1 + (shift − 1)·s)."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def sigma_grid(steps: int, shift: float = 3.0) -> np.ndarray:
    """The official 20-step grid generalised to ``steps``: float64 [steps + 1], decreasing to exactly 0.

    ``s = 1 − linspace(1, 0.001, steps + 1)``, ``σ = shift·s/(1 + (shift − 1)·s)``, flipped; at 20 steps
    and shift 3 it starts at σ = 0.999667 (spec §10).
    """
    if steps < 1:
        raise ConfigError(f"ODE steps must be >= 1, got {steps}")
    s = 1.0 - np.linspace(1.0, 0.001, steps + 1)
    return np.asarray(shift_sigma(s, shift), dtype=np.float64)[::-1].copy()


def euler(f: Callable[[T, float], T], x: T, sigmas: np.ndarray) -> T:
    """First-order Euler on dx/dσ = v."""
    for i in range(len(sigmas) - 1):
        x = x + float(sigmas[i + 1] - sigmas[i]) * f(x, float(sigmas[i]))
    return x


def heun(f: Callable[[T, float], T], x: T, sigmas: np.ndarray) -> T:
    """Heun's second-order method; the final step to σ = 0 is an Euler step (no evaluation at σ = 0)."""
    for i in range(len(sigmas) - 1):
        s0, s1 = float(sigmas[i]), float(sigmas[i + 1])
        d0 = f(x, s0)
        x_euler = x + (s1 - s0) * d0
        if s1 == 0.0:
            x = x_euler
        else:
            x = x + (0.5 * (s1 - s0)) * (d0 + f(x_euler, s1))
    return x


def dpm_solver_pp_2m(f: Callable[[T, float], T], x: T, sigmas: np.ndarray) -> T:
    """DPM-Solver++ multistep, order 2, data prediction, first and last steps first order.

    With α = 1 − σ and λ = log(α/σ): x0̂ = x − σ·v and
    ``x_next = (σ_next/σ)·x − α_next·(e^{−h} − 1)·D`` where D is x0̂ (first order) or
    ``x0̂ + (x0̂ − x0̂_prev)/(2r)``, r = h_prev/h (second order). The step to σ = 0 returns x0̂ itself.
    """
    x0_prev: T | None = None
    h_prev: float = 0.0
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = x - s * f(x, s)
        if s_next == 0.0:
            return x0
        lam = math.log((1.0 - s) / s)
        lam_next = math.log((1.0 - s_next) / s_next)
        h = lam_next - lam
        phi = -(1.0 - s_next) * math.expm1(-h)          # −α_next·(e^{−h} − 1)
        if x0_prev is None or i == n - 1:
            d = x0
        else:
            r = h_prev / h
            d = x0 + (0.5 / r) * (x0 - x0_prev)
        x = (s_next / s) * x + phi * d
        x0_prev, h_prev = x0, h
    return x


SOLVER_FUNCS = {"euler": euler, "heun": heun, "dpm++2m": dpm_solver_pp_2m}


def solver_func(solver: str) -> Callable[..., Any]:
    """The solver function named ``solver`` (ConfigError naming the choices otherwise)."""
    if solver not in SOLVER_FUNCS:
        raise ConfigError(f"unknown solver {solver!r}; choose one of {sorted(SOLVER_FUNCS)}")
    return SOLVER_FUNCS[solver]


def evaluated_sigmas(solver: str, sigmas: np.ndarray) -> tuple[float, ...]:
    """The distinct σ at which ``solver`` evaluates the velocity on the grid ``sigmas``, in order of first
    use (a dry run on a scalar state: the solvers branch on σ, never on the state)."""
    seen: dict[float, None] = {}

    def record(x: float, sigma: float) -> float:
        seen.setdefault(sigma, None)
        return 0.0

    solver_func(solver)(record, 0.0, sigmas)
    return tuple(seen)


def evaluations(solver: str, steps: int) -> int:
    """Velocity-net evaluations one ODE solve costs (per token, before guidance doubling)."""
    if solver == "heun":
        return 2 * steps - 1
    return steps


def integrate(solver: str, f: Callable[[T, float], T], x: T, steps: int, shift: float) -> T:
    """Integrate dx/dσ = f(x, σ) from σ_max to 0 with a named solver; ``f`` receives σ (not σ·1000)."""
    return solver_func(solver)(f, x, sigma_grid(steps, shift))
