"""The benchmark's FLOP yardstick (``bench.detokenize_flops``) against torch's own count of the matmuls the
one-call decode module runs (``torch.utils.flop_counter``), for each guidance mode."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from v2flow_rt.bench import detokenize_flops
from v2flow_rt.config import get_preset
from v2flow_rt.reference.codecs import build_codec
from v2flow_rt.reference.model import V2Flow
from v2flow_rt.reference.one_call import Detokenize
from v2flow_rt.sampling import SamplerSettings, seeded_randomness


@pytest.mark.parametrize("overrides", [{}, {"cfg_scale": 3.0}, {"cfg_scale": 2.0, "cfg_mode": "mar"},
                                       {"num_iter": 8, "ode_steps": 4, "solver": "heun"}],
                         ids=["unguided", "official-cfg", "mar-cfg", "heun-8-iterations"])
def test_decode_flops_match_torchs_count(overrides: dict[str, Any]) -> None:
    cfg = get_preset("tiny", **overrides)
    settings = SamplerSettings.from_config(cfg)
    module = Detokenize(V2Flow(cfg).eval(), build_codec(cfg), settings)
    orders, noise = seeded_randomness(0, 2, cfg.num_tokens, cfg.token_dim, settings.num_iter)
    args = [torch.randint(0, cfg.codebook_size, (2, cfg.num_tokens)), torch.from_numpy(orders),
            torch.from_numpy(noise)] + ([torch.tensor([3.0])] if settings.guided else [])
    # The math attention kernel is plain matmuls, which the counter sees (it skips CPU flash attention).
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        module(*args)
    # The formula counts every matmul (the rest is elementwise): equal, to 0.1 % for float rounding.
    assert detokenize_flops(cfg, 2, settings) == pytest.approx(counter.get_total_flops(), rel=1e-3)
