"""What an exported folder holds: ``manifest.json`` with the config, the stage contract, file hashes, versions,
parity and quality figures. Numpy and json only (the runtime reads it without torch or onnx).

Layout of an export folder::

    manifest.json                   written last: its presence means every listed graph was validated
    {stage}.{precision}.onnx        one graph per stage and precision
    {stage}.{precision}.onnx.data   external weights: exported graphs over 256 MiB (and copies), converted over ~1.8 GB

``Manifest.load`` checks that every listed file exists and (``verify=True``) that its sha256 matches, so
a truncated copy or flipped bytes are reported by file name before any session is built.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import CONFIG_NAME, WEIGHTS_NAME, V2FlowConfig, resolve_model_path
from .errors import ArtifactError, ConfigError
from .fileio import atomic_write_text, current_umask, file_sha256  # noqa: F401  (re-exported)
from .stages import StageSpec, stage_specs

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8", "int8-qdq")


# ----------------------------------------------------------------------------- hashing

def checkpoint_sha256(path: str | os.PathLike[str]) -> str:
    """The identity of a checkpoint: sha256 of a file, or of ``model.safetensors`` in a model folder.

    ``"default"`` names the bundled model. Raises ArtifactError if there is nothing to hash.
    """
    p = resolve_model_path(path)
    if p.is_dir():
        p = p / WEIGHTS_NAME
    if not p.is_file():
        raise ArtifactError(f"checkpoint {p} does not exist (expected a model folder with {WEIGHTS_NAME} or a file)")
    return file_sha256(p)


# What decides an image's visual tokens and what each token stands for: the resampler, the LLM table it
# mixes and the codebook (weights), and the config fields that shape its input. The projector, masked
# transformer and velocity MLP are not in it: retraining only the decoder keeps an LM valid. A DC-AE
# codec's weights live in their own folder and are not covered.
_TOKENIZER_PREFIX = "downsampler."
_TOKENIZER_NAMES = ("llm_embed_tokens", "quantizer._codebook.embed")
_TOKENIZER_CONFIG = ("img_size", "codec", "codec_stride", "latent_channels", "latent_scale", "resampler_offset",
                     "resampler_hidden", "resampler_depth", "readout_depth", "codebook_size", "llm_dim",
                     "llm_vocab_size")


def tokenizer_sha256(v2flow_model: Any) -> str:
    """sha256 over a V2Flow model's tokenizer (see ``_TOKENIZER_NAMES``): a ``V2Flow`` instance, or a
    folder written by ``save_pretrained`` / ``"default"`` (read with numpy; the folder's path is
    resolved by ``config.resolve_model_path``). An export records it in its manifest (``tokenizer_sha256``)."""
    if isinstance(v2flow_model, (str, os.PathLike)):
        from safetensors.numpy import load_file

        folder = resolve_model_path(os.fspath(v2flow_model))
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        tensors = load_file(folder / WEIGHTS_NAME)
    else:
        config = v2flow_model.config.to_dict()
        tensors = {k: v.detach().cpu().numpy() for k, v in v2flow_model.state_dict().items() if _in_tokenizer(k)}
    h = hashlib.sha256(json.dumps({k: config.get(k) for k in _TOKENIZER_CONFIG}, sort_keys=True).encode())
    for name in sorted(filter(_in_tokenizer, tensors)):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _in_tokenizer(name: str) -> bool:
    return name.startswith(_TOKENIZER_PREFIX) or name in _TOKENIZER_NAMES


# ----------------------------------------------------------------------------- stage records

def record_stage(spec: StageSpec) -> dict[str, Any]:
    """A JSON-ready record of a stage spec (what the graph's I/O were exported as)."""
    def tensors(ts: Any) -> list[list[Any]]:
        return [[t.name, t.dtype, list(t.shape)] for t in ts]

    rec = {"inputs": tensors(spec.inputs), "outputs": tensors(spec.outputs),
           "dims": {k: list(v) for k, v in spec.dims.items()}, "attrs": dict(spec.attrs)}
    return json.loads(json.dumps(rec))  # normalise tuples and numpy scalars the way a reload sees them


# ----------------------------------------------------------------------------- manifest

# What each manifest field holds: (type, type of a dict's values or a list's items, how to say it).
_FIELD_TYPES: dict[str, tuple[type, Any, str]] = {
    "stages": (dict, dict, "an object of stage → recorded spec"),
    "files": (dict, (dict, str), "an object of precision → stage → file name"),
    "sha256": (dict, str, "an object of file name → hash"),
    "opset": (int, None, "an integer"),
    "source_checkpoint_sha256": (str, None, "a string"),
    "stage_options": (dict, None, "an object"),
    "source_checkpoint": (str, None, "a string"),
    "tokenizer_sha256": (str, None, "a string"),
    "versions": (dict, None, "an object"),
    "parity": (dict, dict, "an object of precision → stage → figures"),
    "quality": (dict, dict, "an object of precision → figures"),
    "precision_notes": (dict, dict, "an object of precision → stage → notes"),
    "constants": (dict, list, "an object of name → list of numbers"),
    "notes": (list, str, "a list of strings"),
    "packages": (dict, str, "an object of stage → file name"),
    "timings": (dict, None, "an object"),
    "created": (str, None, "a string"),
}


def _is(value: Any, kind: type, inner: Any) -> bool:
    if not isinstance(value, kind) or isinstance(value, bool):
        return False
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    if isinstance(inner, tuple):            # a dict of dicts of ``inner[1]``
        return all(_is(v, inner[0], inner[1]) for v in items)
    return inner is None or all(isinstance(v, inner) for v in items)


def _short(value: Any) -> str:
    text = json.dumps(value, allow_nan=True)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class Manifest:
    """The description of one export folder.

    Attributes:
        config: the model config the graphs were exported from.
        stages: stage name → recorded spec (``record_stage``): I/O names, dtypes, symbolic shapes, dim
            ranges, baked-in attrs (solver, steps, shift).
        stage_options: the ``stage_specs`` keyword arguments (max_batch, steps, ...) that rebuild them.
        files: precision → stage → file name relative to the folder.
        sha256: file name (graphs and their ``.onnx.data``) → hex sha256.
        opset: ONNX opset of the graphs.
        source_checkpoint_sha256: ``checkpoint_sha256`` of the exported checkpoint (or of its state dict).
        source_checkpoint: the checkpoint path at export time ("" for an in-memory model).
        tokenizer_sha256: ``tokenizer_sha256`` of the exported model: the fingerprint of the ids its
            tokenizer gives ("" in folders exported before it was recorded).
        versions: package, torch, onnx, onnxruntime, python versions at export.
        parity: precision → stage → {"random": {...}, "photo": {...}} max abs/rel errors vs PyTorch.
        quality: precision → {"token_agreement", "psnr", ...} on held-out photo crops.
        precision_notes: precision → stage → what was kept in fp32 or excluded from quantization, and why.
        constants: small host-side tensors the runtime needs (``fake_latent``, the unconditional vector).
        notes: free-form remarks (skipped stages and why).
        packages: stage → AOTInductor package (``{stage}.pt2``) of the one-call graphs, for C++ hosts.
        timings: seconds spent per export phase.
        created: ISO-8601 UTC time of the export.
    """

    config: V2FlowConfig
    stages: dict[str, dict[str, Any]]
    files: dict[str, dict[str, str]]
    sha256: dict[str, str]
    opset: int
    source_checkpoint_sha256: str
    stage_options: dict[str, Any] = field(default_factory=dict)
    source_checkpoint: str = ""
    tokenizer_sha256: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    parity: dict[str, dict[str, Any]] = field(default_factory=dict)
    quality: dict[str, dict[str, Any]] = field(default_factory=dict)
    precision_notes: dict[str, dict[str, Any]] = field(default_factory=dict)
    constants: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    packages: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    created: str = ""
    folder: Path | None = field(default=None, compare=False)

    # ------------------------------------------------------------------ queries
    @property
    def precisions(self) -> list[str]:
        """Precisions this folder holds graphs for, in export order."""
        return list(self.files)

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages)

    def path(self, stage: str, precision: str = "fp32") -> Path:
        """Absolute path of a stage's graph; ArtifactError naming what exists if it was not exported."""
        if self.folder is None:
            raise ArtifactError("this manifest was not loaded from or written to a folder")
        if precision not in self.files:
            raise ArtifactError(f"precision {precision!r} was not exported to {self.folder}; it holds "
                                f"{', '.join(self.files) or 'no precision'} "
                                f"(known precisions: {', '.join(PRECISIONS)})")
        per = self.files[precision]
        if stage not in per:
            raise ArtifactError(f"stage {stage!r} was not exported at {precision} to {self.folder}; "
                                f"exported stages: {', '.join(per) or 'none'}")
        return self.folder / per[stage]

    def package_path(self, stage: str) -> Path:
        """Absolute path of a one-call stage's AOTInductor package; ArtifactError if none was written."""
        if self.folder is None or stage not in self.packages:
            raise ArtifactError(f"no AOTInductor package of {stage!r} in {self.folder} (export with --aoti); "
                                f"packages: {', '.join(self.packages) or 'none'}")
        return self.folder / self.packages[stage]

    def spec(self, stage: str) -> StageSpec:
        """The stage's spec, rebuilt through ``stage_specs`` and checked against what was recorded.

        Raises ArtifactError if the stage was not exported, or if this package's stage contract now
        describes it differently from the graph on disk (re-export with this version).
        """
        if stage not in self.stages:
            raise ArtifactError(f"stage {stage!r} is not in this export; exported stages: {', '.join(self.stages)}")
        try:
            spec = stage_specs(self.config, **self.stage_options)[stage]
        except (KeyError, TypeError, ValueError) as exc:    # ConfigError / ShapeError are ValueErrors
            raise ArtifactError(f"cannot rebuild stage {stage!r} from the manifest's stage options "
                                f"{self.stage_options}: {exc}") from None
        if record_stage(spec) != self.stages[stage]:
            raise ArtifactError(f"stage {stage!r}: the graph was exported as {self.stages[stage]}, but this "
                                f"package's stage contract gives {record_stage(spec)}; re-export the model")
        return spec

    @property
    def fake_latent(self) -> np.ndarray:
        """The learned unconditional vector [D] float32 (host-side input of guided sampling)."""
        if "fake_latent" not in self.constants:
            raise ArtifactError("this manifest holds no fake_latent (needed for guided sampling); re-export")
        return np.asarray(self.constants["fake_latent"], dtype=np.float32)

    def check_source(self, checkpoint_sha256: str) -> None:
        """ArtifactError "manifest is from another checkpoint" unless the hashes agree."""
        if checkpoint_sha256 != self.source_checkpoint_sha256:
            where = f" ({self.source_checkpoint})" if self.source_checkpoint else ""
            raise ArtifactError(f"manifest is from another checkpoint: it was exported from sha256 "
                                f"{self.source_checkpoint_sha256[:16]}…{where}, the checkpoint given has "
                                f"{checkpoint_sha256[:16]}…; re-export")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION, "config": self.config.to_dict(), "stages": self.stages,
            "stage_options": self.stage_options, "files": self.files, "sha256": self.sha256, "opset": self.opset,
            "source_checkpoint_sha256": self.source_checkpoint_sha256, "source_checkpoint": self.source_checkpoint,
            "tokenizer_sha256": self.tokenizer_sha256,
            "versions": self.versions, "parity": self.parity, "quality": self.quality,
            "precision_notes": self.precision_notes, "constants": self.constants, "notes": self.notes,
            "packages": self.packages,
            "timings": self.timings, "created": self.created,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest") -> Manifest:
        if not isinstance(data, dict):
            raise ArtifactError(f"{where}: expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(f"{where}: manifest format version {version!r}, this package reads {FORMAT_VERSION}")
        required = ("config", "stages", "files", "sha256", "opset", "source_checkpoint_sha256")
        missing = [k for k in required if k not in data]
        if missing:
            raise ArtifactError(f"{where}: missing field(s) {missing}")
        try:
            config = V2FlowConfig.from_dict(data["config"])
        except ConfigError as exc:
            raise ArtifactError(f"{where}: bad config: {exc}") from None
        for key, (kind, inner, words) in _FIELD_TYPES.items():
            if key in data and not _is(data[key], kind, inner):
                raise ArtifactError(f"{where}: {key!r} must be {words}, got {_short(data[key])}")
        optional = [k for k in _FIELD_TYPES if k not in required and k in data]
        return cls(config=config, stages=data["stages"], files=data["files"], sha256=data["sha256"],
                   opset=data["opset"], source_checkpoint_sha256=data["source_checkpoint_sha256"],
                   **{k: data[k] for k in optional})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, allow_nan=True)

    def write(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``manifest.json`` atomically into ``folder`` (created if needed); return its path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / MANIFEST_NAME
        atomic_write_text(path, self.to_json())
        self.folder = folder
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike[str], verify: bool = True) -> Manifest:
        """Read ``folder/manifest.json`` and check every listed file (sha256 too when ``verify``).

        Raises ArtifactError naming the folder or file: folder or manifest missing, manifest not valid
        JSON, a listed graph missing, or a graph whose bytes do not hash to the recorded sha256
        (truncated or corrupted).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise ArtifactError(f"{folder} is a file, not an export folder" if folder.exists() else
                                f"export folder {folder} does not exist")
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise ArtifactError(f"{folder} has no {MANIFEST_NAME}: not an export folder, or an export that did "
                                f"not finish (the manifest is written last)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{path} is not valid JSON (corrupted?): {exc}") from None
        m = cls.from_dict(data, where=str(path))
        m.folder = folder
        listed = {rel for per in m.files.values() for rel in per.values()} | set(m.packages.values())
        unhashed = sorted(listed - set(m.sha256))
        if unhashed:
            raise ArtifactError(f"{path}: file(s) {unhashed} have no sha256 entry")
        root = folder.resolve()
        for rel, digest in m.sha256.items():
            target = (folder / rel).resolve()
            if Path(rel).is_absolute() or root not in target.parents:
                raise ArtifactError(f"{path}: file name {rel!r} points outside the export folder")
            if not target.is_file():
                raise ArtifactError(f"{folder / rel} is missing (listed in {MANIFEST_NAME})")
            if verify:
                got = file_sha256(target)
                if got != digest:
                    raise ArtifactError(f"{folder / rel} is corrupted or truncated: sha256 {got[:16]}… "
                                        f"({target.stat().st_size} bytes), the manifest expects {digest[:16]}…; "
                                        f"re-export or copy the folder again")
        return m
