"""Config presets, JSON round trip, and clear errors for wrong or inconsistent configs."""

from __future__ import annotations

import json

import pytest

from v2flow_rt.config import PRESETS, V2FlowConfig, get_preset
from v2flow_rt.errors import ConfigError


@pytest.mark.parametrize("size,dim,depth,heads", [("base", 768, 12, 12), ("large", 1024, 16, 16),
                                                   ("huge", 1280, 20, 16)])
@pytest.mark.parametrize("res,tokens", [(256, 64), (512, 256), (1024, 1024)])
def test_official_presets_follow_the_spec(size: str, dim: int, depth: int, heads: int, res: int,
                                          tokens: int) -> None:
    cfg = get_preset(f"{size}-{res}")
    assert (cfg.encoder_dim, cfg.encoder_depth, cfg.encoder_heads) == (dim, depth, heads)
    assert (cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads) == (dim, depth, heads)
    assert cfg.num_tokens == tokens == cfg.buffer_size
    assert (cfg.codec, cfg.codec_stride, cfg.latent_channels, cfg.latent_scale) == ("dcae", 32, 32, 0.41407)
    assert (cfg.codebook_size, cfg.llm_dim, cfg.llm_vocab_size) == (16384, 4096, 32000)
    assert (cfg.flow_width, cfg.flow_depth, cfg.num_iter) == (1536, 8, 4)
    assert (cfg.resampler_hidden, cfg.resampler_depth, cfg.readout_depth) == (512, 4, 2)


def test_json_round_trip_every_preset(tmp_path) -> None:
    for name, cfg in PRESETS.items():
        again = V2FlowConfig.from_json(cfg.to_json())
        assert again == cfg, name
        path = tmp_path / f"{name}.json"
        path.write_text(cfg.to_json())
        assert V2FlowConfig.from_file(path) == cfg


@pytest.mark.parametrize("change,needle", [
    ({"buffer_size": 63}, "buffer_size"),
    ({"codec": "vqgan"}, "codec"),
    ({"encoder_heads": 5}, "encoder_heads"),
    ({"latent_channels": 100}, "latent_channels"),
    ({"img_size": 60}, "codec_stride"),
    ({"solver": "rk4"}, "solver"),
    ({"flow_depth": 0}, "flow_depth"),
    ({"num_iter": 65}, "num_iter"),
])
def test_inconsistent_configs_are_clear_errors(change: dict, needle: str) -> None:
    data = get_preset("tiny").to_dict() | change
    with pytest.raises(ConfigError, match=needle):
        V2FlowConfig.from_dict(data)


def test_unknown_fields_and_bad_json_are_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="encoder_dimm"):
        V2FlowConfig.from_dict(get_preset("tiny").to_dict() | {"encoder_dimm": 3})
    with pytest.raises(ConfigError, match="JSON"):
        V2FlowConfig.from_json("{not json")
    with pytest.raises(ConfigError, match="does not exist"):
        V2FlowConfig.from_file(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("giant-2048")
    assert json.loads(get_preset("tiny").to_json())["name"] == "tiny"
