"""The export job: a V2Flow model → one validated export folder, as a short sequence of named steps.

``export_model`` plans the job (``_plan``: stages, codec, sampler settings, stage modules), then, in a
temporary folder next to ``out_dir``:

1. ``_export_fp32``: one graph per stage (``export.onnx.export_graph``), ``{stage}.fp32.onnx``;
2. ``_check_fp32``: fp32 parity against the PyTorch stage modules on fresh random inputs at several sizes
   and on real photo crops (``ParityError`` on a mismatch);
3. ``_write_aoti`` (``aoti=True``): the one-call modules as AOTInductor packages for the C++ clients;
4. ``_convert``: the other precisions (``export.precision``), calibrated on TRAIN photo crops, and their
   parity figures (recorded, not gated);
5. ``_hash_files`` and a provisional manifest, so that the runtime pipeline can read the folder;
6. ``_measure_quality``: quality figures on held-out photo crops through that pipeline
   (``export.quality``);
7. the final ``manifest.json`` last; then the folder replaces ``out_dir`` (an existing export there is
   moved aside only now, and deleted once the new one is in place).

Any failure removes the temporary folder and leaves ``out_dir`` as it was; a second export into the same
``out_dir`` at the same time is refused (``fileio.writer_lock``).

Floor 4 of the house: it drives the graph-level modules of floor 3 (``export.onnx``, ``export.precision``,
``export.parity``) and measures quality through the pipeline (``export.quality``).
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import resolve_model_path
from ..errors import ExportError, V2FlowError
from ..fileio import file_sha256, staged_folder, writer_lock
from ..manifest import MANIFEST_NAME, PRECISIONS, Manifest, checkpoint_sha256, record_stage, tokenizer_sha256
from ..reference.checkpoint import from_pretrained
from ..reference.model import V2Flow
from ..reference.stage_modules import Codec, codec_available, stage_modules
from ..sampling import SamplerSettings
from ..stages import ONE_CALL_STAGES, STAGE_NAMES, StageSpec, stage_specs
from .calibration import photo_crops, record_stage_inputs, train_crops
from .onnx import export_graph, state_sha256, versions
from .parity import Feeds, random_feeds, stage_parity
from .precision import convert_stage, graph_files, ort_session

CODEC_STAGES = ("codec_encode", "codec_decode")
NEEDS_CODEC = CODEC_STAGES + ONE_CALL_STAGES
SAMPLER_OVERRIDES = ("num_iter", "cfg_scale", "cfg_mode", "temperature")


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
    out = Path(out_dir)
    _check_target(out)
    with writer_lock(out):       # a second export into the same folder is refused now, not discarded later
        job = _plan(model, source, stages, dcae_path, max_batch=max_batch, steps=steps, solver=solver, shift=shift,
                    sampler=sampler)
        job.precisions = ["fp32"] + [p for p in dict.fromkeys(precisions) if p != "fp32"]
        job.opset, job.progress, job.seed, job.rng = opset, progress, seed, np.random.default_rng(seed)
        job.calib_images, job.parity_photos = calib_images, parity_photos
        if job.codec is not None:
            from ..data import HELDOUT_PHOTOS

            job.heldout = photo_crops(HELDOUT_PHOTOS, job.cfg.img_size, quality_per_image)
        return _run(job, out, validate=validate, aoti=aoti, quality=quality)


@dataclass
class _Job:
    """What one export works on; filled by ``_plan`` and ``export_model``, read by the steps."""

    net: V2Flow
    source_path: str
    source_sha: str
    specs: dict[str, StageSpec]            # the stages exported
    modules: dict[str, torch.nn.Module]    # every stage's module, exported or not (calibration runs them all)
    codec: Codec | None
    settings: SamplerSettings              # the settings baked into the graphs
    stage_options: dict[str, Any]
    notes: list[str]
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    opset: int = 18
    progress: bool = True
    seed: int = 0
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    calib_images: int = 32
    parity_photos: int = 4
    heldout: np.ndarray | None = None      # held-out photo crops [B,3,S,S] (needs the codec)
    parity_feeds: dict[str, dict[str, list[Feeds]]] = field(default_factory=dict)
    parity_refs: dict[str, dict[int, Any]] = field(default_factory=dict)

    @property
    def cfg(self) -> Any:
        return self.net.config


def _plan(model: V2Flow | str | os.PathLike[str], source: str | os.PathLike[str] | None,
          stages: Sequence[str] | None, dcae_path: str | None, *, max_batch: int, steps: int | None,
          solver: str | None, shift: float | None, sampler: dict[str, Any] | None) -> _Job:
    """Load the model and decide what is exported with which settings (ExportError for bad choices)."""
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
    ode = specs_all["ode"].attrs
    stage_options = {"max_batch": max_batch, "steps": int(ode["steps"]), "solver": str(ode["solver"]),
                     "shift": float(ode["shift"]), **extra}
    settings = SamplerSettings.from_config(cfg, **{k: v for k, v in stage_options.items() if k != "max_batch"})
    modules = stage_modules(net, {s: sp for s, sp in specs_all.items() if s not in NEEDS_CODEC or codec is not None},
                            codec)
    return _Job(net, source_path, source_sha, {s: specs_all[s] for s in wanted}, modules, codec, settings,
                stage_options, notes)


def _run(job: _Job, out: Path, *, validate: bool, aoti: bool, quality: bool) -> Manifest:
    """The steps, in a staged folder that replaces ``out`` only when every step has succeeded."""
    with staged_folder(out, keep=_check_target) as tmp, torch.no_grad():
        manifest = _new_manifest(job, tmp)
        clock = _Clock(manifest.timings)
        _export_fp32(job, manifest, tmp)
        clock.lap("export fp32")
        if validate:
            _check_fp32(job, manifest)
            clock.lap("parity fp32")
        if aoti:
            _write_aoti(job, manifest, tmp)
            clock.lap("aoti")
        if len(job.precisions) > 1:
            _convert(job, manifest, tmp, clock, validate)
        _hash_files(manifest, tmp)
        manifest.write(tmp)          # provisional: the runtime pipeline reads the folder through it
        if quality:
            _measure_quality(job, manifest, tmp)
            clock.lap("quality")
        manifest.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        manifest.write(tmp)          # the final manifest last
    manifest.folder = out
    return manifest


# ----------------------------------------------------------------------------- the steps

def _new_manifest(job: _Job, tmp: Path) -> Manifest:
    net = job.net
    manifest = Manifest(config=job.cfg, stages={s: record_stage(sp) for s, sp in job.specs.items()}, files={},
                        sha256={}, opset=job.opset, source_checkpoint_sha256=job.source_sha,
                        stage_options=job.stage_options, source_checkpoint=job.source_path, versions=versions(),
                        notes=job.notes, tokenizer_sha256=tokenizer_sha256(net),
                        constants={"fake_latent": net.fake_latent.detach().float().reshape(-1).tolist()})
    manifest.folder = tmp
    return manifest


def _export_fp32(job: _Job, manifest: Manifest, tmp: Path) -> None:
    """Step 1: one fp32 graph per stage."""
    manifest.files["fp32"] = {}
    for name in _progress(list(job.specs), job.progress, "export fp32"):
        rel = f"{name}.fp32.onnx"
        third_party = job.cfg.codec == "dcae" and name in NEEDS_CODEC     # DC-AE inside (see export_graph)
        export_graph(job.modules[name], job.specs[name], tmp / rel, job.opset, job.rng, optimize=not third_party)
        manifest.files["fp32"][name] = rel


def _check_fp32(job: _Job, manifest: Manifest) -> None:
    """Step 2: fp32 parity (gated) on random inputs and on held-out photo crops through the stages. The
    same feeds, and their cached PyTorch outputs, serve every precision's figures later."""
    photo: dict[str, list[Feeds]] = {}
    if job.heldout is not None and job.parity_photos > 0:      # a few solver steps give realistic inputs
        quick = replace(job.settings, steps=min(job.settings.steps, 4))
        photo = record_stage_inputs(job.net, job.modules, job.heldout[:job.parity_photos], quick, seed=job.seed,
                                    batch=4, max_rows=64, stages=list(job.specs))
    job.parity_feeds = {name: {k: v for k, v in {"random": random_feeds(spec, job.rng),
                                                 "photo": photo.get(name, [])[:3]}.items() if v}
                        for name, spec in job.specs.items()}
    job.parity_refs = {name: {} for name in job.specs}
    _parity(job, manifest, "fp32", gate=True)


