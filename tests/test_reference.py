"""The PyTorch reference model: shapes, the official masking semantics, codebook, training step."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import official_small_config
from reference_loop import official_sample_tokens, velocity_float64

from v2flow_rt.config import get_preset
from v2flow_rt.errors import ConfigError, ExportError, ShapeError
from v2flow_rt.reference.model import V2Flow, keep_indices
from v2flow_rt.reference.resampler import rotate_to
from v2flow_rt.sampling import SamplerSettings, seeded_randomness


def _shapes(model: V2Flow, bsz: int) -> None:
    """Shapes of every stage, and values of the ids → condition and velocity paths against float64 references
    (the model must have non-zero output layers: ``randomize_zero_layers``)."""
    cfg = model.config
    g = cfg.grid_size
    latent = torch.randn(bsz, cfg.latent_channels, g, g)
    ids = model.tokenize(latent)
    assert ids.shape == (bsz, cfg.num_tokens) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < cfg.codebook_size
    buffer = model.embed_ids(ids)
    assert buffer.shape == (bsz, cfg.num_tokens, cfg.encoder_dim)
    # Spec §10: the buffer condition is projector(codebook[ids]) exactly.
    w, b = (p.detach().double() for p in model.projector[0].parameters())
    want = model.quantizer.codebook.double()[ids] @ w.t() + b
    torch.testing.assert_close(buffer.double(), want, rtol=1e-5, atol=1e-6)
    mask = torch.ones(bsz, cfg.num_tokens, dtype=torch.bool)
    mask[:, : cfg.num_tokens // 4] = False
    tokens = model.latent_to_tokens(latent)
    assert tokens.shape == (bsz, cfg.num_tokens, cfg.token_dim)
    z = model.mar_step(tokens, mask, buffer)
    assert z.shape == (bsz, cfg.num_tokens, cfg.decoder_dim)
    x, t, c = tokens.reshape(-1, cfg.token_dim), torch.rand(bsz * cfg.num_tokens) * 1000, z.reshape(-1, cfg.decoder_dim)
    with torch.no_grad():
        v = model.velocity(x, t, c)
    assert v.shape == (bsz * cfg.num_tokens, cfg.token_dim)
    ref = velocity_float64(model, x.numpy(), t.numpy(), c.detach().numpy())
    assert ref.std() > 1e-2                                         # not the zero output of a fresh model
    # float32 against float64 through a few layers (time embedding arguments up to 1000 rad): 1e-4 of the scale.
    assert np.abs(v.numpy() - ref).max() <= 1e-4 * np.abs(ref).max()
    assert torch.equal(model.tokens_to_latent(tokens), latent)


def test_module_shapes_tiny(live_tiny_model: V2Flow) -> None:
    _shapes(live_tiny_model, 3)


def test_module_shapes_official_geometry() -> None:
    from v2flow_rt.reference.checkpoint import randomize_zero_layers

    torch.manual_seed(0)
    model = randomize_zero_layers(V2Flow(official_small_config()).eval(), seed=1)
    _shapes(model, 2)
    # Spec §2.2: SE widths 8 in s1.b1 (round(32/4)) and hidden/4 elsewhere; the 3×3 conv is depthwise.
    ds = model.downsampler
    assert ds.s1.b1.se.fc1.out_channels == 8 and ds.s2.b1.se.fc1.out_channels == 128
    assert ds.s1.b1.conv2.conv.groups == 512 and ds.s1.b1.downsample is not None and ds.s2.b1.downsample is None


def official_mae(model: V2Flow, tokens: torch.Tensor, mask: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """The official encoder/decoder, written from the spec: boolean gather with nonzero, index-put scatter."""
    cfg = model.config
    bsz = tokens.shape[0]
    x = model.z_proj(tokens)
    x = torch.cat([torch.zeros(bsz, cfg.buffer_size, x.shape[-1]), x], dim=1)
    mask_wb = torch.cat([torch.zeros(bsz, cfg.buffer_size), mask.float()], dim=1)
    x[:, : cfg.buffer_size] = buffer
    x = model.z_proj_ln(x + model.encoder_pos_embed_learned)
    x = x[(1 - mask_wb).nonzero(as_tuple=True)].reshape(bsz, -1, x.shape[-1])
    for blk in model.encoder_blocks:
        x = blk(x)
    x = model.decoder_embed(model.encoder_norm(x))
    pad = model.mask_token.repeat(bsz, mask_wb.shape[1], 1)
    pad[(1 - mask_wb).nonzero(as_tuple=True)] = x.reshape(-1, x.shape[-1])
    x = pad + model.decoder_pos_embed_learned
    for blk in model.decoder_blocks:
        x = blk(x)
    return model.decoder_norm(x)[:, cfg.buffer_size:] + model.diffusion_pos_embed_learned


@pytest.mark.parametrize("known", [0, 1, 17, 63])
def test_index_gather_equals_official_nonzero_masking(tiny_model: V2Flow, known: int) -> None:
    torch.manual_seed(known)
    cfg = tiny_model.config
    bsz = 3
    mask = torch.ones(bsz, cfg.num_tokens, dtype=torch.bool)
    for b in range(bsz):
        mask[b, torch.randperm(cfg.num_tokens)[:known]] = False
    tokens = torch.randn(bsz, cfg.num_tokens, cfg.token_dim)
    buffer = torch.randn(bsz, cfg.num_tokens, cfg.encoder_dim)
    with torch.no_grad():
        ours = tiny_model.mar_step(tokens, mask, buffer)
        ref = official_mae(tiny_model, tokens, mask, buffer)
    # Same arithmetic on the same rows; only float reduction order may differ.
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("known, predicted", [(0, 5), (19, 21), (40, 24), (63, 1)])
def test_decoder_at_the_predicted_positions_equals_the_full_decoder_there(known: int, predicted: int) -> None:
    """The one-call graph's masked transformer computes its last block only at the M positions an iteration
    predicts: equal to the official full decoder gathered at them (random weights, random positions)."""
    torch.manual_seed(known)
    model = V2Flow(get_preset("tiny")).eval()
    cfg = model.config
    bsz = 3
    mask = torch.ones(bsz, cfg.num_tokens, dtype=torch.bool)
    positions = torch.empty(bsz, predicted, dtype=torch.int64)
    for b in range(bsz):
        order = torch.randperm(cfg.num_tokens)
        mask[b, order[:known]] = False
        positions[b] = order[known:known + predicted]               # unknown ones, in random order
    tokens = torch.randn(bsz, cfg.num_tokens, cfg.token_dim)
    buffer = torch.randn(bsz, cfg.num_tokens, cfg.encoder_dim)
    keep = keep_indices(mask, cfg.buffer_size)
    with torch.no_grad():
        ours = model.forward_mae_decoder(model.forward_mae_encoder(tokens, buffer, keep), keep, positions)
        ref = official_mae(model, tokens, mask, buffer)
    assert ours.shape == (bsz, predicted, cfg.decoder_dim)
    want = torch.gather(ref, 1, positions[..., None].expand(-1, -1, cfg.decoder_dim))
    # Same arithmetic on the kept rows; only float reduction order may differ.
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", [1, 4, None], ids=["per-evaluation", "groups-of-4", "all-at-once"])
@pytest.mark.parametrize("solver", ["euler", "dpm++2m", "heun"])
def test_fused_ode_velocity_with_hoisted_modulations_equals_float64(live_tiny_model: V2Flow, solver: str,
                                                                    group: int | None) -> None:
    """The fused ODE graphs compute the adaLN modulations of several σ in one matmul (every modulation
    Linear stacked, ``1 +`` folded into the scale biases): against the official velocity net in float64 at
    each σ the solver evaluates, asked for in the solver's order, with groups of 1, 4 (6 σ: one short
    group) and all 6."""
    from v2flow_rt.reference.stage_modules import Ode
    from v2flow_rt.sampling.solvers import evaluated_sigmas, sigma_grid

    cfg = live_tiny_model.config
    ode = Ode(live_tiny_model, solver, 6, 3.0, max_rows=7).eval()
    sigmas = evaluated_sigmas(solver, sigma_grid(6, 3.0))
    assert ode.group == len(sigmas) == 6                        # 7 rows: far within the memory budget
    ode.group = group or ode.group
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, cfg.token_dim, generator=gen)
    z = torch.randn(7, cfg.decoder_dim, generator=gen)
    with torch.no_grad():
        mods = ode._modulations(ode.net.cond_embed(z))
        got = {sigma: ode.net.from_modulation(x, mods(sigma)).numpy() for sigma in sigmas}
    for sigma in sigmas:
        t = np.full(7, np.float32(sigma * 1000.0))
        ref = velocity_float64(live_tiny_model, x.numpy(), t, z.numpy())
        assert ref.std() > 1e-2                                     # not a fresh model's zero output
        # float32 against float64 through a few layers (time embedding arguments up to 1000 rad), as above.
        assert np.abs(got[sigma] - ref).max() <= 1e-4 * np.abs(ref).max()


def test_hoisted_modulation_groups_follow_the_memory_budget(live_tiny_model: V2Flow) -> None:
    """A group of evaluations' modulations is one [rows, G, (3·depth + 2)·W] tensor: G shrinks as the rows a
    graph is built for grow (guided graphs run twice the rows), down to one evaluation at a time."""
    from v2flow_rt.reference import stage_modules as M

    cfg = live_tiny_model.config
    per_row = (3 * cfg.flow_depth + 2) * cfg.flow_width * 4                  # bytes of one row's modulations
    rows = M.HOISTED_MODULATION_BYTES // (3 * per_row)                      # three evaluations' worth
    assert M.Ode(live_tiny_model, "dpm++2m", 10, 3.0, max_rows=rows).group == 3
    assert M.OdeCfg(live_tiny_model, "dpm++2m", 10, 3.0, max_rows=rows).group == 1
    assert M.Ode(live_tiny_model, "dpm++2m", 10, 3.0, max_rows=100 * rows).group == 1
    assert M.Ode(live_tiny_model, "heun", 10, 3.0, max_rows=1).group == 10   # heun: 19 evaluations, 10 σ


def test_fused_ode_refuses_a_sigma_its_solver_dry_run_did_not_see(live_tiny_model: V2Flow) -> None:
    from v2flow_rt.reference.stage_modules import Ode

    ode = Ode(live_tiny_model, "euler", 6, 3.0, max_rows=4).eval()
    mods = ode._modulations(torch.zeros(4, live_tiny_model.config.flow_width))
    with pytest.raises(ExportError, match="σ=0.5, which its dry run"):
        mods(0.5)


def test_from_modulation_takes_one_chunk_per_modulation(live_tiny_model: V2Flow) -> None:
    """``from_modulation`` takes the (3·depth + 2) chunks; the stacked block itself (the layout before) or a
    chunk short is refused, not sliced into the wrong modulations."""
    net = live_tiny_model.flowloss.net
    cfg = live_tiny_model.config
    k = 3 * cfg.flow_depth + 2
    x = torch.randn(3, cfg.token_dim)
    stacked = torch.randn(3, k * cfg.flow_width)
    assert net.from_modulation(x, list(stacked.chunk(k, -1))).shape == (3, cfg.token_dim)
    for wrong in (stacked, list(stacked.chunk(k, -1))[:-1]):
        with pytest.raises(ShapeError, match=f"takes {k} modulation chunks"):
            net.from_modulation(x, wrong)


def test_keep_indices_requires_equal_known_counts() -> None:
    mask = torch.tensor([[True, False], [True, True]])
    with pytest.raises(ShapeError, match="same number of known tokens"):
        keep_indices(mask, 2)


def test_codebook_round_trip_ids_codes_ids(tiny_model: V2Flow) -> None:
    k = tiny_model.config.codebook_size
    ids = torch.randint(0, k, (4, 64))
    codes = torch.nn.functional.embedding(ids, tiny_model.quantizer.codebook)
    assert torch.equal(tiny_model.quantizer.lookup(codes), ids)
    norms = tiny_model.quantizer.codebook.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-5)
    with pytest.raises(ShapeError, match="token ids must be in"):
        tiny_model.embed_ids(torch.full((1, 64), k))


def test_tokenize_deterministic_by_default_and_gumbel_seeded(tiny_model: V2Flow) -> None:
    latent = torch.randn(2, 192, 8, 8)
    a, b = tiny_model.tokenize(latent), tiny_model.tokenize(latent)
    assert torch.equal(a, b)
    g1, g2 = tiny_model.tokenize(latent, gumbel_seed=1), tiny_model.tokenize(latent, gumbel_seed=1)
    assert torch.equal(g1, g2)
    # Independent check of the deterministic path: softmax mix → nearest code by cosine (float64).
    logits = tiny_model.downsampler(latent).double()
    mixed = logits.softmax(-1) @ tiny_model.llm_embed_tokens.double()
    sims = torch.nn.functional.normalize(mixed, dim=-1) @ tiny_model.quantizer.codebook.double().t()
    assert (sims.argmax(-1) == a).float().mean() > 0.99
    with pytest.raises(ShapeError, match="latent must be"):
        tiny_model.tokenize(torch.randn(1, 192, 4, 4))



def test_resampler_offset_makes_brightness_visible() -> None:
    # Without the constant channel the resampler cannot tell a latent from the same latent scaled by
    # any positive factor (bias-free 1×1 conv → LayerNorm first): every gray level tokenizes alike.
    # LayerNorm's eps (1e-5) is the only thing breaking the invariance, hence the 1e-3 tolerance.
    torch.manual_seed(0)
    latent = torch.randn(2, 192, 8, 8)
    plain = V2Flow(get_preset("tiny", resampler_offset=0.0)).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.downsampler(2.5 * latent), plain.downsampler(latent), rtol=1e-3, atol=1e-3)
        gray = torch.ones(1, 192, 8, 8)
        assert torch.equal(plain.tokenize(0.2 * gray), plain.tokenize(0.9 * gray))
    torch.manual_seed(0)
    shifted = V2Flow(get_preset("tiny")).eval()
    assert shifted.config.resampler_offset == 3.0
    assert shifted.downsampler.s1.b1.conv1.conv.weight.shape[1] == 193
    with torch.no_grad():
        diff = (shifted.downsampler(2.5 * latent) - shifted.downsampler(latent)).abs().max()
    assert diff > 0.05
    # The constant channel is exactly a concatenated plane: an offset-free resampler fed [latent, 3]
    # with the same weights gives the same logits.
    with torch.no_grad():
        shifted.downsampler.offset = 0.0
        manual = shifted.downsampler(torch.cat([latent, torch.full_like(latent[:, :1], 3.0)], 1))
        shifted.downsampler.offset = 3.0
        torch.testing.assert_close(shifted.downsampler(latent), manual, rtol=0, atol=0)

def test_rotation_trick_value_and_gradient() -> None:
    torch.manual_seed(0)
    src = torch.randn(5, 8, requires_grad=True)
    tgt = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    out = rotate_to(src, tgt)
    torch.testing.assert_close(out, tgt, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert src.grad is not None and src.grad.abs().sum() > 0
    # Not a straight-through copy: the gradient is rotated (and rescaled), so it differs from ones.
    assert not torch.allclose(src.grad, torch.ones_like(src.grad))


def test_ema_codebook_moves_toward_data_and_stays_unit_norm() -> None:
    torch.manual_seed(0)
    model = V2Flow(get_preset("tiny", codebook_size=64, dead_code_threshold=0.0)).train()
    x = torch.nn.functional.normalize(torch.randn(1, 256, 128), dim=-1)
    before = model.quantizer.codebook.clone()
    _, ids, loss = model.quantizer(x)
    after = model.quantizer.codebook
    used = ids.unique()
    assert float(loss) > 0
    torch.testing.assert_close(after.norm(dim=-1), torch.ones(64), rtol=0, atol=1e-5)
    # Each used code gets closer to the mean direction of the inputs assigned to it.
    for k in used[:8]:
        mean = x[0][ids[0] == k].mean(0)
        assert torch.dot(after[k], mean) > torch.dot(before[k], mean)


def test_training_step_reduces_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = V2Flow(get_preset("tiny")).train()
    latent = torch.randn(4, 192, 8, 8) * 0.5
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loss_now() -> float:
        return float(model(latent, torch.Generator().manual_seed(7))["loss"].detach())

    first = loss_now()
    for _ in range(15):
        loss = model(latent, torch.Generator().manual_seed(7))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_now() < 0.8 * first


def test_training_phases_touch_only_their_half() -> None:
    torch.manual_seed(0)
    model = V2Flow(get_preset("tiny", codebook_size=256)).train()
    aux = torch.nn.Linear(128, 192)
    latent = torch.randn(2, 192, 8, 8) * 0.5
    resampler = list(model.downsampler.parameters())
    decoder = list(model.flowloss.parameters()) + list(model.encoder_blocks.parameters())

    def grads(phase: str) -> tuple[bool, bool, bool]:
        model.zero_grad(set_to_none=True)
        codes = model.quantizer.codebook.clone()
        out = model(latent, torch.Generator().manual_seed(3), aux, phase=phase)
        out["loss"].backward()
        moved = not torch.equal(codes, model.quantizer.codebook)
        return (any(p.grad is not None and p.grad.abs().sum() > 0 for p in resampler),
                any(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder), moved)

    assert grads("tokenizer") == (True, False, True)
    assert grads("decoder") == (False, True, False)
    assert grads("joint") == (True, True, True)
    with pytest.raises(ConfigError, match="phase"):
        model(latent, phase="both")
    with pytest.raises(ConfigError, match="aux_head"):
        model(latent, phase="tokenizer")


def test_two_phase_training_saves_the_frozen_tokenizer(tmp_path) -> None:
    from v2flow_rt.reference.checkpoint import from_pretrained
    from v2flow_rt.reference.train import TrainSettings, lr_at, train

    cfg = get_preset("tiny", codebook_size=256, encoder_depth=1, decoder_depth=1, flow_depth=1)
    s = TrainSettings(steps=26, tokenizer_steps=2, batch_size=2, warmup=1, aux_recon=True, save_every=100)
    final = from_pretrained(train(cfg, tmp_path, s, photos=["coffee"], progress=False))
    state = torch.load(tmp_path / "train_state.pt", map_location="cpu", weights_only=True)
    # The saved EMA model holds exactly the live tokenizer, which stopped changing at step 2.
    for key, value in final.downsampler.state_dict().items():
        assert torch.equal(value, state["model"][f"downsampler.{key}"]), key
    assert torch.equal(final.quantizer.codebook, state["model"]["quantizer._codebook.embed"][0])
    # The aux head trains the tokenizer only: in the decoder phase (logged at step 25) it is not run.
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 25]
    assert log[0]["aux"] > 0 and log[0]["flow"] == 0 and log[1]["aux"] == 0 and log[1]["flow"] > 0
    # Each phase warms up from its own start.
    assert lr_at(0, s) == lr_at(2, s) == s.lr / s.warmup
    with pytest.raises(ConfigError, match="aux_recon"):
        train(cfg, tmp_path / "x", TrainSettings(steps=5, tokenizer_steps=2), progress=False)


def test_context_aux_head_sees_neighbours_and_trains(tmp_path) -> None:
    from v2flow_rt.reference.train import ContextHead, TrainSettings, build_aux_head, train

    cfg = get_preset("tiny", codebook_size=256, encoder_depth=1, decoder_depth=1, flow_depth=1)
    head = build_aux_head(cfg, TrainSettings(aux_recon=True, aux_context=1))
    assert isinstance(head, ContextHead)
    assert isinstance(build_aux_head(cfg, TrainSettings(aux_recon=True)), torch.nn.Linear)
    assert build_aux_head(cfg, TrainSettings()) is None
    codes = torch.randn(2, 64, 128)
    out = head(codes)
    assert out.shape == (2, 64, 192)
    # Change the code of grid cell (3, 3) only: with one residual block (three 3x3 convs, reach 3 cells)
    # cells within 3 rows/columns change, farther ones do not, and nothing leaks across the batch.
    moved = codes.clone()
    moved[0, 3 * 8 + 3] += 1.0
    diff = (head(moved) - out).abs().amax(-1).reshape(2, 8, 8)
    assert diff[0, 3, 6] > 0 and diff[0, 6, 3] > 0 and diff[0, 0, 0] > 0
    assert diff[0, 7, 7] == 0 and diff[0, 3, 7] == 0 and diff[1].max() == 0
    s = TrainSettings(steps=3, tokenizer_steps=1, batch_size=2, warmup=1, aux_recon=True, aux_context=1,
                      save_every=100)
    train(cfg, tmp_path, s, photos=["coffee"], progress=False)
    state = torch.load(tmp_path / "train_state.pt", map_location="cpu", weights_only=True)
    assert set(state["aux_head"]) == set(head.state_dict())
    with pytest.raises(ConfigError, match="aux_recon"):
        train(cfg, tmp_path / "x", TrainSettings(steps=3, aux_context=1), progress=False)
    with pytest.raises(ConfigError, match="aux_context"):
        train(cfg, tmp_path / "y", TrainSettings(steps=3, aux_recon=True, aux_context=-1), progress=False)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0], ids=["unguided", "official-cfg"])
def test_sample_tokens_equals_the_official_sampler_in_float64(live_tiny_model: V2Flow, cfg_scale: float) -> None:
    """The numpy loop over the torch stages against ``reference_loop.official_sample_tokens`` (the spec's
    sampler, own schedule, noise order and solver form, float64), same seed."""
    model = live_tiny_model
    torch.manual_seed(5)
    buffer = model.embed_ids(torch.randint(0, 4096, (2, 64)))
    s = SamplerSettings(num_iter=4, steps=4, cfg_scale=cfg_scale, temperature=0.7)
    a = model.sample_tokens(buffer, s, seed=1)
    assert a.shape == (2, 64, 192) and torch.equal(a, model.sample_tokens(buffer, s, seed=1))
    ref = official_sample_tokens(model, buffer, steps=4, cfg_scale=cfg_scale, temperature=0.7, seed=1)
    # The velocity moves the tokens well away from their starting noise (not a degenerate zero net) ...
    _, noise = seeded_randomness(1, 2, 64, 192, 4)
    assert np.abs(ref - 0.7 * noise).max() > 0.1
    # ... and float32 agrees with float64 to 1e-4 of the largest value (4 ODE steps, 4 transformer passes).
    assert np.abs(a.numpy() - ref).max() <= 1e-4 * np.abs(ref).max()
