"""The one sampling loop (numpy only): mask schedule, random orders, ODE solvers, guidance."""

from .loop import (
    MAX_CFG,
    MAX_NUM_ITER,
    MAX_STEPS,
    MAX_TEMPERATURE,
    SamplerSettings,
    Stages,
    cfg_weight,
    check_float,
    check_int,
    check_noise,
    check_orders,
    check_seed,
    guided_velocity,
    host_ode,
    iteration_cfg_scale,
    sample_tokens,
    seeded_randomness,
)
from .schedule import mask_from_order, mask_lengths, random_orders, tokens_per_iteration
from .solvers import evaluations, integrate, sigma_grid

__all__ = [
    "MAX_CFG", "MAX_NUM_ITER", "MAX_STEPS", "MAX_TEMPERATURE", "check_float", "check_int", "check_seed",
    "SamplerSettings", "Stages", "cfg_weight", "check_noise", "check_orders", "evaluations", "guided_velocity",
    "host_ode", "integrate", "iteration_cfg_scale", "mask_from_order", "mask_lengths", "random_orders", "sample_tokens",
    "seeded_randomness", "sigma_grid", "tokens_per_iteration",
]
