"""Export a V2Flow model to one ONNX graph per stage and precision, validated, atomically.

``export_model`` does, in a temporary folder next to ``out_dir``:

1. per stage (progress bar): ``torch.onnx.export`` (dynamo, opset 18 by default, ``dynamic_shapes`` from
   the stage spec's symbolic dims), saved as ``{stage}.fp32.onnx`` (``.onnx.data`` beside it when the
   weights pass ~1.8 GB), ``onnx.checker.check_model`` by path and shape inference;
2. fp32 parity against the PyTorch stage modules on fresh random inputs at several sizes and on real
   photo crops (``ParityError`` on a mismatch);
3. the other precisions (``export.precision``), calibrated on TRAIN photo crops;
4. hashes and a provisional manifest, so that the runtime pipeline can read the folder;
5. quality figures on held-out photo crops (tokenizer id agreement, decoder-path PSNR) through that
   pipeline;
6. the final ``manifest.json`` last; then the folder replaces ``out_dir`` (an existing export there is
   moved aside only now, and deleted once the new one is in place).

Any failure removes the temporary folder and leaves ``out_dir`` as it was.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from .. import __version__
from ..errors import ExportError, V2FlowError
from ..fileio import file_sha256, staged_folder, writer_lock
from ..manifest import (
    MANIFEST_NAME,
    PRECISIONS,
    Manifest,
    checkpoint_sha256,
    record_stage,
    tokenizer_sha256,
)
from ..reference.checkpoint import from_pretrained, resolve_model_path
from ..reference.model import V2Flow
from ..reference.stage_modules import Codec, codec_available, stage_modules
from ..sampling import SamplerSettings
from ..stages import ONE_CALL_STAGES, STAGE_NAMES, StageSpec, stage_specs
from .calibration import photo_crops, record_stage_inputs, train_crops
from .precision import EXTERNAL_DATA_BYTES, convert_stage, graph_files, ort_session

CODEC_STAGES = ("codec_encode", "codec_decode")
NEEDS_CODEC = CODEC_STAGES + ONE_CALL_STAGES
SAMPLER_OVERRIDES = ("num_iter", "cfg_scale", "cfg_mode", "temperature")


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 over a state dict (sorted keys, dtypes, shapes, bytes): the identity of an in-memory model."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def versions() -> dict[str, str]:
    import onnxruntime

    return {"v2flow_rt": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


# ----------------------------------------------------------------------------- one graph

def export_inputs(spec: StageSpec, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    """Sample inputs for tracing: every symbolic dim ≥ 2 (torch.export specialises sizes 0 and 1) and
    distinct where possible, so no two dims are assumed equal."""
    dims: dict[str, int] = {}
    for i, (name, (lo, opt, hi)) in enumerate(spec.dims.items()):
        want = max(lo, 2 + i, min(opt, hi))
        dims[name] = min(want, hi) if hi >= 2 else hi
    feeds = spec.sample_inputs(rng, **dims)
    return tuple(torch.from_numpy(feeds[n]) for n in spec.input_names)


def dynamic_shapes(spec: StageSpec) -> tuple[dict[int, Any] | None, ...]:
    """``torch.export`` dynamic_shapes from the spec: one shared ``Dim`` per symbolic dim name."""
    dims = {name: torch.export.Dim(name) for name in spec.dims}
    return tuple({i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} or None for t in spec.inputs)


def export_graph(module: torch.nn.Module, spec: StageSpec, path: Path, opset: int,
                 rng: np.random.Generator, optimize: bool = True) -> list[Path]:
    """Export one stage module to ``path`` (checked by path, shapes inferred); return the files written.

    ``optimize``: run the exporter's onnxscript optimizer. Third-party modules are exported without it
    (DC-AE, in the codec and one-call stages): its add-zero rewrite matches constants within 1e-8 of
    zero, so DC-AE's linear attention ``num / (den + 1e-15)`` loses its epsilon and gives 0/0 = NaN where
    ReLU zeroes a whole key set (measured with onnxscript 0.7.2). ONNX Runtime and TensorRT optimise the
    graph at load anyway.
    """
    args = export_inputs(spec, rng)
    try:
        with torch.no_grad(), _quiet():
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                        dynamic_shapes=dynamic_shapes(spec), input_names=spec.input_names,
                                        output_names=spec.output_names, verbose=False, optimize=optimize)
    except V2FlowError:
        raise
    except Exception as exc:
        raise ExportError(f"stage {spec.name!r}: torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    if program is None:
        raise ExportError(f"stage {spec.name!r}: torch.onnx.export returned no program")
    weights = sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
                  if v.const_value is not None)
    for old in graph_files(path):
        old.unlink(missing_ok=True)
    program.save(str(path), external_data=weights > EXTERNAL_DATA_BYTES)
    check_graph(path, spec)
    return graph_files(path)


def check_graph(path: Path, spec: StageSpec) -> None:
    """``onnx.checker`` (by path, so graphs with external data work), shape inference, I/O names."""
    try:
        onnx.checker.check_model(str(path))
        onnx.shape_inference.infer_shapes_path(str(path), str(path))
    except Exception as exc:
        raise ExportError(f"stage {spec.name!r}: {path.name} fails the ONNX checker: {exc}") from exc
    graph = onnx.load(str(path), load_external_data=False).graph
    got_in = [i.name for i in graph.input]
    got_out = [o.name for o in graph.output]
    if got_in != spec.input_names or got_out != spec.output_names:
        raise ExportError(f"stage {spec.name!r}: {path.name} has inputs {got_in} and outputs {got_out}, the stage "
                          f"contract says {spec.input_names} → {spec.output_names}")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's per-stage chatter (warnings about torchvision ops and the like)."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(open(os.devnull, "w")) as devnull:
            warnings.simplefilter("ignore")
            try:
                yield
            finally:
                devnull.close()
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


# ----------------------------------------------------------------------------- the whole export

def _resolve(model: V2Flow | str | os.PathLike[str], source: str | os.PathLike[str] | None,
             ) -> tuple[V2Flow, str, str]:
    """(model, source path or "", source sha256)."""
    if isinstance(model, V2Flow):
        if source is None:
            return model.eval(), "", "state:" + state_sha256(model)
        return model.eval(), str(resolve_model_path(source).resolve()), checkpoint_sha256(resolve_model_path(source))
    folder = resolve_model_path(model)
    loaded = from_pretrained(folder)
    return loaded, str(folder.resolve()), checkpoint_sha256(folder)


def _check_target(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise ExportError(f"refusing to replace {out_dir}: it is not empty and holds no {MANIFEST_NAME}, so it is "
                          f"not an export folder (choose another --out or empty it)")


def export_model(model: V2Flow | str | os.PathLike[str], out_dir: str | os.PathLike[str],
                 precisions: Sequence[str] = ("fp32",), opset: int = 18, max_batch: int = 16, progress: bool = True,
                 *, stages: Sequence[str] | None = None, steps: int | None = None, solver: str | None = None,
                 shift: float | None = None, source: str | os.PathLike[str] | None = None,
                 dcae_path: str | None = None, validate: bool = True, quality: bool = True,
                 calib_images: int = 32, quality_per_image: int = 8, parity_photos: int = 4,
                 seed: int = 0, aoti: bool = False, sampler: dict[str, Any] | None = None) -> Manifest:
    """Export, validate and measure every stage; return the manifest written into ``out_dir``.

    Args:
        model: a ``V2Flow``, a ``save_pretrained`` folder, or ``"default"`` (the bundled model).
        out_dir: the export folder (replaced only once the new export has fully succeeded).
        precisions: any of ``fp32``, ``fp16``, ``int8``, ``int8-qdq`` (fp32 is always exported: the others
            are derived from it and validated against it).
        opset: ONNX opset, ≥ 18 (the dynamo exporter writes invalid Split nodes at 17).
        max_batch: images per call the graphs are profiled for (TensorRT profiles, validation ranges).
        progress: show a progress bar over stages.
        stages: a subset of stage names (default: all; the codec stages are skipped, with a note, when the
            codec cannot be built here, e.g. DC-AE without diffusers or a local folder).
        steps, solver, shift: ODE settings baked into ``ode``/``ode_cfg`` (default: the config's).
        sampler: other sampler settings baked into the one-call ``detokenize`` graph (``SAMPLER_OVERRIDES``:
            num_iter, cfg_scale (guided or not), cfg_mode, temperature; default: the config's).
        source: for an in-memory ``model``, the checkpoint folder it was loaded from (recorded, so
            ``validate_folder`` can re-check against it).
        dcae_path: local DC-AE folder for ``dcae`` configs.
        validate: run the fp32 parity checks (raise ParityError on a mismatch).
        quality: measure the quality figures (needs the codec stages).
        calib_images: TRAIN photo crops used to calibrate int8-qdq and to measure fp16 ranges.
        quality_per_image: held-out crops per photo for the quality figures.
        parity_photos: held-out crops pushed through the stages for the real-photo parity check (0: none).
        seed: seed of the random parity inputs, the calibration crops and the sampling noise.
        aoti: also compile the one-call modules into AOTInductor packages (``{stage}.pt2``, for the C++
            clients of ``cpp/``), each checked against its module (ParityError otherwise).

    Raises:
        ExportError: bad arguments, an export or checker failure (names the stage).
        ParityError: an fp32 graph disagrees with PyTorch.
        CheckpointError: ``model`` names an unreadable checkpoint.
    """
    if not list(precisions):
        raise ExportError(f"no precision given; choose from {', '.join(PRECISIONS)}")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise ExportError(f"unknown precision(s) {bad}; choose from {', '.join(PRECISIONS)}")
    if opset < 18:
        raise ExportError(f"opset {opset} is not supported: the dynamo exporter writes invalid graphs at opset 17 "
                          f"(Split num_outputs); use 18 or later")
    precisions = ["fp32"] + [p for p in dict.fromkeys(precisions) if p != "fp32"]
    out = Path(out_dir)
    _check_target(out)
    with writer_lock(out):       # a second export into the same folder is refused now, not discarded later
        return _export_locked(model, out, precisions, opset, max_batch, progress, stages, steps, solver, shift,
                              source, dcae_path, validate, quality, calib_images, quality_per_image, parity_photos,
                              seed, aoti, sampler)


def _export_locked(model: V2Flow | str | os.PathLike[str], out: Path, precisions: list[str], opset: int,
                   max_batch: int, progress: bool, stages: Sequence[str] | None, steps: int | None,
                   solver: str | None, shift: float | None, source: str | os.PathLike[str] | None,
                   dcae_path: str | None, validate: bool, quality: bool, calib_images: int, quality_per_image: int,
                   parity_photos: int, seed: int, aoti: bool, sampler: dict[str, Any] | None) -> Manifest:
    net, source_path, source_sha = _resolve(model, source)
    cfg = net.config
    extra = {k: v for k, v in (sampler or {}).items() if v is not None}
    unknown_fields = sorted(set(extra) - set(SAMPLER_OVERRIDES))
    if unknown_fields:
        raise ExportError(f"unknown sampler setting(s) {unknown_fields}; choose from {list(SAMPLER_OVERRIDES)}")
    specs_all = stage_specs(cfg, max_batch=max_batch, steps=steps, solver=solver, shift=shift, **extra)
    wanted = list(stages) if stages is not None else list(STAGE_NAMES)
    unknown = [s for s in wanted if s not in specs_all]
    if unknown:
        raise ExportError(f"unknown stage(s) {unknown}; stages are {list(STAGE_NAMES)}")
    notes: list[str] = []
    codec: Codec | None = None
    if any(s in NEEDS_CODEC for s in wanted):
        codec, why = codec_available(cfg, dcae_path)
        if codec is None:
            if stages is not None:
                raise ExportError(f"cannot export the codec stages: {why}")
            wanted = [s for s in wanted if s not in NEEDS_CODEC]
            notes.append(f"codec and one-call stages not exported: {why}")
    specs = {s: specs_all[s] for s in wanted}
    stage_options = {"max_batch": max_batch, "steps": int(specs_all["ode"].attrs["steps"]),
                     "solver": str(specs_all["ode"].attrs["solver"]), "shift": float(specs_all["ode"].attrs["shift"]),
                     **extra}
    settings = SamplerSettings.from_config(cfg, **{k: v for k, v in stage_options.items() if k != "max_batch"})
    # Every stage module, exported or not: recording real-photo inputs runs the whole fp32 pipeline.
    modules = stage_modules(net, {s: sp for s, sp in specs_all.items()
                                  if s not in NEEDS_CODEC or codec is not None}, codec)
    rng = np.random.default_rng(seed)

    with staged_folder(out, keep=_check_target) as tmp:   # swapped into place when the block succeeds
        with torch.no_grad():
            manifest = Manifest(config=cfg, stages={s: record_stage(specs[s]) for s in specs}, files={}, sha256={},
                                opset=opset, source_checkpoint_sha256=source_sha, stage_options=stage_options,
                                source_checkpoint=source_path, versions=versions(), notes=notes,
                                tokenizer_sha256=tokenizer_sha256(net),
                                constants={"fake_latent": net.fake_latent.detach().float().reshape(-1).tolist()})
            manifest.folder = tmp
            clock = _Clock(manifest.timings)
            # 1. fp32 graphs
            manifest.files["fp32"] = {}
            for name in _progress(list(specs), progress, "export fp32"):
                rel = f"{name}.fp32.onnx"
                third_party = cfg.codec == "dcae" and name in NEEDS_CODEC     # DC-AE inside (see export_graph)
                export_graph(modules[name], specs[name], tmp / rel, opset, rng, optimize=not third_party)
                manifest.files["fp32"][name] = rel
            clock.lap("export fp32")
            # 2. fp32 parity, on random inputs and on held-out photo crops through the stages
            photo: dict[str, list[dict[str, np.ndarray]]] = {}
            heldout: np.ndarray | None = None
            if codec is not None:
                from ..data import HELDOUT_PHOTOS

                heldout = photo_crops(HELDOUT_PHOTOS, cfg.img_size, quality_per_image)
            if validate:
                from .validate import random_feeds, stage_parity

                if heldout is not None and parity_photos > 0:   # a few solver steps give realistic inputs
                    quick = replace(settings, steps=min(settings.steps, 4))
                    photo = record_stage_inputs(net, modules, heldout[:parity_photos], quick, seed=seed, batch=4,
                                                max_rows=64, stages=list(specs))
                # the same feeds (and cached PyTorch outputs) serve every precision
                parity_feeds = {name: {k: v for k, v in {"random": random_feeds(specs[name], rng),
                                                         "photo": photo.get(name, [])[:3]}.items() if v}
                                for name in specs}
                parity_refs: dict[str, dict[int, Any]] = {name: {} for name in specs}
                manifest.parity["fp32"] = {}
                for name in _progress(list(specs), progress, "parity fp32"):
                    manifest.parity["fp32"][name] = stage_parity(
                        name, specs[name], _runner(manifest.path(name, "fp32")), modules[name], parity_feeds[name],
                        gate=True, cache=parity_refs[name])
                clock.lap("parity fp32")
            if aoti:    # C++ packages of the one-call modules (LibTorch AOTInductor)
                from .aoti import write_packages

                wanted_oc = {s: modules[s] for s in specs if s in ONE_CALL_STAGES}
                if not wanted_oc:
                    raise ExportError("--aoti packages the one-call graphs (tokenize, detokenize), which this export "
                                      "does not hold (they need the codec)")
                defaults = {"cfg_scale": settings.cfg_scale}
                manifest.packages, manifest.parity["aoti"] = write_packages(wanted_oc, specs, tmp, rng, progress,
                                                                            defaults)
                clock.lap("aoti")
            # 3. other precisions, calibrated on TRAIN photo crops through the fp32 stages
            others = precisions[1:]
            if others:
                calib: dict[str, list[dict[str, np.ndarray]]] = {}
                if codec is not None:
                    crops = train_crops(cfg.img_size, calib_images, seed)
                    calib = record_stage_inputs(net, modules, crops, settings, seed=seed, batch=8, stages=list(specs))
                else:
                    notes.append("no codec: int8-qdq and fp16 ranges calibrated on random inputs, not photos")
                clock.lap("calibration inputs")
                for precision in others:
                    manifest.files[precision] = {}
                    manifest.precision_notes[precision] = {}
                    for name in _progress(list(specs), progress, f"convert {precision}"):
                        rel = f"{name}.{precision}.onnx"
                        feeds = calib.get(name) or [specs[name].sample_inputs(rng) for _ in range(4)]
                        try:
                            manifest.precision_notes[precision][name] = convert_stage(
                                precision, specs[name], tmp / f"{name}.fp32.onnx", tmp / rel, feeds)
                        except V2FlowError:
                            raise
                        except Exception as exc:
                            raise ExportError(f"stage {name!r}: converting to {precision} failed: "
                                              f"{type(exc).__name__}: {exc}") from exc
                        manifest.files[precision][name] = rel
                    clock.lap(f"convert {precision}")
                    if validate:
                        manifest.parity[precision] = {}
                        for name in specs:
                            manifest.parity[precision][name] = stage_parity(
                                name, specs[name], _runner(manifest.path(name, precision)), modules[name],
                                parity_feeds[name], gate=False, cache=parity_refs[name])
                        clock.lap(f"parity {precision}")
            # 4. hashes and a provisional manifest (the runtime pipeline reads the folder through it)
            _hash_files(manifest, tmp)
            manifest.write(tmp)
            # 5. quality figures on held-out crops, through the runtime pipeline
            if quality:
                # the stage loop at the baked settings runs the fused ODE graphs (guided: ode_cfg too), no velocity
                loop = ("codec_encode", "tokenizer", "token_embed", "mar_step", "codec_decode", "ode") + \
                    (("ode_cfg",) if settings.guided else ())
                if heldout is None or any(s not in specs for s in loop):
                    notes.append(f"quality figures not measured: they need the stages {', '.join(loop)}")
                else:
                    from .validate import measure_quality

                    manifest.quality = measure_quality(tmp, net, heldout, settings, seed=0)
                    clock.lap("quality")
        # 6. the final manifest last, then into place
        manifest.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        manifest.write(tmp)
    manifest.folder = out
    return manifest


class _Clock:
    """Records seconds per export phase into the manifest."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings, self.t = timings, time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.timings[phase] = round(now - self.t, 2)
        self.t = now


def _runner(path: Path) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    """feeds → outputs of one graph on a CPU ORT session."""
    session = ort_session(path)

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(session.run(None, feeds))

    return run


def _hash_files(manifest: Manifest, folder: Path) -> None:
    manifest.sha256 = {}
    for per in manifest.files.values():
        for rel in per.values():
            for f in graph_files(folder / rel):
                manifest.sha256[f.name] = file_sha256(f)
    for rel in manifest.packages.values():
        manifest.sha256[rel] = file_sha256(folder / rel)


def _progress(items: list[str], enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="stage", leave=False)
