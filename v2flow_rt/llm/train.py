"""Fine-tuning an expanded LM on (prompt, image) pairs: the text-to-image LLM stage.

Images are random crops of the built-in training photos (``data.TRAIN_PHOTOS``), tokenized once into a
pool per subject by the V2Flow tokenizer (``model.tokenize(codec.encode(crops))``); prompts are the
captions of ``captions.SUBJECTS``, a few paraphrases per subject. A training sequence is::

    <s> caption <boi> <v_c1> … <v_cN> <eoi>        (left padded, like generation)

and the loss is next-token cross-entropy on the N visual tokens and ``<eoi>`` only (the caption is
given, not learned), over the image vocabulary ``<v_0>`` … ``<eoi>`` (what constrained decoding draws
from). With probability ``prompt_drop`` the caption is dropped to the empty prompt, so the same model
also learns the unconditional distribution that classifier-free guidance contrasts against.

Resumable like ``reference.train``: ``train_state.pt`` (model, optimizer, step, RNG) is written
atomically every ``save_every`` steps; the result is ``final/``, a normal HF folder with ``v2flow.json``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, LLMError
from ..fileio import atomic_write, staged_folder
from ..reference.checkpoint import safe_torch_load
from ..reference.codecs import build_codec
from .captions import SUBJECTS, subject_crops
from .generate import PromptEncoder, left_pad, position_ids_from_mask
from .vocab import META_NAME, VisualVocab, expand_vocabulary

STATE_NAME = "train_state.pt"

@dataclass
class LLMTrainSettings:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    grad_clip: float = 1.0
    prompt_drop: float = 0.1            # probability a caption is replaced by the empty prompt
    crops_per_subject: int = 256        # size of each subject's tokenized crop pool
    crop_scales: tuple[float, ...] = (1.0, 0.5, 0.25)
    seed: int = 0
    max_minutes: float = 0.0            # stop (and save) after this wall time; 0 = no limit
    save_every: int = 250
    threads: int = 0                    # torch threads; 0 = torch's default


def lr_at(step: int, s: LLMTrainSettings) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = min(1.0, (step - s.warmup) / max(1, s.steps - s.warmup))
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def tokenize_images(v2flow: Any, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """float32 [n, 3, H, W] in [-1, 1] → V2Flow codes int64 [n, N] (deterministic tokenizer)."""
    codec = build_codec(v2flow.config)
    out = [v2flow.tokenize(codec.encode(torch.from_numpy(images[i:i + batch]))).numpy()
           for i in range(0, len(images), batch)]
    return np.concatenate(out).astype(np.int64)


def make_batch(prompt_ids: list[list[int]], codes: np.ndarray, vocab: VisualVocab) -> dict[str, torch.Tensor]:
    """Left-padded training batch; ``target`` marks positions whose next token is visual or ``<eoi>``."""
    seqs = [p + [vocab.boi_id] + [int(c) + vocab.offset for c in row] + [vocab.eoi_id]
            for p, row in zip(prompt_ids, codes)]
    ids, mask = left_pad(seqs, vocab.pad_id)                                  # (B, T)
    target = np.zeros_like(mask, dtype=bool)
    target[:, -(codes.shape[1] + 1):] = True                                  # N visual tokens + <eoi>
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "position_ids": torch.from_numpy(position_ids_from_mask(mask)), "target": torch.from_numpy(target)}


def sequence_loss(model: Any, batch: dict[str, torch.Tensor], vocab: VisualVocab) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the marked next tokens over the image vocabulary, and their greedy accuracy.

    The head is applied to the marked positions only and to the rows ``<v_0>`` … ``<eoi>`` only: generation
    never lets a text token win there, and it skips ~25 % of the head's work on a 1k-token text vocabulary.
    """
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              position_ids=batch["position_ids"], use_cache=False).last_hidden_state  # (B, T, d)
    target = batch["target"][:, 1:]
    h = hidden[:, :-1][target]                                                     # (M, d)
    lo, hi = vocab.offset, max(vocab.boi_id, vocab.eoi_id) + 1
    head = model.get_output_embeddings()
    bias = head.bias[lo:hi] if getattr(head, "bias", None) is not None else None
    logits = torch.nn.functional.linear(h, head.weight[lo:hi], bias)               # (M, K + 2)
    labels = batch["input_ids"][:, 1:][target] - lo                                # (M,)
    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    return loss, (logits.argmax(-1) == labels).float().mean().detach()


