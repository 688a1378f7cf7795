"""Checkpoint I/O: ``save_pretrained``/``from_pretrained`` folders and official ``checkpoint-last.pth`` files.

Nothing here executes code from a file: pickles are read with ``torch.load(weights_only=True)`` and the
only class allow-listed is ``argparse.Namespace`` (the official ``args`` entry).
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..config import (  # noqa: F401  (ASSETS re-exported)
    ASSETS,
    CONFIG_NAME,
    DCAE_SCALE,
    WEIGHTS_NAME,
    V2FlowConfig,
    resolve_model_path,
)
from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_write, atomic_write_text, staged_folder
from .codecs import DCAE_FOLDER, DCAE_KEY, check_dcae_folder, resolve_codec_path
from .model import V2Flow


def save_pretrained(model: V2Flow, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (weights first, config last, each atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
    atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    atomic_write_text(folder / CONFIG_NAME, model.config.to_json())
    return folder


def load_state_into(model: V2Flow, state: dict[str, torch.Tensor], source: str,
                    allow_unexpected: bool = False, assign: bool = False) -> None:
    """Copy a state dict into ``model``, raising CheckpointError that names missing/extra/mismatched keys.

    ``assign``: take the tensors themselves (float32) instead of copying them, for a model built on the
    meta device: no second copy of the weights is ever held (an official checkpoint's readout alone is 4 GB).
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing:
        raise CheckpointError(f"{source}: missing {len(missing)} key(s), e.g. {missing[:5]}")
    if unexpected and not allow_unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected key(s), e.g. {unexpected[:5]} "
                              f"(pass allow_unexpected=True to ignore them)")
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{source}: key {key!r} has shape {list(state[key].shape)}, the model "
                                  f"(config {model.config.name!r}) expects {list(value.shape)}")
    if assign:
        model.load_state_dict({k: state[k].float() if state[k].is_floating_point() else state[k] for k in own},
                              strict=True, assign=True)
    else:
        model.load_state_dict({k: state[k] for k in own}, strict=True)


def from_pretrained(path: str | Path, map_location: str | torch.device = "cpu") -> V2Flow:
    """Load a folder written by ``save_pretrained`` (or ``"default"``, the bundled model)."""
    folder = resolve_model_path(path)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise CheckpointError(f"model folder {folder} has no {name}")
    try:
        config = V2FlowConfig.from_file(folder / CONFIG_NAME)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None   # names the file
    try:
        state = load_file(str(folder / WEIGHTS_NAME), device=str(map_location))
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"{folder / WEIGHTS_NAME} is not a readable safetensors file: {exc}") from None
    resolve_codec_path(config, folder)
    with torch.device("meta"):   # no random init of weights that are overwritten at once
        model = V2Flow(config)
    load_state_into(model, state, str(folder / WEIGHTS_NAME), assign=True)
    return model.eval()


def attach_codec(folder: str | Path, dcae_dir: str | Path, copy: bool = False) -> Path:
    """Record a local diffusers AutoencoderDC folder as the DC-AE codec of model ``folder``.

    The codec is checked against the model (latent channels, stride: CheckpointError naming both sides),
    then either referenced by its absolute path or, with ``copy``, copied into ``folder/codec`` (through a
    temporary folder, renamed into place); a folder already at ``folder/codec`` is recorded as such.
    ``config.json`` is rewritten atomically last. Returns the codec folder the model now uses.
    """
    folder = resolve_model_path(folder)
    config = V2FlowConfig.from_file(folder / CONFIG_NAME)
    if config.codec != "dcae":
        raise CheckpointError(f"model {folder} uses the {config.codec!r} codec, not DC-AE: it takes no codec folder")
    src = Path(dcae_dir).resolve()
    check_dcae_folder(src, config)
    inside = src == (folder / DCAE_FOLDER).resolve()      # already the model's own codec/ folder
    target = src
    if copy and not inside:
        target = folder / DCAE_FOLDER
        with staged_folder(target) as tmp:
            for f in sorted(src.iterdir()):
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
    config.extra[DCAE_KEY] = DCAE_FOLDER if copy or inside else str(src)
    atomic_write_text(folder / CONFIG_NAME, config.to_json())
    return target


# ----------------------------------------------------------------------------- official checkpoints


