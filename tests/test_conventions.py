"""The spec's conventions (shared/spec/official-v2flow.md §2, §10), each pinned by a test that fails when it changes:
RegStage LayerNorm eps 1e-5, exact (erf) GELU, VQ l2-normalisation eps 1e-6, the tail of the order predicted
first, noise rows in (batch, position) order, and the official presets' sampler defaults (guidance 4.5 in the
official mode, 20 DPM-Solver++ steps, shift 3). Expected values are written out from the spec, not read from
the package."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import official_small_config
from reference_loop import official_randomness

from v2flow_rt.config import PRESETS, get_preset
from v2flow_rt.reference.model import V2Flow
from v2flow_rt.reference.resampler import LayerNorm2d, VectorQuantize, l2norm
from v2flow_rt.sampling import SamplerSettings, sample_tokens, seeded_randomness


def _erf_gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


@pytest.fixture(scope="module")
def official_model() -> V2Flow:
    torch.manual_seed(0)
    return V2Flow(official_small_config().replace(readout_depth=2)).eval()


def test_regstage_layernorm_eps_is_1e_5(official_model: V2Flow) -> None:
    norms = [m for m in official_model.downsampler.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(isinstance(m, LayerNorm2d) and m.eps == 1e-5 for m in norms)
    # Functionally: channels of variance 1e-6, where eps 1e-5 and 1e-6 give outputs ~3x apart.
    norm = LayerNorm2d(16, act=False)
    x = torch.randn(2, 16, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float32) * 1e-3
    xd = x.double().numpy()
    mu, var = xd.mean(1, keepdims=True), xd.var(1, keepdims=True)
    want = (xd - mu) / np.sqrt(var + 1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(norm(x).double().numpy(), want, rtol=1e-4, atol=1e-6)
    # The MAR transformer's LayerNorms are timm's 1e-6 (spec §2.3): a change to 1e-5 there is a change too.
    assert official_model.encoder_blocks[0].norm1.eps == 1e-6 and official_model.encoder_norm.eps == 1e-6


def test_gelu_is_exact_erf_in_the_readout_and_the_transformer(official_model: V2Flow) -> None:
    x = torch.linspace(-4, 4, 801, dtype=torch.float32)
    want = _erf_gelu(x.double().numpy())
    # tanh-approximate GELU is up to ~5e-4 away on this range; exact erf agrees to float32 rounding.
    readout = official_model.downsampler.readout
    assert isinstance(readout[1], torch.nn.GELU)
    with torch.no_grad():
        np.testing.assert_allclose(readout[1](x).double().numpy(), want, rtol=0, atol=2e-6)
    # The transformer MLP with fc1 = [I; 0] and fc2 = [I 0] computes GELU itself.
    mlp = official_model.encoder_blocks[0].mlp
    dim = mlp.fc1.in_features
    xs = x[: (len(x) // dim) * dim].reshape(-1, dim) if len(x) >= dim else torch.linspace(-4, 4, dim)[None]
    with torch.no_grad():
        mlp.fc1.weight.zero_()
        mlp.fc1.bias.zero_()
        mlp.fc1.weight[:dim].copy_(torch.eye(dim))
        mlp.fc2.weight.zero_()
        mlp.fc2.bias.zero_()
        mlp.fc2.weight[:, :dim].copy_(torch.eye(dim))
        np.testing.assert_allclose(mlp.eval()(xs).double().numpy(), _erf_gelu(xs.double().numpy()), rtol=0,
                                   atol=2e-6)


def test_vq_l2_normalisation_eps_is_1e_6() -> None:
    tiny = torch.tensor([[3e-7, 4e-7]], dtype=torch.float32)          # norm 5e-7 < eps: divided by 1e-6
    torch.testing.assert_close(l2norm(tiny), tiny / 1e-6, rtol=1e-6, atol=0)
    unit = torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(l2norm(unit), unit / 5.0)
    # The training quantizer commits l2norm(x) (not the unit vector) to the code: a tiny input's loss shows eps.
    torch.manual_seed(0)
    vq = VectorQuantize(dim=8, size=16, decay=0.8, commitment_weight=1.0).train()
    x = torch.randn(1, 4, 8)
    x = x / x.norm(dim=-1, keepdim=True) * 2e-7                         # every row: norm 2e-7
    codes = vq.codebook.clone().double()
    _, ids, loss = vq(x)
    xd = x.double()[0] / 1e-6                                           # norm 0.2
    np.testing.assert_array_equal(ids[0].numpy(), (xd @ codes.t()).argmax(-1).numpy())
    want = ((xd - codes[ids[0]]) ** 2).mean()
    assert abs(float(loss) - float(want)) <= 1e-5 * float(want)


def test_the_tail_of_the_order_is_predicted_first() -> None:
    """Spec §10 at L = 64, 4 iterations: mask_len 59, 45, 24, then all that remain; iteration k predicts
    order[mask_len_k : mask_len_{k−1}] (5, 14, 21, 24 tokens). Checked through the reference model."""
    torch.manual_seed(0)
    model = V2Flow(get_preset("tiny", encoder_depth=1, decoder_depth=1, flow_depth=1)).eval()
    rng = np.random.default_rng(4)
    orders = np.stack([rng.permutation(64) for _ in range(2)]).astype(np.int64)
    seen: list[np.ndarray] = []
    model.sample_tokens(model.embed_ids(torch.zeros(2, 64, dtype=torch.long)), SamplerSettings(num_iter=4, steps=1),
                        orders=orders, on_iteration=lambda k, pred: seen.append(pred.copy()))
    bounds = [64, 59, 45, 24, 0]
    assert len(seen) == 4
    for k, pred in enumerate(seen):
        want = np.zeros((2, 64), bool)
        np.put_along_axis(want, orders[:, bounds[k + 1]:bounds[k]], True, axis=1)
        np.testing.assert_array_equal(pred, want, err_msg=f"iteration {k}")


def test_noise_rows_are_drawn_in_batch_then_position_order() -> None:
    for seed, batch, seq, dim, num_iter in [(3, 3, 64, 5, 4), (11, 2, 16, 2, 3)]:
        orders, noise = seeded_randomness(seed, batch, seq, dim, num_iter)
        want_orders, want_noise = official_randomness(seed, batch, seq, dim, num_iter)
        np.testing.assert_array_equal(orders, want_orders)
        np.testing.assert_array_equal(noise, want_noise)
    # By hand at L = 4, one iteration: the first rows after the orders go to sample 0 positions 0..3.
    rng = np.random.default_rng(5)
    perms = [rng.permutation(4) for _ in range(2)]
    rows = rng.standard_normal((8, 1))
    orders, noise = seeded_randomness(5, 2, 4, 1, 1)
    np.testing.assert_array_equal(orders, np.stack(perms))
    np.testing.assert_array_equal(noise.reshape(8, 1), rows.astype(np.float32))


class _ConstantVelocity:
    """v = c[:, 0] for every token (a point mass at x − σ·v): the sampled token is noise − σ0·v_guided."""

    def __init__(self, dz: int = 4) -> None:
        self.fake_latent = np.full(dz, -0.5, np.float32)
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []

    def mar_step(self, tokens: np.ndarray, mask: np.ndarray, buffer: np.ndarray) -> np.ndarray:
        return np.repeat(buffer[..., :1], 4, axis=-1)                     # z = the buffer's first value

    def velocity(self, x: np.ndarray, t: np.ndarray, c: np.ndarray) -> np.ndarray:
        self.calls.append((t.copy(), c.copy()))
        return np.repeat(c[:, :1], x.shape[1], axis=1)


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if n != "tiny"))
def test_official_presets_sample_with_guidance_4_5_and_20_dpm_steps_at_shift_3(name: str) -> None:
    settings = SamplerSettings.from_config(get_preset(name))
    assert (settings.cfg_scale, settings.cfg_mode, settings.cfg_schedule) == (4.5, "official", "constant")
    assert (settings.steps, settings.solver, settings.shift, settings.num_iter) == (20, "dpm++2m", 3.0, 4)
    if name != "base-256":
        return
    # What those defaults do, on analytic stages: 20 evaluations per iteration at σ·1000 on the spec's grid,
    # each one batch of [cond; uncond = fake_latent] rows, mixed 4.5× towards the condition.
    stages = _ConstantVelocity()
    buffer = np.random.default_rng(0).uniform(0.5, 1.5, (2, 64, 4)).astype(np.float32)
    out = sample_tokens(stages, buffer, settings, seed=2, token_dim=3)
    assert len(stages.calls) == 4 * 20
    s = 1.0 - np.linspace(1.0, 0.001, 21)
    sigmas = (3.0 * s / (1.0 + 2.0 * s))[::-1]
    for i, (t, c) in enumerate(stages.calls):
        m = c.shape[0] // 2
        np.testing.assert_allclose(t, sigmas[i % 20] * 1000.0, rtol=1e-6)
        np.testing.assert_array_equal(c[m:], np.broadcast_to(stages.fake_latent, (m, 4)))
    v = -0.5 + 4.5 * (buffer[..., :1] + 0.5)                                 # n_u + 4.5·(n_c − n_u), per token
    _, noise = official_randomness(2, 2, 64, 3, 4)
    np.testing.assert_allclose(out, noise - (2.997 / 2.998) * v, rtol=0, atol=5e-5)     # σ0 = 0.999667
