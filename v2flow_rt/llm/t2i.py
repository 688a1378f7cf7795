"""Text to image end to end: prompt → LLM visual tokens → V2Flow decoder → pixels; and how to check that
the images follow their prompts.

``TextToImage.from_pretrained(lm, model, backend)`` pairs an expanded LM (``"default"``: the bundled
``assets/t2i``) with the V2Flow model it was trained on (``"default"``). ``backend="torch"`` runs the LM in
transformers and decodes with the PyTorch engine; ``backend="ort"`` runs the exported LLM graph in ONNX
Runtime and decodes with the ONNX Runtime pipeline (graphs exported into a cache folder on first use when
no export folder is given).

Conditioning statistic (``conditioning_accuracy``): an image's feature is its per-channel 8-bin colour
histogram (fractions of pixels) followed by its mean colour (RGB in [0, 1]) — 27 numbers; its distance to a
prompt is the mean L2 distance to the k = 5 nearest of that prompt's reference images; the predicted prompt
is the nearest one. The references are the prompt's training crops (``evaluate_conditioning`` scores against
them as the decoder renders them, and as they are). On fresh crops of the same photos this statistic finds
the right subject 96 % of the time (13 subjects); chance is 1 / (number of prompts).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ASSETS, WEIGHTS_NAME, resolve_model_path
from ..errors import LLMError
from ..manifest import MANIFEST_NAME as EXPORT_MANIFEST
from ..manifest import Manifest
from .generate import (
    GenerationSettings,
    OrtStep,
    PromptEncoder,
    StepFn,
    TorchStep,
    check_decoder,
    generate_visual_tokens,
)
from .vocab import VisualVocab, file_sha256

T2I_DEFAULT = ASSETS / "t2i"
HIST_BINS = 8
KNN = 5


def resolve_lm_path(path: str | os.PathLike[str]) -> Path:
    """``"default"`` names the bundled text-to-image LM; anything else is a folder."""
    return T2I_DEFAULT if str(path) == "default" else Path(path)


def cache_dir() -> Path:
    """Where derived artifacts (exported graphs) go: ``$V2FLOW_RT_CACHE`` or ``~/.cache/v2flow_rt``."""
    return Path(os.environ.get("V2FLOW_RT_CACHE") or Path.home() / ".cache" / "v2flow_rt")


# The decoder's ODE noise scale when it renders generated tokens, unless the caller gives one. A model's
# own default serves reconstruction (the bundled one uses 0: the smooth, most likely image, best PSNR);
# generation wants a sample of the fine detail the codes leave open, as the official sampler draws it.
GENERATION_DECODER_TEMPERATURE = 1.0


class TextToImage:
    """An expanded LM and a V2Flow decoder on one backend. Build with ``from_pretrained``.

    The decoder renders at ``GENERATION_DECODER_TEMPERATURE`` unless ``temperature=`` is passed."""

    def __init__(self, step: StepFn, encoder: PromptEncoder, vocab: VisualVocab, decoder: Any,
                 lm_dir: Path | None = None) -> None:
        self.step, self.encoder, self.vocab, self.decoder, self.lm_dir = step, encoder, vocab, decoder, lm_dir
        cfg = decoder.config
        check_decoder(vocab, cfg.num_tokens, cfg.codebook_size)

    @classmethod
    def from_pretrained(cls, lm: str | os.PathLike[str] = "default", model: str | os.PathLike[str] = "default",
                        backend: str = "torch", precision: str = "fp32", decoder_onnx: str | None = None,
                        threads: int = 0) -> "TextToImage":
        """Load the LM (``"default"``: bundled) and the V2Flow model (``"default"``: bundled).

        Args:
            model: a V2Flow model folder, or for ``ort`` also its export folder (``manifest.json``).
            backend: ``torch`` (transformers LM, PyTorch decoder) or ``ort`` (LLM graph and decoder graphs
                in ONNX Runtime; needs neither torch nor transformers once the graphs exist: the LM's in
                ``LM/onnx`` or the cache, the decoder's in ``decoder_onnx``, ``model`` or the cache).
            precision: LLM graph variant for ``ort`` (``fp32``, ``fp16``, ``int8``, ``int8-block``); the
                decoder runs fp32.
            decoder_onnx: a V2Flow export folder for ``ort`` (default: ``model`` if it is one, else an
                export made into the cache on first use, which needs torch).
        Raises:
            LLMError: the LM was trained on other V2Flow weights, N / K do not match the decoder, or an
                ONNX graph is missing where torch is not installed to make it.
        """
        from ..pipeline import V2FlowPipeline

        if backend not in ("torch", "ort"):
            raise LLMError(f"backend must be 'torch' or 'ort', got {backend!r}")
        lm_dir = resolve_lm_path(lm)
        vocab = VisualVocab.from_dir(lm_dir)
        model_dir = resolve_model_path(os.fspath(model))
        is_export = (model_dir / EXPORT_MANIFEST).is_file() and not (model_dir / WEIGHTS_NAME).is_file()
        if is_export and backend == "torch":
            raise LLMError(f"{str(model_dir)!r} is an export folder: the torch backend needs the model folder "
                           f"(config.json + {WEIGHTS_NAME}); use --backend ort with an export")
        if (model_dir / WEIGHTS_NAME).is_file():
            _check_made_for(vocab, lm_dir, model_dir)
        encoder = PromptEncoder(lm_dir)
        if backend == "torch":
            step: StepFn = TorchStep.from_pretrained(lm_dir)
            decoder = V2FlowPipeline.from_pretrained(model_dir, backend="torch", threads=threads or None)
            return cls(step, encoder, vocab, decoder, lm_dir)
        from .export import VARIANT_FILES

        graph = llm_onnx_dir(lm_dir, threads or 1, precision) / VARIANT_FILES[precision]
        step = OrtStep.from_file(graph, threads)
        export = Path(decoder_onnx) if decoder_onnx else model_dir if is_export else _decoder_export(model_dir)
        _check_made_for(vocab, lm_dir, export, Manifest.load(export, verify=False).tokenizer_sha256)
        decoder = V2FlowPipeline.from_pretrained(export, backend="ort", threads=threads or None)
        return cls(step, encoder, vocab, decoder, lm_dir)

    def tokens(self, prompts: str | Sequence[str], seed: int | None = 0,
               settings: GenerationSettings | None = None) -> np.ndarray:
        """Prompts → visual codes int64 [B, N]."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        settings = settings or GenerationSettings()
        uncond = self.encoder.unconditional() if settings.cfg_scale != 1.0 else None
        return generate_visual_tokens(self.step, self.encoder(prompts), self.vocab, settings, seed,
                                      uncond_ids=uncond)

    def render(self, codes: np.ndarray, seed: int | None = 0, **sampling: Any) -> np.ndarray:
        """Visual codes [B, N] → images uint8 [B, S, S, 3] through the V2Flow decoder."""
        return self.decoder.detokenize(codes, seed=seed, **decoder_sampling(sampling))

    def __call__(self, prompts: str | Sequence[str], seed: int | None = 0,
                 settings: GenerationSettings | None = None, **sampling: Any) -> np.ndarray:
        return self.render(self.tokens(prompts, seed, settings), seed, **sampling)


def decoder_sampling(sampling: dict[str, Any]) -> dict[str, Any]:
    """The decoder settings generation uses: ``sampling`` with the temperature defaulted."""
    if sampling.get("temperature") is None:
        return {**sampling, "temperature": GENERATION_DECODER_TEMPERATURE}
    return sampling


def _check_made_for(vocab: VisualVocab, lm_dir: Path, v2flow: Path, theirs: str | None = None) -> None:
    """LLMError unless the LM was trained on the visual tokens of ``v2flow``: a model folder, or an export
    whose manifest records ``theirs``, the tokenizer fingerprint (an export or LM without one is not
    checked)."""
    if theirs is None:
        same, theirs = vocab.made_for(v2flow)
    else:
        same = not (vocab.tokenizer_sha256 and theirs) or theirs == vocab.tokenizer_sha256
    if not same:
        raise LLMError(f"the LM {str(lm_dir)!r} was trained on the visual tokens of another V2Flow "
                       f"tokenizer ({(vocab.tokenizer_sha256 or vocab.v2flow_sha256)[:12]}…), but "
                       f"{str(v2flow)!r} has {theirs[:12]}…: its visual tokens would decode to noise")


def _torch_missing() -> str | None:
    """Why torch cannot be imported here, or None when it can (exports need it)."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def llm_onnx_dir(lm_dir: Path, threads: int = 1, precision: str = "fp32") -> Path:
    """The LM's export folder holding the ``precision`` graph: ``lm_dir/onnx`` if it has it, else a cache
    folder keyed by the weights' hash, exported on first use (which needs torch)."""
    from .export import MANIFEST_NAME, VARIANT_FILES, export_llm

    if precision not in VARIANT_FILES:
        raise LLMError(f"precision must be one of {sorted(VARIANT_FILES)}, got {precision!r}")
    name = VARIANT_FILES[precision]
    local = lm_dir / "onnx"
    if (local / MANIFEST_NAME).is_file() and (local / name).is_file():
        return local
    key = file_sha256(lm_dir / "model.safetensors")[:16] if (lm_dir / "model.safetensors").is_file() else "x"
    cached = cache_dir() / "llm-onnx" / key
    if not ((cached / MANIFEST_NAME).is_file() and (cached / name).is_file()):
        why = _torch_missing()
        if why:
            raise LLMError(f"the LM {str(lm_dir)!r} has no {precision} ONNX graph (in {local} or {cached}) and "
                           f"torch is not installed to export one ({why}): run `v2flow-rt export-llm --lm {lm_dir} "
                           f"--out {local}` where torch is, or install v2flow-rt[export,llm]")
        export_llm(lm_dir, cached, precisions=tuple(dict.fromkeys(("fp32", "int8", "int8-block", precision))),
                   threads=threads)
    return cached


def _decoder_export(model_dir: Path) -> Path:
    """A cached fp32 ONNX export of the V2Flow model (made on first use, which needs torch)."""
    out = cache_dir() / "v2flow-onnx" / file_sha256(model_dir / WEIGHTS_NAME)[:16]
    if not (out / EXPORT_MANIFEST).is_file():
        why = _torch_missing()
        if why:
            raise LLMError(f"no ONNX export of the V2Flow model {str(model_dir)!r} in {out}, and torch is not "
                           f"installed to make one ({why}): pass --decoder-onnx EXPORT_DIR (from `v2flow-rt export "
                           f"{model_dir} --out EXPORT_DIR` where torch is), or install v2flow-rt[export]")
        from ..export.folder import export_model
        export_model(model_dir, out, precisions=("fp32",), progress=False, quality=False)
    return out


# --------------------------------------------------------------------------------------------------
# Prompt conditioning (numpy)
# --------------------------------------------------------------------------------------------------

def image_features(images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] → float64 [B, 27]: per-channel 8-bin histograms (fractions), then mean RGB in [0, 1]."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[3] != 3 or x.dtype != np.uint8:
        raise LLMError(f"image_features expects uint8 [B, H, W, 3], got {x.dtype} {x.shape}")
    bins = (x.astype(np.int64) * HIST_BINS) // 256                              # (B, H, W, 3) in [0, 8)
    pixels = x.shape[1] * x.shape[2]
    hist = np.stack([np.stack([np.bincount(b[..., c].ravel(), minlength=HIST_BINS) for c in range(3)])
                     for b in bins]).reshape(len(x), -1) / pixels               # (B, 24)
    return np.concatenate([hist, x.reshape(len(x), -1, 3).mean(axis=1) / 255.0], axis=1)


def nearest_prompt(features: np.ndarray, references: Sequence[np.ndarray], k: int = KNN) -> np.ndarray:
    """features [M, F], one reference set [P_j, F] per prompt → index of the nearest prompt [M]
    (distance = mean of the k smallest L2 distances to the prompt's references)."""
    dists = []
    for ref in references:
        d = np.linalg.norm(features[:, None, :] - ref[None, :, :], axis=2)     # (M, P_j)
        kk = min(k, d.shape[1])
        dists.append(np.sort(d, axis=1)[:, :kk].mean(axis=1))
    return np.argmin(np.stack(dists, axis=1), axis=1)


def conditioning_accuracy(generated: dict[str, np.ndarray], references: dict[str, np.ndarray],
                          k: int = KNN) -> dict[str, Any]:
    """How often a generated image is nearest (``image_features``, k-NN mean) to its own prompt's crops.

    Args:
        generated: prompt (or subject) → its generated images uint8 [S, H, W, 3] (one per seed).
        references: the same keys → that prompt's training crops uint8 [P, H, W, 3].
    Returns:
        ``accuracy`` (fraction of (prompt, seed) pairs whose nearest prompt is their own), ``chance``,
        ``per_prompt`` accuracies and ``confusion`` (prompt → predicted prompts).
    """
    names = list(references)
    if set(generated) - set(names):
        raise LLMError(f"generated prompts {sorted(set(generated) - set(names))} have no reference crops")
    refs = [image_features(references[n]) for n in names]
    per_prompt, confusion, hits, total = {}, {}, 0, 0
    for name, images in generated.items():
        pred = nearest_prompt(image_features(images), refs, k)
        ok = pred == names.index(name)
        per_prompt[name] = float(ok.mean())
        confusion[name] = [names[i] for i in pred]
        hits, total = hits + int(ok.sum()), total + len(pred)
    return {"accuracy": hits / max(1, total), "chance": 1.0 / len(names), "pairs": total,
            "per_prompt": per_prompt, "confusion": confusion}


def evaluate_conditioning(t2i: TextToImage, seeds: Sequence[int] = (0, 1, 2, 3),
                          settings: GenerationSettings | None = None,
                          subjects: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] | None = None,
                          per_subject: int = 64, crop_seed: int | None = None,
                          **sampling: Any) -> dict[str, Any]:
    """Generate every caption of every subject with each seed and score it with ``conditioning_accuracy``.

    References are each subject's training crops: the first ``per_subject`` of the pool ``train_llm``
    tokenized (pool size, seed and scales from the LM's ``training.json``; else seed 0), taken two ways:

    - ``accuracy``: the crops as the decoder renders them (``decoder.reconstruct``: its own tokenizer,
      then detokenize, with the decoder settings of the generated images: ``decoder_sampling``). This
      compares like with like, so it measures whether the LLM wrote the right subject's tokens, not how
      faithfully this small decoder reproduces colours.
    - ``accuracy_vs_raw_crops``: the crops themselves; capped by the decoder's fidelity
      (``ceiling_vs_raw_crops``: fresh crops of the same photos, reconstructed, scored against them).

    Returns the ``conditioning_accuracy`` report (for the decoded references) with those figures (and
    ``per_prompt_vs_raw_crops``, ``confusion_vs_raw_crops``, ``ceiling_per_prompt_vs_raw_crops``) added,
    plus ``images`` (subject → uint8 [captions × seeds, S, S, 3], caption-major) and ``references``.
    """
    import json

    from ..data import from_model_range
    from .captions import SUBJECTS, subject_crops

    subjects = subjects or SUBJECTS
    record: dict[str, Any] = {}
    if t2i.lm_dir is not None and (t2i.lm_dir / "training.json").is_file():
        record = json.loads((t2i.lm_dir / "training.json").read_text(encoding="utf-8")).get("settings", {})
    pool = max(per_subject, int(record.get("crops_per_subject", per_subject)))
    crop_seed = int(record.get("seed", 0)) if crop_seed is None else crop_seed
    scales = tuple(record.get("crop_scales", (1.0, 0.5, 0.25)))
    size = t2i.decoder.config.img_size
    crops = {k: v[:per_subject] for k, v in subject_crops(subjects, size, pool, crop_seed, scales).items()}
    raw = {name: from_model_range(c) for name, c in crops.items()}
    sampling = decoder_sampling(sampling)       # references rendered the way the generated images are
    decoded = {name: t2i.decoder.reconstruct(c, seed=0, **sampling) for name, c in crops.items()}
    generated: dict[str, np.ndarray] = {}
    for name, (_, captions) in subjects.items():
        images = [t2i(list(captions), seed=seed, settings=settings, **sampling) for seed in seeds]   # seed-major
        generated[name] = np.stack(images, axis=1).reshape(-1, size, size, 3)                       # caption-major
    fresh = subject_crops(subjects, size, max(1, per_subject // 4), crop_seed + 12345, scales)
    fresh_decoded = {name: t2i.decoder.reconstruct(c, seed=0, **sampling) for name, c in fresh.items()}
    report = conditioning_accuracy(generated, decoded)
    vs_raw = conditioning_accuracy(generated, raw)
    ceiling_raw = conditioning_accuracy(fresh_decoded, raw)
    report.update({
        "accuracy_vs_raw_crops": vs_raw["accuracy"], "per_prompt_vs_raw_crops": vs_raw["per_prompt"],
        "confusion_vs_raw_crops": vs_raw["confusion"],
        "ceiling_vs_raw_crops": ceiling_raw["accuracy"], "ceiling_per_prompt_vs_raw_crops": ceiling_raw["per_prompt"],
        "ceiling_vs_decoded_crops": conditioning_accuracy(fresh_decoded, decoded)["accuracy"],
        "seeds": list(seeds), "captions": sum(len(c) for _, c in subjects.values()),
        "references_per_subject": per_subject, "images": generated, "references": decoded})
    return report
