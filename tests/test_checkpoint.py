"""Checkpoint I/O: save/from_pretrained, official checkpoint-last.pth import/export, bad files."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch
from conftest import official_small_config
from official import official_key_shapes, random_official_state

from v2flow_rt.errors import CheckpointError
from v2flow_rt.reference.checkpoint import (
    export_official,
    from_pretrained,
    import_official,
    load_state_into,
    save_pretrained,
)
from v2flow_rt.reference.model import V2Flow


@pytest.fixture(scope="module")
def official_file(tmp_path_factory) -> tuple[Path, dict, dict]:
    cfg = official_small_config()
    raw, ema = random_official_state(cfg, 0), random_official_state(cfg, 1)
    args = argparse.Namespace(model="v2flow_base", img_size=256, vae_stride=32, buffer_size=64, flowloss_w=1536,
                              flowloss_d=cfg.flow_depth, visual_vocabulary=True, num_iter=4)
    path = tmp_path_factory.mktemp("official") / "checkpoint-last.pth"
    torch.save({"model": raw, "model_ema": ema, "optimizer": {"state": {}, "param_groups": [{"lr": 3e-4}]},
                "epoch": 12, "scaler": {"scale": 65536.0, "growth_factor": 2.0}, "args": args}, path)
    return path, raw, ema


def outputs(model: V2Flow, seed: int = 0) -> list[torch.Tensor]:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(2, cfg.latent_channels, cfg.grid_size, cfg.grid_size, generator=g)
    with torch.no_grad():
        ids = model.tokenize(latent)
        buffer = model.embed_ids(ids)
        mask = torch.ones(2, cfg.num_tokens, dtype=torch.bool)
        mask[:, :5] = False
        z = model.mar_step(model.latent_to_tokens(latent), mask, buffer)
        v = model.velocity(torch.randn(7, cfg.token_dim, generator=g), torch.rand(7, generator=g) * 1e3, z[0, :7])
    return [ids, buffer, z, v]


def test_our_layout_is_the_official_one() -> None:
    cfg = official_small_config()
    ours = {k: tuple(v.shape) for k, v in V2Flow(cfg).state_dict().items()}
    spec = official_key_shapes(cfg)
    del spec["class_emb.weight"]          # the unused 67 M-parameter embedding is not built
    assert ours == spec


def test_official_import_raw_and_ema_and_round_trip(official_file, tmp_path) -> None:
    path, raw, ema = official_file
    model = import_official(path)
    assert model.config.encoder_heads == 12 and model.config.num_tokens == 64
    for key, value in model.state_dict().items():
        assert torch.equal(value, raw[key]), key
    model_ema = import_official(path, use_ema=True)
    assert torch.equal(model_ema.fake_latent, ema["fake_latent"])
    # Export back to the official layout, import again: identical outputs.
    again = import_official(export_official(model, tmp_path / "rt" / "checkpoint-last.pth"))
    for a, b in zip(outputs(model), outputs(again)):
        assert torch.equal(a, b)
    # save_pretrained / from_pretrained round trip: identical outputs.
    loaded = from_pretrained(save_pretrained(model, tmp_path / "pretrained"))
    for a, b in zip(outputs(model), outputs(loaded)):
        assert torch.equal(a, b)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": {}, "args": Evil()}, path)
    with pytest.raises(CheckpointError, match="not loaded: it is a pickle that would run code"):
        import_official(path)
    assert not marker.exists()


def test_truncated_and_wrong_files_are_clear_errors(official_file, tmp_path) -> None:
    path = official_file[0]
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.pth"):
        import_official(cut)
    with pytest.raises(CheckpointError, match="does not exist"):
        import_official(tmp_path / "nope.pth")
    other = tmp_path / "other.pth"
    torch.save({"weights": 1}, other)
    with pytest.raises(CheckpointError, match="expected a dict with 'model'"):
        import_official(other)


def test_missing_mismatched_and_unexpected_keys_are_named(official_file, tmp_path) -> None:
    _, raw, _ = official_file
    cfg = official_small_config()
    model = V2Flow(cfg)
    state = {k: v for k, v in raw.items() if k != "class_emb.weight"}
    broken = dict(state)
    del broken["encoder_blocks.0.attn.proj.bias"]
    with pytest.raises(CheckpointError, match=r"encoder_blocks\.0\.attn\.proj\.bias"):
        load_state_into(model, broken, "x")
    broken = dict(state, **{"flowloss.net.input_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match=r"flowloss\.net\.input_proj\.weight.*\[3, 3\]"):
        load_state_into(model, broken, "x")
    extra = dict(state, **{"something.else": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"something\.else"):
        load_state_into(model, extra, "x")
    load_state_into(model, extra, "x", allow_unexpected=True)


def test_from_pretrained_errors(tiny_model, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        from_pretrained(tmp_path / "missing")
    folder = save_pretrained(tiny_model, tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        from_pretrained(folder)
    folder = save_pretrained(tiny_model, tmp_path / "m2")
    (folder / "config.json").write_text('{"name": "tiny", "buffer_size": 3}')
    with pytest.raises(CheckpointError, match="buffer_size"):
        from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        from_pretrained(folder)


def test_export_official_refuses_a_resampler_offset(tiny_model, tmp_path) -> None:
    # The tiny preset's constant resampler channel has no counterpart in the official code.
    target = tmp_path / "checkpoint-last.pth"
    with pytest.raises(CheckpointError, match="resampler_offset"):
        export_official(tiny_model, target)
    assert not target.exists()
