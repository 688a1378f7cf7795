"""The one sampling loop (numpy only): mask schedule, random orders, ODE solvers, guidance."""

from .loop import SamplerSettings, Stages, guided_velocity, host_ode, sample_tokens
from .schedule import mask_from_order, mask_lengths, random_orders, tokens_per_iteration
from .solvers import evaluations, integrate, sigma_grid

__all__ = [
    "SamplerSettings", "Stages", "evaluations", "guided_velocity", "host_ode", "integrate", "mask_from_order",
    "mask_lengths", "random_orders", "sample_tokens", "sigma_grid", "tokens_per_iteration",
]
