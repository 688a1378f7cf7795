"""Vocabulary expansion: put V2Flow's visual codewords into a causal LM's vocabulary.

``expand_vocabulary(lm_dir, v2flow_model, out_dir)`` takes any Hugging Face causal-LM directory and a
V2Flow model, appends ``K`` tokens ``<v_0>`` … ``<v_{K-1}>`` (one per codeword, contiguous ids starting
at the old tokenizer length) plus ``<boi>``/``<eoi>``, initialises their embeddings and LM-head rows,
and writes a normal HF directory with a ``v2flow.json`` that records the id layout (``VisualVocab``).

Why the codewords can seed the input embeddings: V2Flow's cosine-VQ codebook lives in the LLM's
embedding space (the resampler mixes rows of that LLM's embedding table), so codeword k already points
where the LLM expects "tokens like this one". Only the scale is lost: the codebook is unit-norm (cosine
VQ discards magnitude) while an LM's embeddings have their own typical norm (≈0.23 for a 128-d table
initialised at std 0.02, ≈1 for LLaMA-2). The residual stream carries the raw embedding, so a token far
off that norm either drowns or vanishes next to the text tokens; the codewords are therefore rescaled to
the median row norm of the LM's table. When the codeword width differs from the LM's hidden size, the
codewords are mapped first: by the least-squares map from V2Flow's embedding table to the LM's when both
tables cover the same vocabulary (the resampler was built on a sibling LM sharing the tokenizer), else by a
seeded random semi-orthogonal matrix (which preserves angles between codewords as well as a linear map can).
``<boi>``/``<eoi>`` get seeded random directions at the same norm. Untied LM-head rows of the new tokens
point along their input embeddings at the head's median row norm, so at the start the LM scores visual
token k by how far its hidden state points along codeword k (what a tied-embedding LM does).

This module imports numpy only at load; torch and transformers are imported by ``expand_vocabulary``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LLMError
from ..fileio import file_sha256, staged_folder  # noqa: F401  (file_sha256 re-exported)
from ..manifest import tokenizer_sha256  # noqa: F401  (re-exported: LMs record it in v2flow.json)

META_NAME = "v2flow.json"
META_FORMAT = "v2flow-rt/visual-vocab"
VISUAL_TOKEN = "<v_{}>"
BOI_TOKEN = "<boi>"
EOI_TOKEN = "<eoi>"
PROJECTIONS = ("auto", "identity", "lstsq", "orthogonal")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


@dataclass(frozen=True)
class VisualVocab:
    """Where the visual tokens sit in an expanded LM's vocabulary (the content of ``v2flow.json``).

    Visual token ``<v_k>`` has id ``offset + k`` for k in [0, codebook_size); ``num_tokens`` is how many
    of them make one image (the V2Flow decoder's token count).
    """

    offset: int
    codebook_size: int
    boi_id: int
    eoi_id: int
    pad_id: int
    num_tokens: int
    vocab_size: int                 # rows of the expanded LM's embedding / logits
    max_positions: int              # the LM's max_position_embeddings (0 = unknown)
    v2flow_sha256: str = ""         # sha256 of the V2Flow model.safetensors it was made with (provenance)
    tokenizer_sha256: str = ""      # tokenizer_sha256() of that model: what a decoder must match
    image_size: int = 0
    projection: str = "identity"
    embedding_norm: float = 0.0
    source_lm: str = ""
    format: str = META_FORMAT
    version: int = 1

    def made_for(self, v2flow_model: Any) -> tuple[bool, str]:
        """Whether ``v2flow_model`` (a V2Flow instance or its folder) gives visual tokens this LM was
        made for, and the fingerprint compared. Only the tokenizer has to match (``tokenizer_sha256``), so
        a decoder retrained on the same codes keeps the LM; files written before that field existed
        fall back to the sha256 of the whole weights file."""
        if self.tokenizer_sha256:
            theirs = tokenizer_sha256(v2flow_model)
            return theirs == self.tokenizer_sha256, theirs
        if self.v2flow_sha256:
            theirs = weights_sha256(v2flow_model)
            return theirs == self.v2flow_sha256, theirs
        return True, ""

    @property
    def visual_ids(self) -> range:
        return range(self.offset, self.offset + self.codebook_size)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dir(cls, lm_dir: str | os.PathLike[str]) -> "VisualVocab":
        """Read ``v2flow.json`` of an expanded LM directory; LLMError if absent or inconsistent."""
        path = Path(lm_dir) / META_NAME
        if not path.is_file():
            raise LLMError(f"{str(lm_dir)!r} has no {META_NAME}: not an LM expanded with visual tokens "
                           "(run expand_vocabulary / `v2flow-rt train-llm` first)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            vocab = cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise LLMError(f"cannot read {str(path)!r}: {exc}") from exc
        if vocab.format != META_FORMAT:
            raise LLMError(f"{str(path)!r} has format {vocab.format!r}, expected {META_FORMAT!r}")
        end = vocab.offset + vocab.codebook_size
        if not (0 < vocab.offset and vocab.codebook_size > 0 and end <= vocab.vocab_size
                and {vocab.boi_id, vocab.eoi_id}.isdisjoint(vocab.visual_ids) and vocab.num_tokens > 0):
            raise LLMError(f"{str(path)!r} describes an inconsistent id layout: {asdict(vocab)}")
        return vocab


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------

def check_lm_dir(lm_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Check ``lm_dir`` looks like a HF causal-LM directory and return its config.json.

    Raises LLMError naming what is missing: the folder, ``config.json`` (or one without ``model_type``),
    the weights, or the tokenizer files.
    """
    path = Path(lm_dir)
    if not path.is_dir():
        raise LLMError(f"LM directory {str(path)!r} does not exist or is not a folder")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise LLMError(f"unknown LM directory layout in {str(path)!r}: no config.json (expected a Hugging "
                       "Face causal-LM folder: config.json, model.safetensors, tokenizer files)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LLMError(f"cannot read {str(config_path)!r}: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise LLMError(f"unknown LM directory layout in {str(path)!r}: config.json has no model_type")
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise LLMError(f"unknown LM directory layout in {str(path)!r}: no weights (expected one of "
                       f"{list(_WEIGHT_FILES)})")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise LLMError(f"unknown LM directory layout in {str(path)!r}: no tokenizer (expected one of "
                       f"{list(_TOKENIZER_FILES)})")
    return config


def v2flow_sha256(model: Any) -> str:
    """sha256 of a V2Flow model's weights as ``save_pretrained`` writes them (so it equals the file's)."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return hashlib.sha256(save(state, metadata={"format": "pt"})).hexdigest()


def weights_sha256(v2flow_model: Any) -> str:
    """sha256 of a V2Flow model's weights file: a folder / ``"default"``, or a ``V2Flow`` instance (as
    ``save_pretrained`` would write it)."""
    if isinstance(v2flow_model, (str, os.PathLike)):
        from ..config import WEIGHTS_NAME, resolve_model_path
        return file_sha256(resolve_model_path(os.fspath(v2flow_model)) / WEIGHTS_NAME)
    return v2flow_sha256(v2flow_model)


# --------------------------------------------------------------------------------------------------
# Projection of codewords into the LM's embedding space (numpy)
# --------------------------------------------------------------------------------------------------

def codeword_embeddings(codebook: np.ndarray, lm_table: np.ndarray, v2flow_table: np.ndarray | None,
                        projection: str = "auto", seed: int = 0) -> tuple[np.ndarray, str, float]:
    """Codewords [K, d_c] → input embeddings [K, d_lm] at the LM's median embedding norm.

    Args:
        codebook: the V2Flow codebook (unit-norm rows).
        lm_table: the LM's input-embedding table [V, d_lm].
        v2flow_table: the table V2Flow's resampler mixes [V', d_c] (for ``lstsq``), or None.
        projection: ``identity`` (needs d_c == d_lm), ``lstsq`` (needs V' == V), ``orthogonal``, or
            ``auto`` (identity when the widths agree, lstsq when the vocabularies agree, else orthogonal).
    Returns:
        (embeddings float32 [K, d_lm], the projection used, the target norm).
    """
    if codebook.ndim != 2 or lm_table.ndim != 2 or codebook.shape[0] == 0 or codebook.shape[1] == 0:
        raise LLMError(f"codebook must be [K, d] and the LM table [V, d_lm], got {list(codebook.shape)} "
                       f"and {list(lm_table.shape)}")
    if not np.isfinite(codebook).all():
        raise LLMError("the V2Flow codebook holds non-finite values")
    d_c, d_lm = codebook.shape[1], lm_table.shape[1]
    if projection not in PROJECTIONS:
        raise LLMError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if projection == "auto":
        if d_c == d_lm:
            projection = "identity"
        elif v2flow_table is not None and v2flow_table.shape[0] == lm_table.shape[0]:
            projection = "lstsq"
        else:
            projection = "orthogonal"
    c = codebook.astype(np.float64)
    if projection == "identity":
        if d_c != d_lm:
            raise LLMError(f"codeword dim {d_c} differs from the LM hidden size {d_lm}: identity projection "
                           "impossible (use projection='lstsq' or 'orthogonal')")
        mapped = c
    elif projection == "lstsq":
        if v2flow_table is None or v2flow_table.shape[0] != lm_table.shape[0] or v2flow_table.shape[1] != d_c:
            got = None if v2flow_table is None else list(v2flow_table.shape)
            raise LLMError(f"lstsq projection needs V2Flow's embedding table [V, {d_c}] over the LM's vocabulary "
                           f"(V = {lm_table.shape[0]}), got {got}")
        # min_P ||T_v2flow P − T_lm||: the linear map that best carries V2Flow's table onto the LM's.
        proj, *_ = np.linalg.lstsq(v2flow_table.astype(np.float64), lm_table.astype(np.float64), rcond=None)
        mapped = c @ proj
    else:
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.standard_normal((max(d_c, d_lm), min(d_c, d_lm))))
        mapped = c @ (q if d_c >= d_lm else q.T)                             # (K, d_lm)
    norms = np.linalg.norm(mapped, axis=1, keepdims=True)
    if (norms < 1e-12).any():
        raise LLMError(f"{int((norms < 1e-12).sum())} codeword(s) map to zero under the {projection} projection")
    target = float(np.median(np.linalg.norm(lm_table.astype(np.float64), axis=1)))
    return (mapped / norms * target).astype(np.float32), projection, target


# --------------------------------------------------------------------------------------------------
# Expansion
# --------------------------------------------------------------------------------------------------

def _load_v2flow(v2flow_model: Any) -> tuple[Any, str]:
    """A V2Flow instance or a folder / "default" → (model, sha256 of its weights)."""
    if isinstance(v2flow_model, (str, os.PathLike)):
        from ..reference.checkpoint import from_pretrained
        return from_pretrained(os.fspath(v2flow_model)), weights_sha256(v2flow_model)
    if not hasattr(v2flow_model, "quantizer") or not hasattr(v2flow_model, "config"):
        raise LLMError(f"expected a V2Flow model or its folder, got {type(v2flow_model).__name__}")
    return v2flow_model, weights_sha256(v2flow_model)


def expand_vocabulary(lm_dir: str | os.PathLike[str], v2flow_model: Any, out_dir: str | os.PathLike[str], *,
                      projection: str = "auto", seed: int = 0) -> Path:
    """Add V2Flow's visual tokens to a causal LM and save the result as a normal HF directory.

    Args:
        lm_dir: a Hugging Face causal-LM folder (config.json, weights, tokenizer files).
        v2flow_model: a ``V2Flow`` instance, or a folder written by ``save_pretrained`` (``"default"``).
        out_dir: where to write the expanded LM (replaced atomically).
        projection: how codewords reach the LM's width (see ``codeword_embeddings``).
        seed: seed of the random parts (boi/eoi rows, orthogonal projection).
    Returns:
        ``Path(out_dir)``: model + tokenizer + ``v2flow.json`` (a ``VisualVocab``).
    Raises:
        LLMError: an unknown directory layout or a model transformers cannot load as a causal LM, a
            vocabulary already expanded, or codeword/LM dimensions that cannot be reconciled.
    """
    lm_path = Path(lm_dir)
    config = check_lm_dir(lm_path)
    if (lm_path / META_NAME).exists():
        raise LLMError(f"vocabulary of {str(lm_path)!r} is already expanded (it has {META_NAME}); "
                       "expand the original LM instead")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(lm_path)
    except (OSError, ValueError, KeyError) as exc:
        raise LLMError(f"unknown LM directory layout in {str(lm_path)!r}: cannot load its tokenizer: {exc}") from exc
    existing = tokenizer.get_vocab()
    if BOI_TOKEN in existing or VISUAL_TOKEN.format(0) in existing:
        raise LLMError(f"vocabulary of {str(lm_path)!r} is already expanded: its tokenizer has "
                       f"{BOI_TOKEN!r} / {VISUAL_TOKEN.format(0)!r}")
    try:
        lm: Any = AutoModelForCausalLM.from_pretrained(lm_path, dtype="auto")
    except (OSError, ValueError, KeyError) as exc:
        raise LLMError(f"unknown LM directory layout in {str(lm_path)!r}: transformers cannot load it as a "
                       f"causal LM ({config.get('model_type')!r}): {exc}") from exc
    v2f, sha = _load_v2flow(v2flow_model)

    in_emb = lm.get_input_embeddings()
    lm_table = in_emb.weight.detach().float().cpu().numpy()                  # (V, d_lm)
    old_vocab, offset = lm_table.shape[0], len(tokenizer)
    if offset > old_vocab:
        raise LLMError(f"tokenizer of {str(lm_path)!r} has {offset} tokens but the embedding only {old_vocab} rows")
    codebook = v2f.quantizer.codebook.detach().float().cpu().numpy()        # (K, d_c)
    v2f_table = v2f.llm_embed_tokens.detach().float().cpu().numpy()          # (V', d_c)
    visual, used, norm = codeword_embeddings(codebook, lm_table, v2f_table, projection, seed)
    k = visual.shape[0]

    added = tokenizer.add_tokens([VISUAL_TOKEN.format(i) for i in range(k)] + [BOI_TOKEN, EOI_TOKEN],
                                 special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids([VISUAL_TOKEN.format(0), VISUAL_TOKEN.format(k - 1), BOI_TOKEN, EOI_TOKEN])
    if added != k + 2 or ids != [offset, offset + k - 1, offset + k, offset + k + 1]:
        raise LLMError(f"the tokenizer did not give the {k + 2} new tokens contiguous ids from {offset} "
                       f"(added {added}, ids {ids})")
    new_vocab = max(old_vocab, offset + k + 2)
    lm.resize_token_embeddings(new_vocab, mean_resizing=False)

    rng = np.random.default_rng(seed)
    special = rng.standard_normal((2, lm_table.shape[1]))
    special = special / np.linalg.norm(special, axis=1, keepdims=True)       # (2, d_lm) random directions
    with torch.no_grad():
        weight = lm.get_input_embeddings().weight
        rows = np.concatenate([visual, special * norm]).astype(np.float32)
        weight[offset:offset + k + 2] = torch.from_numpy(rows).to(weight.dtype)
        head = lm.get_output_embeddings()
        if head is not None and head.weight is not weight:
            # Codeword directions at the head's median row norm: at start the LM scores visual token k
            # by how much its hidden state points along codeword k, as a tied-embedding LM would.
            head_norm = float(np.median(np.linalg.norm(head.weight[:old_vocab].float().cpu().numpy(), axis=1)))
            unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
            head.weight[offset:offset + k + 2] = torch.from_numpy(unit * head_norm).to(head.weight.dtype)
            if getattr(head, "bias", None) is not None:
                head.bias[offset:offset + k + 2] = head.bias[:old_vocab].mean()

    pad_id = tokenizer.pad_token_id
    if pad_id is None:  # LLaMA-2 has no pad token; left padding only needs an id the mask hides
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    text_config = lm.config.get_text_config()
    meta = VisualVocab(
        offset=offset, codebook_size=k, boi_id=offset + k, eoi_id=offset + k + 1, pad_id=int(pad_id),
        num_tokens=v2f.config.num_tokens, vocab_size=new_vocab,
        max_positions=int(getattr(text_config, "max_position_embeddings", 0) or 0), v2flow_sha256=sha,
        tokenizer_sha256=tokenizer_sha256(v2f),
        image_size=v2f.config.img_size, projection=used, embedding_norm=norm, source_lm=str(lm_path))

    out = Path(out_dir)
    with staged_folder(out) as tmp:   # swapped into place of out when the block succeeds
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / META_NAME).write_text(meta.to_json(), encoding="utf-8")
    return out