def _parity(job: _Job, manifest: Manifest, precision: str, gate: bool) -> None:
    manifest.parity[precision] = {}
    for name in _progress(list(job.specs), job.progress and gate, f"parity {precision}"):
        manifest.parity[precision][name] = stage_parity(
            name, job.specs[name], _runner(manifest.path(name, precision)), job.modules[name],
            job.parity_feeds[name], gate=gate, cache=job.parity_refs[name])


def _write_aoti(job: _Job, manifest: Manifest, tmp: Path) -> None:
    """Step 3: C++ packages of the one-call modules (LibTorch AOTInductor), each checked."""
    from .aoti import write_packages

    wanted = {s: job.modules[s] for s in job.specs if s in ONE_CALL_STAGES}
    if not wanted:
        raise ExportError("--aoti packages the one-call graphs (tokenize, detokenize), which this export does not "
                          "hold (they need the codec)")
    manifest.packages, manifest.parity["aoti"] = write_packages(wanted, job.specs, tmp, job.rng, job.progress,
                                                                {"cfg_scale": job.settings.cfg_scale})


def _convert(job: _Job, manifest: Manifest, tmp: Path, clock: _Clock, validate: bool) -> None:
    """Step 4: the other precisions, calibrated on TRAIN photo crops through the fp32 stages."""
    calib: dict[str, list[Feeds]] = {}
    if job.codec is not None:
        crops = train_crops(job.cfg.img_size, job.calib_images, job.seed)
        calib = record_stage_inputs(job.net, job.modules, crops, job.settings, seed=job.seed, batch=8,
                                    stages=list(job.specs))
    else:
        job.notes.append("no codec: int8-qdq and fp16 ranges calibrated on random inputs, not photos")
    clock.lap("calibration inputs")
    for precision in job.precisions[1:]:
        manifest.files[precision] = {}
        manifest.precision_notes[precision] = {}
        for name in _progress(list(job.specs), job.progress, f"convert {precision}"):
            rel = f"{name}.{precision}.onnx"
            feeds = calib.get(name) or [job.specs[name].sample_inputs(job.rng) for _ in range(4)]
            try:
                manifest.precision_notes[precision][name] = convert_stage(
                    precision, job.specs[name], tmp / f"{name}.fp32.onnx", tmp / rel, feeds)
            except V2FlowError:
                raise
            except Exception as exc:
                raise ExportError(f"stage {name!r}: converting to {precision} failed: "
                                  f"{type(exc).__name__}: {exc}") from exc
            manifest.files[precision][name] = rel
        clock.lap(f"convert {precision}")
        if validate:
            _parity(job, manifest, precision, gate=False)
            clock.lap(f"parity {precision}")


