"""Model configuration: one dataclass, a preset registry, JSON round trip and consistency checks.

The official geometries (``base``/``large``/``huge`` × 256/512/1024) follow
``shared/spec/official-v2flow.md``: DC-AE f32c32 latents, one visual token per latent position,
16384 cosine-VQ codes living in a 4096-d LLaMA-2 embedding space (vocabulary 32000), a velocity MLP of
width 1536 and depth 8. ``tiny`` is the geometry of the bundled default model: pixels patchified
8×8 (a 64×64 crop gives 8×8 = 64 tokens of 192 values), small enough to train on two CPU cores; its
resampler gets a constant input channel (``resampler_offset``), without which it cannot see brightness.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

CODECS = ("patch", "dcae")
SOLVERS = ("euler", "heun", "dpm++2m")
CFG_MODES = ("official", "mar")
CFG_SCHEDULES = ("constant", "linear")
DCAE_SCALE = 0.41407

# A model folder (``save_pretrained``): its file names, and the name of the bundled model. Here, not in
# ``reference/checkpoint.py``, so that the ONNX Runtime path can resolve a folder without torch.
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ASSETS = Path(__file__).resolve().parent / "assets"


def resolve_model_path(path: str | os.PathLike[str]) -> Path:
    """``"default"`` names the bundled model; anything else is a folder path."""
    if str(path) == "default":
        return ASSETS / "default"
    return Path(path)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
                                             "dict[str, Any]": (dict,)}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "dict[str, Any]": "a JSON object"}


@dataclass
class V2FlowConfig:
    """Everything that fixes a V2Flow model's shapes, plus its training and sampling defaults."""

    name: str = "custom"
    # --- image and latent codec ---
    img_size: int = 256                 # square image side in pixels
    codec: str = "dcae"                 # "patch" (pixels patchified) or "dcae" (diffusers AutoencoderDC)
    codec_stride: int = 32              # pixels per latent position along one side
    latent_channels: int = 32           # values per latent position (= token dim, MAR patch_size 1)
    latent_scale: float = DCAE_SCALE    # the model sees codec latents multiplied by this
    # --- visual vocabulary resampler ---
    llm_vocab_size: int = 32000
    llm_dim: int = 4096
    resampler_hidden: int = 512
    resampler_depth: int = 4            # bottleneck blocks per RegStage (s1 and s2)
    readout_depth: int = 2              # Linear(hidden→V) then (GELU, Linear(V→V)) × (depth − 1)
    # A constant input channel of this value for the resampler (0 = none, as official). Its first block
    # is a bias-free 1×1 conv then LayerNorm, so it sees only the direction of each latent vector: a
    # pixel patch and the same patch brighter (every gray level of one sign) tokenize alike. The extra
    # channel turns a patch's brightness into direction. DC-AE latents do without (official).
    resampler_offset: float = 0.0
    codebook_size: int = 16384
    codebook_decay: float = 0.8
    commitment_weight: float = 1.0
    dead_code_threshold: float = 0.0    # EMA cluster size under which a code is re-seeded (0 = official: never)
    # --- masked transformer (MAR) ---
    encoder_dim: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    decoder_dim: int = 768
    decoder_depth: int = 12
    decoder_heads: int = 12
    mlp_ratio: float = 4.0
    buffer_size: int = 64               # must equal the number of tokens
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    pos_init: str = "normal"            # "normal" (official N(0, 0.02)) or "sincos-shared" (see model)
    # --- velocity net (SimpleMLPAdaLN) ---
    flow_width: int = 1536
    flow_depth: int = 8
    # --- training ---
    label_drop_prob: float = 0.1
    mask_ratio_min: float = 0.7
    diffusion_batch_mul: int = 4
    time_shift: float = 3.0
    gumbel_train: bool = True
    # --- sampling defaults ---
    num_iter: int = 4
    ode_steps: int = 20
    solver: str = "dpm++2m"
    cfg_scale: float = 1.0
    cfg_mode: str = "official"
    cfg_schedule: str = "constant"
    temperature: float = 1.0            # scale of the initial ODE noise; 0 starts from its mean (deterministic
    #                                     up to the masked-AR order; the bundled default model uses 0)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (e.g. how it was trained)

    # ----------------------------------------------------------------- derived
    @property
    def grid_size(self) -> int:
        """Latent positions along one side."""
        return self.img_size // self.codec_stride

    @property
    def num_tokens(self) -> int:
        """Visual tokens per image (= MAR sequence length)."""
        return self.grid_size ** 2

    @property
    def token_dim(self) -> int:
        """Values per token that the velocity net generates."""
        return self.latent_channels

    # ----------------------------------------------------------------- checks
    def validate(self) -> "V2FlowConfig":
        """Raise ConfigError naming the first wrong or inconsistent field; return self."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"config {self.name!r}: {msg}")

        for f in dataclasses.fields(self):     # types first: a JSON file can hold anything in any field
            value, kinds = getattr(self, f.name), _FIELD_TYPES[str(f.type)]
            need(isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool)),
                 f"{f.name} must be {_TYPE_WORDS[str(f.type)]}, got {value!r} ({type(value).__name__})")
            need(not isinstance(value, float) or math.isfinite(value), f"{f.name} must be finite, got {value!r}")

        ints = ["img_size", "codec_stride", "latent_channels", "llm_vocab_size", "llm_dim",
                "resampler_hidden", "resampler_depth", "readout_depth", "codebook_size", "encoder_dim",
                "encoder_depth", "encoder_heads", "decoder_dim", "decoder_depth", "decoder_heads",
                "buffer_size", "flow_width", "flow_depth", "diffusion_batch_mul", "num_iter", "ode_steps"]
        for name in ints:
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name} must be a positive integer, got {value!r}")
        need(self.codec in CODECS, f"codec must be one of {CODECS}, got {self.codec!r}")
        need(self.img_size % self.codec_stride == 0,
             f"img_size {self.img_size} is not a multiple of codec_stride {self.codec_stride}")
        if self.codec == "patch":
            need(self.latent_channels == 3 * self.codec_stride ** 2,
                 f"patch codec with stride {self.codec_stride} gives {3 * self.codec_stride ** 2} channels, "
                 f"but latent_channels is {self.latent_channels}")
        need(self.buffer_size == self.num_tokens,
             f"buffer_size ({self.buffer_size}) must equal the number of tokens "
             f"(img_size/codec_stride)^2 = {self.num_tokens}")
        need(self.encoder_dim % self.encoder_heads == 0,
             f"encoder_dim {self.encoder_dim} is not divisible by encoder_heads {self.encoder_heads}")
        need(self.decoder_dim % self.decoder_heads == 0,
             f"decoder_dim {self.decoder_dim} is not divisible by decoder_heads {self.decoder_heads}")
        need(0.0 <= self.mask_ratio_min < 1.0, f"mask_ratio_min must be in [0, 1), got {self.mask_ratio_min}")
        need(0.0 <= self.label_drop_prob < 1.0, f"label_drop_prob must be in [0, 1), got {self.label_drop_prob}")
        need(0.0 < self.codebook_decay < 1.0, f"codebook_decay must be in (0, 1), got {self.codebook_decay}")
        need(self.latent_scale > 0 and math.isfinite(self.latent_scale),
             f"latent_scale must be a positive number, got {self.latent_scale}")
        need(self.time_shift > 0, f"time_shift must be positive, got {self.time_shift}")
        need(isinstance(self.resampler_offset, (int, float)) and math.isfinite(self.resampler_offset),
             f"resampler_offset must be a finite number, got {self.resampler_offset!r}")
        need(self.pos_init in ("normal", "sincos-shared"),
             f"pos_init must be 'normal' or 'sincos-shared', got {self.pos_init!r}")
        need(self.solver in SOLVERS, f"solver must be one of {SOLVERS}, got {self.solver!r}")
        need(self.cfg_mode in CFG_MODES, f"cfg_mode must be one of {CFG_MODES}, got {self.cfg_mode!r}")
        need(self.cfg_schedule in CFG_SCHEDULES,
             f"cfg_schedule must be one of {CFG_SCHEDULES}, got {self.cfg_schedule!r}")
        need(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        need(self.num_iter <= self.num_tokens,
             f"num_iter ({self.num_iter}) cannot exceed the number of tokens ({self.num_tokens})")
        return self

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "V2FlowConfig":
        """Build and validate a config; unknown keys are an error (a typo must not pass silently)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data).validate()

    @classmethod
    def from_json(cls, text: str) -> "V2FlowConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str | Path) -> "V2FlowConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def replace(self, **changes: Any) -> "V2FlowConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes).validate()


