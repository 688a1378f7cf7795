"""End to end on trained weights with guidance: the bundled default model exported to ONNX, held-out photos
tokenized and decoded at cfg scale 3 by ONNX Runtime (token embedding, masked transformer and the guided fused
ODE graph in the sampling loop, then the decode graph), against the PyTorch backend and against the spec's
float64 sampler (``reference_loop.official_sample_tokens``).

A guided one-call ``detokenize`` graph of this model is not exported here (~100 s on two cores):
test_one_call checks that graph against this loop on a small model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from reference_loop import official_sample_tokens

from v2flow_rt.data import HELDOUT_PHOTOS, eval_crops, from_model_range
from v2flow_rt.metrics import psnr
from v2flow_rt.pipeline import V2FlowPipeline
from v2flow_rt.reference.checkpoint import from_pretrained
from v2flow_rt.reference.codecs import build_codec

CFG = 3.0


def test_ort_guided_decode_of_the_default_model_matches_torch_and_the_float64_sampler(default_export: Path) -> None:
    """``default_export`` (conftest) is the bundled model's fp32 export of every stage, shared with the
    dataset and serving tests; its one-call graph is unguided, so guided decoding runs the stage loop."""
    torch_pipe = V2FlowPipeline.from_pretrained("default", backend="torch")
    ort_pipe = V2FlowPipeline.from_pretrained(default_export, backend="ort")
    crops = eval_crops(list(HELDOUT_PHOTOS), 64, per_image=2)                  # 4 held-out crops
    ids = torch_pipe.tokenize(crops)
    np.testing.assert_array_equal(ort_pipe.tokenize(crops), ids)
    ort = ort_pipe.detokenize(ids, seed=4, cfg=CFG)
    eager = torch_pipe.detokenize(ids, seed=4, cfg=CFG)
    model = from_pretrained("default")
    cfg = model.config
    with torch.no_grad():
        tokens = official_sample_tokens(model, model.embed_ids(torch.from_numpy(ids)), steps=cfg.ode_steps,
                                        num_iter=cfg.num_iter, cfg_scale=CFG, temperature=cfg.temperature, seed=4)
        ref = from_model_range(build_codec(cfg).decode(model.tokens_to_latent(torch.from_numpy(tokens).float())))
    # Measured: one level at most, 87 dB, on either backend. The guided ODE of this model is ill-conditioned in
    # fp32 (fp32 vs fp64 ~4e-4 relative on photo inputs, test_export), so the bound allows 2 levels and 60 dB.
    for name, got in (("ort", ort), ("torch", eager)):
        diff = np.abs(got.astype(int) - ref.astype(int))
        assert diff.max() <= 2 and psnr(ref, got) > 60, (name, diff.max(), psnr(ref, got))
    # Guidance changes the image (the comparison above is not of an unguided decode), and sharpens it toward
    # the condition: the guided decode is farther from the unguided one than rounding.
    plain = torch_pipe.detokenize(ids, seed=4)
    assert np.abs(plain.astype(int) - eager.astype(int)).mean() > 1.0
