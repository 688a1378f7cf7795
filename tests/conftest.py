"""Shared fixtures: small models built fresh for each test session."""

from __future__ import annotations

import os

import pytest

# Tests are sized for a 2-core machine; V2FLOW_TEST_THREADS=1 keeps them off a busy second core.
_THREADS = int(os.environ.get("V2FLOW_TEST_THREADS", "0"))


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    if _THREADS:
        try:
            import torch
        except ImportError:
            return
        torch.set_num_threads(_THREADS)


@pytest.fixture(scope="session")
def tiny_model():
    """A randomly initialised model of the `tiny` preset (eval mode)."""
    import torch

    from v2flow_rt.config import get_preset
    from v2flow_rt.reference.model import V2Flow

    torch.manual_seed(0)
    return V2Flow(get_preset("tiny")).eval()


def official_small_config(**overrides):
    """An official geometry (base-256: DC-AE latents 32×8×8, 64 tokens, D 768, 12 heads, velocity MLP
    width 1536) with reduced depth and smaller vocabulary/codebook tables so that tests stay fast;
    ``overrides`` change fields of it."""
    from v2flow_rt.config import get_preset

    fields = {"encoder_depth": 1, "decoder_depth": 1, "flow_depth": 2, "resampler_depth": 1, "readout_depth": 1,
              "llm_vocab_size": 2048, "llm_dim": 512, "codebook_size": 1024}
    return get_preset("base-256", **{**fields, **overrides})


@pytest.fixture(scope="session")
def default_export(tmp_path_factory):
    """The bundled default model exported at fp32 (every stage; parity and quality checks skipped: the
    export tests cover them). Shared by the dataset and serving tests."""
    from v2flow_rt.export import export_model

    folder = tmp_path_factory.mktemp("default_export") / "export"
    export_model("default", folder, precisions=("fp32",), progress=False, validate=False, quality=False)
    return folder


@pytest.fixture(scope="session")
def live_tiny_model():
    """A `tiny` model with every zero-initialised layer randomised (``randomize_zero_layers``): a fresh
    model's velocity output layer is zero, so its velocity is exactly 0 and decoding returns the noise;
    tests of decoding paths use this one so that a broken velocity net or ids → image path shows."""
    import torch

    from v2flow_rt.config import get_preset
    from v2flow_rt.reference.checkpoint import randomize_zero_layers
    from v2flow_rt.reference.model import V2Flow

    torch.manual_seed(0)
    return randomize_zero_layers(V2Flow(get_preset("tiny")).eval(), seed=1)
