"""Shared LLM fixtures: a random tiny V2Flow, the bundled base LM expanded with its codebook, its export.

Test modules import the fixtures they use by name (``from llm_fixtures import expanded_lm``); a session
fixture imported into two modules runs once per module, so only ``test_llm.py`` imports the export.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BASE_LM = REPO / "v2flow_rt" / "assets" / "base_lm"
CODEBOOK = 256          # a small codebook keeps the expanded vocabulary (1024 + 258) and the tests fast
HEAD_SCALE = 8.0        # see expanded_lm


@pytest.fixture(scope="session")
def llm_v2flow(tmp_path_factory):
    """(model, folder): a random ``tiny`` V2Flow (64 tokens, no all-zero layer) over the base LM's embedding table."""
    import torch

    from v2flow_rt.config import get_preset
    from v2flow_rt.llm.base_lm import load_embedding_table
    from v2flow_rt.reference.checkpoint import randomize_zero_layers, save_pretrained
    from v2flow_rt.reference.model import V2Flow

    torch.manual_seed(0)
    table = torch.from_numpy(load_embedding_table(BASE_LM))
    # zero-initialised layers randomised: a fresh velocity net outputs 0 and decoding would return the noise
    model = randomize_zero_layers(V2Flow(get_preset("tiny", codebook_size=CODEBOOK), llm_embed=table).eval(), seed=1)
    return model, save_pretrained(model, tmp_path_factory.mktemp("v2flow"))


@pytest.fixture(scope="session")
def expanded_lm(llm_v2flow, tmp_path_factory) -> Path:
    """The base LM expanded with the V2Flow codebook, LM head scaled ×8.

    A random-init LM has near-flat logits (std ≈ 0.2), so argmax gaps can fall below the ~1e-6 that
    separates torch and ORT kernels and greedy ties would flip between backends (toolchain notes). Scaling
    the head widens every gap 8× without changing which token wins in either backend.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from v2flow_rt.llm.vocab import expand_vocabulary

    model, folder = llm_v2flow
    out = expand_vocabulary(BASE_LM, folder, tmp_path_factory.mktemp("lm") / "expanded")
    lm = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        lm.get_output_embeddings().weight.mul_(HEAD_SCALE)
    lm.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def llm_onnx(expanded_lm, tmp_path_factory) -> Path:
    """fp32 / fp16 / int8 export of ``expanded_lm`` (one dynamo export, ~15-25 s on one core)."""
    from v2flow_rt.llm.export import export_llm

    return export_llm(expanded_lm, tmp_path_factory.mktemp("onnx") / "llm").parent