# --------------------------------------------------------------------------- presets
_SIZES = {"base": (768, 12, 12), "large": (1024, 16, 16), "huge": (1280, 20, 16)}


def _official(size: str, res: int) -> V2FlowConfig:
    dim, depth, heads = _SIZES[size]
    tokens = (res // 32) ** 2
    return V2FlowConfig(
        name=f"{size}-{res}", img_size=res, codec="dcae", codec_stride=32, latent_channels=32,
        latent_scale=DCAE_SCALE, encoder_dim=dim, encoder_depth=depth, encoder_heads=heads,
        decoder_dim=dim, decoder_depth=depth, decoder_heads=heads, buffer_size=tokens,
        cfg_scale=4.5, cfg_mode="official",
    ).validate()


def _tiny() -> V2FlowConfig:
    return V2FlowConfig(
        name="tiny", img_size=64, codec="patch", codec_stride=8, latent_channels=192, latent_scale=1.0,
        llm_vocab_size=1024, llm_dim=128, resampler_hidden=96, resampler_depth=2, readout_depth=1,
        resampler_offset=3.0,
        codebook_size=4096, codebook_decay=0.99, dead_code_threshold=0.01,
        encoder_dim=128, encoder_depth=2, encoder_heads=4, decoder_dim=128, decoder_depth=2, decoder_heads=4,
        buffer_size=64, attn_dropout=0.0, proj_dropout=0.0, pos_init="sincos-shared", flow_width=256, flow_depth=3,
        diffusion_batch_mul=1, gumbel_train=False, ode_steps=10, solver="dpm++2m", cfg_scale=1.0,
    ).validate()


PRESETS: dict[str, V2FlowConfig] = {"tiny": _tiny()}
for _size in _SIZES:
    for _res in (256, 512, 1024):
        PRESETS[f"{_size}-{_res}"] = _official(_size, _res)


def get_preset(name: str, **overrides: Any) -> V2FlowConfig:
    """Return a fresh copy of a registered preset, optionally with fields overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides).validate()