def safe_torch_load(path: str | Path, *, allowed: tuple[type, ...] = (), mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` (with ``allowed`` classes too), whose every failure is a one-line
    CheckpointError naming the file: a pickle that would import or call code is said to be one and is not loaded,
    anything else is reported as not a readable torch file."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as exc:
                if not mmap or "mmap" not in str(exc):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found or "Unsupported global" in text:
            named = f" (it names {found.group(1)})" if found else ""
            raise CheckpointError(f"{path}: not loaded: it is a pickle that would run code when loaded{named}; "
                                  f"only tensors, containers and numbers are read") from None
        lines = [ln.strip() for ln in text.replace("WeightsUnpickler error:", "\n").splitlines() if ln.strip()]
        torch_text = ("Weights only load failed", "Please file", "Check the")     # torch's advice, not the cause
        detail = next((ln for ln in lines if not ln.startswith(torch_text)), type(exc).__name__)
        raise CheckpointError(f"{path} is not a readable torch file (truncated or corrupt?): {detail}") from None


def read_official(path: str | Path) -> dict[str, Any]:
    """Read an official ``checkpoint-last.pth`` without executing code (mmap'd when possible)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    ckpt = safe_torch_load(path, allowed=(argparse.Namespace,), mmap=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: expected a dict with 'model' (and 'model_ema', 'args'), found {keys}")
    return ckpt


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def config_from_official(state: dict[str, torch.Tensor], args: Any = None) -> V2FlowConfig:
    """Infer the geometry from tensor shapes (and ``args`` for heads, image size and flow sizes)."""
    def shape(key: str) -> list[int]:
        if key not in state:
            raise CheckpointError(f"official state dict has no key {key!r}; is this a V2Flow checkpoint?")
        return list(state[key].shape)

    d, c = shape("z_proj.weight")
    dd = shape("decoder_embed.weight")[0]
    seq = shape("diffusion_pos_embed_learned")[1]
    buffer = shape("encoder_pos_embed_learned")[1] - seq
    vocab, llm_dim = shape("llm_embed_tokens")
    stride = int(getattr(args, "vae_stride", 32) or 32)
    grid = int(round(seq ** 0.5))
    name = str(getattr(args, "model", "") or "")
    size = next((s for s in ("base", "large", "huge") if s in name), None)
    heads = {"base": 12, "large": 16, "huge": 16}.get(size or "", max(1, d // 64))
    return V2FlowConfig(
        name=f"official-{size or 'custom'}-{grid * stride}", img_size=grid * stride, codec="dcae",
        codec_stride=stride, latent_channels=c, latent_scale=DCAE_SCALE, llm_vocab_size=vocab, llm_dim=llm_dim,
        resampler_hidden=shape("downsampler.s1.b1.conv1.conv.weight")[0],
        resampler_depth=_count(state, r"downsampler\.s1\.b(\d+)\."),
        readout_depth=_count(state, r"downsampler\.readout\.(\d+)\.weight"),
        codebook_size=shape("quantizer._codebook.embed")[1],
        encoder_dim=d, encoder_depth=_count(state, r"encoder_blocks\.(\d+)\."), encoder_heads=heads,
        decoder_dim=dd, decoder_depth=_count(state, r"decoder_blocks\.(\d+)\."), decoder_heads=heads,
        buffer_size=buffer, flow_width=shape("flowloss.net.input_proj.weight")[0],
        flow_depth=_count(state, r"flowloss\.net\.res_blocks\.(\d+)\."), cfg_scale=4.5,
        extra={"imported_from": "official checkpoint-last.pth"},
    ).validate()


# What the official code writes that this package does not build, and why (import drops it, says so).
DROPPED_WHY = {"class_emb.weight": "the official model's unused class embedding (no gradient, never read)"}


def _refuse_unrepresentable(path: Path, state: dict[str, torch.Tensor], args: Any) -> None:
    """CheckpointError for official checkpoints this package cannot run faithfully (names the flag)."""
    if args is not None and getattr(args, "visual_vocabulary", True) is False or "llm_embed_tokens" not in state:
        raise CheckpointError(f"{path}: trained without the visual vocabulary (no llm_embed_tokens; the official "
                              f"no-vocab baseline branch); v2flow-rt implements the vocabulary branch only")
    flow = str(getattr(args, "flow_method", "linear_flow") or "linear_flow")
    if flow != "linear_flow":
        raise CheckpointError(f"{path}: trained with --flow_method {flow}, whose time and sign conventions differ "
                              f"(t in [0, 1], target x - noise); v2flow-rt samples the linear_flow convention only")
    patch = int(getattr(args, "patch_size", 1) or 1)
    if patch != 1:
        raise CheckpointError(f"{path}: trained with --patch_size {patch}; v2flow-rt supports patch size 1 (one "
                              f"token per DC-AE latent position, as every official factory uses)")
    embed = getattr(args, "vae_embed_dim", None)
    if embed is not None and "z_proj.weight" in state and int(state["z_proj.weight"].shape[1]) != int(embed):
        raise CheckpointError(f"{path}: z_proj takes {int(state['z_proj.weight'].shape[1])} values per token but "
                              f"args.vae_embed_dim is {embed}")


def import_official(path: str | Path, use_ema: bool = False, allow_unexpected: bool = False,
                    report: dict[str, Any] | None = None) -> V2Flow:
    """Build a model from an official ``checkpoint-last.pth`` (raw weights by default, as the official
    ``--evaluate`` does; ``use_ema=True`` takes ``model_ema``).

    The file is memory-mapped and the model is built on the meta device and takes the mapped tensors, so
    no weight is held twice. ``report``, when given, receives what was dropped and why (``dropped``: key →
    reason, ``parameters``, ``entry``, ``epoch``).

    Raises CheckpointError: unreadable or code-carrying file, no such entry, a geometry that does not fit,
    or an official variant this package cannot represent (no visual vocabulary, CondOT flow, patch size > 1).
    """
    path = Path(path)
    ckpt = read_official(path)
    key = "model_ema" if use_ema else "model"
    if key not in ckpt or not isinstance(ckpt[key], dict):
        raise CheckpointError(f"{path}: no {key!r} state dict (found {sorted(ckpt)})")
    args = ckpt.get("args")
    dropped = {k: DROPPED_WHY[k] for k in ckpt[key] if k in DROPPED_WHY}
    state = {k: v for k, v in ckpt[key].items() if k not in dropped}
    _refuse_unrepresentable(path, state, args)
    try:
        config = config_from_official(state, args)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: the tensors describe an inconsistent geometry: {exc}") from None
    with torch.device("meta"):
        model = V2Flow(config)
    load_state_into(model, state, f"{path}[{key!r}]", allow_unexpected=allow_unexpected, assign=True)
    if report is not None:
        report.update({"entry": key, "epoch": ckpt.get("epoch"), "config": config.name,
                       "parameters": sum(p.numel() for p in model.parameters()),
                       "dropped": {k: f"{why} ({ckpt[key][k].numel() / 1e6:.1f} M values)"
                                   for k, why in dropped.items()}})
    return model.eval()


def export_official(model: V2Flow, path: str | Path, ema_state: dict[str, torch.Tensor] | None = None,
                    with_class_emb: bool = True) -> Path:
    """Write the official layout ``{'model', 'model_ema', 'epoch', 'args'}`` (round-trips through import).

    Raises CheckpointError for a model with a ``resampler_offset`` channel, which the official code lacks.
    """
    cfg = model.config
    if cfg.resampler_offset:
        raise CheckpointError(f"model {cfg.name!r} has a constant resampler input channel (resampler_offset="
                              f"{cfg.resampler_offset}); the official code has none and could not load it")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if with_class_emb:
        state["class_emb.weight"] = torch.zeros(cfg.codebook_size, cfg.llm_dim)
    ema = dict(state) if ema_state is None else {**state, **{k: v.detach().cpu() for k, v in ema_state.items()}}
    size = cfg.name.split("-")[0] if cfg.name.split("-")[0] in ("base", "large", "huge") else "custom"
    args = argparse.Namespace(model=f"v2flow_{size}", img_size=cfg.img_size, vae_stride=cfg.codec_stride,
                              vae_embed_dim=cfg.latent_channels, patch_size=1, buffer_size=cfg.buffer_size,
                              flowloss_w=cfg.flow_width, flowloss_d=cfg.flow_depth, num_iter=cfg.num_iter)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": state, "model_ema": ema, "epoch": 0, "args": args}
    atomic_write(out, lambda p: torch.save(payload, p))
    return out



# ----------------------------------------------------------------------------- whole model folders


def _new_folder(out: Path, write: Any) -> Path:
    """Fill a temporary folder beside ``out`` with ``write(tmp)``, then put it in place of ``out``
    (``fileio.staged_folder``: a second writer of ``out`` is refused, a failure leaves ``out`` as it was).

    ``out`` must be absent, empty or a model folder (holds config.json); an existing one is moved aside
    only once the new folder is complete, and deleted last.
    """
    def keep(dest: Path) -> None:
        if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not (dest / CONFIG_NAME).is_file())):
            raise CheckpointError(f"refusing to replace {dest}: it is not empty and holds no {CONFIG_NAME}, so it "
                                  f"is not a model folder (choose another --out or empty it)")

    keep(out)
    with staged_folder(out, keep=keep) as tmp:
        write(tmp)
    return out


def randomize_zero_layers(model: V2Flow, seed: int = 0, std: float = 0.02) -> V2Flow:
    """Fill every all-zero weight and bias (adaLN modulations, the velocity net's output layer, ...) with
    N(0, std²): a freshly initialised V2Flow's velocity is exactly zero, so parity checks and benchmarks of
    an untrained model would otherwise compare zeros. Norm layers are left as they are. In place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 1 and float(p.abs().max()) == 0 and "norm" not in name and "_ln" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def import_official_folder(checkpoint: str | Path, out: str | Path, use_ema: bool = False,
                           codec: str | Path | None = None, copy_codec: bool = False,
                           progress: bool = True) -> dict[str, Any]:
    """``import_official`` written as a model folder (config.json + model.safetensors [+ codec/]).

    The checkpoint is memory-mapped and its tensors written straight to safetensors, so memory stays near
    one copy of the chosen entry's weights. ``codec``: a local diffusers AutoencoderDC folder, checked
    against the model, then referenced (or copied in with ``copy_codec``). Returns the import report
    (what was dropped and why, parameter count, codec, folder).
    """
    from tqdm import tqdm

    report: dict[str, Any] = {}
    with tqdm(total=3, desc="import", unit="step", disable=not progress, leave=False) as bar:   # cleared on errors
        bar.set_postfix_str("reading (mmap)")
        model = import_official(checkpoint, use_ema=use_ema, report=report)
        if codec is not None:
            check_dcae_folder(codec, model.config)   # refuse a mismatched codec before writing anything
        bar.update()

        def write(tmp: Path) -> None:
            bar.set_postfix_str(f"writing {WEIGHTS_NAME}")
            save_pretrained(model, tmp)
            bar.update()
            if codec is not None:
                bar.set_postfix_str("codec")
                attach_codec(tmp, codec, copy=copy_codec)
            bar.update()

        folder = _new_folder(Path(out), write)
    report.update({"folder": str(folder), "codec": (str(folder / DCAE_FOLDER) if copy_codec else str(codec))
                   if codec is not None else None})
    return report


def init_model_folder(preset: str, out: str | Path, seed: int = 0, codec: str | Path | None = None,
                      copy_codec: bool = False, randomize: bool = False) -> Path:
    """A randomly initialised model of a preset (the official initialisation) written as a model folder.

    DC-AE presets get ``codec`` or, when none is given, a tiny random AutoencoderDC of the right geometry
    copied in as ``codec/`` (``codecs.make_tiny_dcae``), so the real sizes can be exercised without a
    checkpoint. ``randomize``: also fill the zero-initialised layers (``randomize_zero_layers``).
    """
    from ..config import get_preset
    from .codecs import make_tiny_dcae

    config = get_preset(preset)
    how = f"random, seed {seed}" + (", zero-initialised layers filled" if randomize else "")
    config.extra = {**config.extra, "initialised": how}
    torch.manual_seed(seed)
    model = V2Flow(config).eval()
    if randomize:
        randomize_zero_layers(model, seed + 1)

    def write(tmp: Path) -> None:
        save_pretrained(model, tmp)
        if config.codec == "dcae":
            if codec is None:
                make_tiny_dcae(tmp / DCAE_FOLDER, config.latent_channels, config.codec_stride, seed)
                attach_codec(tmp, tmp / DCAE_FOLDER)     # recorded relative: the folder stays movable
            else:
                attach_codec(tmp, codec, copy=copy_codec)

    return _new_folder(Path(out), write)