def _measure_quality(job: _Job, manifest: Manifest, tmp: Path) -> None:
    """Step 6: quality figures on held-out crops through the runtime pipeline. The stage loop at the baked
    settings runs the fused ODE graphs (guided: ``ode_cfg`` too), never ``velocity``."""
    loop = ("codec_encode", "tokenizer", "token_embed", "mar_step", "codec_decode", "ode") + \
        (("ode_cfg",) if job.settings.guided else ())
    if job.heldout is None or any(s not in job.specs for s in loop):
        job.notes.append(f"quality figures not measured: they need the stages {', '.join(loop)}")
        return
    from .quality import measure_quality

    manifest.quality = measure_quality(tmp, job.net, job.heldout, job.settings, seed=0)


# ----------------------------------------------------------------------------- helpers

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


class _Clock:
    """Records seconds per export phase into the manifest."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings, self.t = timings, time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.timings[phase] = round(now - self.t, 2)
        self.t = now


def _runner(path: Path) -> Any:
    """feeds → outputs of one graph on a CPU ORT session."""
    session = ort_session(path)

    def run(feeds: Feeds) -> list[np.ndarray]:
        return list(session.run(None, feeds))

    return run


def _hash_files(manifest: Manifest, folder: Path) -> None:
    """Step 5: sha256 of every graph file and package."""
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