def train_llm(lm_dir: str | Path, v2flow_model: Any, out_dir: str | Path, settings: LLMTrainSettings,
              subjects: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] | None = None,
              resume: bool = True, progress: bool = True) -> Path:
    """Fine-tune an LM for text-to-image tokens; return ``out_dir/final`` (an expanded HF LM folder).

    Args:
        lm_dir: an expanded LM (with ``v2flow.json``), or a plain causal LM, which is first expanded into
            ``out_dir/expanded`` with ``v2flow_model``.
        v2flow_model: the V2Flow model (instance, folder or ``"default"``) whose tokenizer makes the targets.
        subjects: subject → (photos, captions); default ``SUBJECTS``.
    Raises:
        LLMError: the expanded LM was made from another V2Flow model, or its N / K do not fit it.
        CheckpointError: ``train_state.pt`` cannot be resumed (other settings or LM).
    """
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from .vocab import _load_v2flow

    subjects = subjects or SUBJECTS
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    v2f, sha = _load_v2flow(v2flow_model)
    lm_path = Path(lm_dir)
    if not (lm_path / META_NAME).is_file():
        expanded = out / "expanded"
        if not (expanded / META_NAME).is_file():   # a resumed run reuses its expansion
            expand_vocabulary(lm_path, v2f, expanded, seed=settings.seed)
        lm_path = expanded
    vocab = VisualVocab.from_dir(lm_path)
    same, theirs = vocab.made_for(v2f)
    if not same:
        raise LLMError(f"{str(lm_path)!r} was expanded with another V2Flow tokenizer "
                       f"({(vocab.tokenizer_sha256 or vocab.v2flow_sha256)[:12]}…), not the given model's "
                       f"({theirs[:12]}…): its visual tokens would mean other codes")
    if (vocab.num_tokens, vocab.codebook_size) != (v2f.config.num_tokens, v2f.config.codebook_size):
        raise LLMError(f"LM built for N={vocab.num_tokens}, K={vocab.codebook_size}; the V2Flow model has "
                       f"N={v2f.config.num_tokens}, K={v2f.config.codebook_size}")

    encoder = PromptEncoder(lm_path)
    names = list(subjects)
    captions = [encoder(list(subjects[n][1])) for n in names]
    empty = encoder.unconditional()
    crops = subject_crops(subjects, v2f.config.img_size, settings.crops_per_subject, settings.seed,
                          settings.crop_scales)
    pools = [tokenize_images(v2f, crops[n]) for n in names]                   # each (P, N)

    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_pretrained(lm_path, dtype=torch.float32).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(settings.seed)
    step = 0
    state_path = out / STATE_NAME
    # what a resumed run must share with the saved one (steps, time limit and threads may change)
    fixed = {k: v for k, v in _jsonable(asdict(settings)).items()
             if k not in ("steps", "max_minutes", "threads", "save_every")}
    fingerprint = {"settings": fixed, "lm": str(lm_path), "v2flow_sha256": sha}
    if resume and state_path.is_file():
        st = safe_torch_load(state_path)
        state_keys = ("fingerprint", "model", "optimizer", "rng", "step")
        if not isinstance(st, dict) or any(k not in st for k in state_keys):
            raise CheckpointError(f"cannot resume from {state_path}: not a training state written by this package "
                                  f"(expected a dict with {list(state_keys)}); use --no-resume or a new --out")
        if st.get("fingerprint") != fingerprint:
            raise CheckpointError(f"{state_path} was written for other settings or models; use a new output folder "
                                  "or --no-resume")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        rng.bit_generator.state = st["rng"]
        step = int(st["step"])

    def save_state() -> None:
        payload = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                   "rng": rng.bit_generator.state, "fingerprint": fingerprint}
        atomic_write(state_path, lambda p: torch.save(payload, p))

    start = time.time()
    log = (out / "train_log.jsonl").open("a")
    bar = tqdm(total=settings.steps, initial=step, disable=not progress, desc="train-llm", dynamic_ncols=True)
    while step < settings.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, settings)
        subj = rng.integers(0, len(names), settings.batch_size)
        prompts = [captions[s][rng.integers(0, len(captions[s]))] for s in subj]
        drop = rng.random(settings.batch_size) < settings.prompt_drop
        prompts = [empty if d else p for p, d in zip(prompts, drop)]
        codes = np.stack([pools[s][rng.integers(0, len(pools[s]))] for s in subj])          # (B, N)
        loss, acc = sequence_loss(model, make_batch(prompts, codes, vocab), vocab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        step += 1
        bar.update(1)
        time_up = bool(settings.max_minutes) and (time.time() - start) / 60 >= settings.max_minutes
        if step % 25 == 0 or step == 1 or step >= settings.steps or time_up:
            rec = {"step": step, "loss": float(loss.detach()), "token_acc": float(acc), "grad_norm": float(grad_norm),
                   "lr": opt.param_groups[0]["lr"], "minutes": (time.time() - start) / 60}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['token_acc']:.3f}")
        if step % settings.save_every == 0:
            save_state()
        if time_up:
            break
    bar.close()
    log.close()
    save_state()
    return _save_final(model.eval(), lm_path, out / "final", {
        "trained_steps": step, "minutes": round((time.time() - start) / 60, 2), "settings": _jsonable(asdict(settings)),
        "subjects": {n: {"photos": list(p), "captions": list(c)} for n, (p, c) in subjects.items()},
        "v2flow_sha256": sha})


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _save_final(model: Any, lm_path: Path, final: Path, record: dict[str, Any]) -> Path:
    """The trained weights + the expanded LM's tokenizer and v2flow.json + training.json, atomically."""

    with staged_folder(final) as tmp:   # swapped into place of final when the block succeeds
        model.save_pretrained(tmp)
        for f in lm_path.iterdir():
            if f.name.startswith("tokenizer") or f.name in (META_NAME, "special_tokens_map.json"):
                shutil.copy2(f, tmp / f.name)
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            f.chmod(0o644)
    return final
