"""The one LLM generation loop for visual tokens (numpy) and its two backends (transformers, ONNX Runtime).

The loop is written once, like ``sampling.sample_tokens``: a backend only provides a step callable

    step(input_ids [B,T] int64, attention_mask [B,P+T] int64, position_ids [B,T] int64, past)
        -> (logits [B, V] float32 at the last position, present)

where ``past`` is ``None`` on the prefill and otherwise whatever the previous call returned (the loop
never looks inside). A prompt becomes ``[prompt tokens] <boi>``, then exactly N visual tokens are drawn,
each from the logits restricted to the visual vocabulary, then ``<eoi>`` closes the image. Batches are
LEFT padded (pads masked out, position ids counting real tokens only), so every row's next token sits in
the last column. Classifier-free guidance runs the unconditional prompts as extra rows of the same batch
and mixes ``uncond + s·(cond − uncond)`` on the visual logits.

All randomness is one seeded ``numpy.random.Generator`` drawing one uniform per row per token, and the
host turns logits into a choice in float64; so two backends whose logits agree to ~1e-6 choose the same
tokens, greedy or sampled. Module load imports numpy only; torch / onnxruntime / tokenizers are
imported by the backend that needs them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LLMError
from .vocab import VisualVocab

StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray, Any], tuple[np.ndarray, Any]]


@dataclass(frozen=True)
class GenerationSettings:
    """How to choose visual tokens. ``temperature=0`` is greedy (top-k/top-p then ignored)."""

    temperature: float = 1.0
    top_k: int = 0              # keep the k most likely visual tokens (0 = all)
    top_p: float = 1.0          # nucleus: the smallest set whose probability reaches top_p
    cfg_scale: float = 1.0      # classifier-free guidance on the logits (1 = off)

    def check(self) -> "GenerationSettings":
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise LLMError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise LLMError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LLMError(f"top_p must be in (0, 1], got {self.top_p}")
        if not np.isfinite(self.cfg_scale):
            raise LLMError(f"cfg_scale must be finite, got {self.cfg_scale}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# --------------------------------------------------------------------------------------------------
# Host-side helpers (numpy)
# --------------------------------------------------------------------------------------------------

def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists → (ids [B, T] int64, attention mask [B, T] int64), padded on the left."""
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq):] = seq
            mask[row, width - len(seq):] = 1
    return ids, mask


def position_ids_from_mask(mask: np.ndarray) -> np.ndarray:
    """Positions that count real tokens only: [0 0 1 1 1] → [0 0 0 1 2] (pads get 0, masked anyway)."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)


def choose_tokens(logits: np.ndarray, settings: GenerationSettings, rng: np.random.Generator) -> np.ndarray:
    """logits [B, K] → chosen indices [B] (greedy, or temperature → top-k → top-p → inverse-CDF draw).

    Computed in float64 from one uniform per row, so logits that agree to ~1e-6 give the same choice
    unless a uniform lands within that distance of a cumulative-probability boundary.
    """
    x = np.asarray(logits, dtype=np.float64)
    if settings.greedy:
        return x.argmax(axis=1).astype(np.int64)
    x = x / settings.temperature
    if 0 < settings.top_k < x.shape[1]:
        kth = np.partition(x, -settings.top_k, axis=1)[:, -settings.top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    if settings.top_p < 1:
        order = np.argsort(-p, axis=1, kind="stable")
        sorted_p = np.take_along_axis(p, order, axis=1)
        before = np.cumsum(sorted_p, axis=1) - sorted_p          # mass of the more likely tokens
        keep_sorted = before < settings.top_p                     # always keeps the most likely token
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=1)
        p = np.where(keep, p, 0.0)
    cdf = np.cumsum(p, axis=1)
    u = rng.random(x.shape[0]) * cdf[:, -1]
    picks = (cdf <= u[:, None]).sum(axis=1)
    return np.minimum(picks, x.shape[1] - 1).astype(np.int64)


def check_decoder(vocab: VisualVocab, num_tokens: int, codebook_size: int | None = None) -> None:
    """LLMError unless the LM's visual vocabulary fits a decoder of ``num_tokens`` tokens / K codes."""
    if num_tokens != vocab.num_tokens:
        raise LLMError(f"the decoder takes {num_tokens} visual tokens per image but the LM was built for "
                       f"N = {vocab.num_tokens} (v2flow.json num_tokens); use the V2Flow model it was "
                       "expanded with")
    if codebook_size is not None and codebook_size != vocab.codebook_size:
        raise LLMError(f"the decoder's codebook has {codebook_size} codes but the LM has "
                       f"{vocab.codebook_size} visual tokens")


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------

def generate_visual_tokens(step: StepFn, prompt_ids: Sequence[Sequence[int]], vocab: VisualVocab,
                           settings: GenerationSettings | None = None, seed: int | None = 0,
                           num_tokens: int | None = None,
                           uncond_ids: Sequence[int] | None = None) -> np.ndarray:
    """Generate one image's visual tokens per prompt.

    Args:
        step: the backend step (see module docstring).
        prompt_ids: B token lists (tokenized prompts, with the tokenizer's BOS; ``<boi>`` is appended).
        vocab: the LM's visual-token layout.
        settings: sampling settings (default: temperature 1, no truncation, no guidance).
        seed: seed of the numpy generator (None: fresh entropy).
        num_tokens: visual tokens to draw; must equal ``vocab.num_tokens`` (the decoder's count).
        uncond_ids: the unconditional prompt for guidance (the tokenized empty prompt); required when
            ``settings.cfg_scale != 1``.
    Returns:
        codes int64 [B, N] in [0, K): visual token ``<v_k>`` is code k.
    Raises:
        LLMError: no prompts, N ≠ the decoder's token count, a prompt too long for the LM's positions,
            guidance without an unconditional prompt, or logits of the wrong width.
    """
    settings = (settings or GenerationSettings()).check()
    n = vocab.num_tokens if num_tokens is None else num_tokens
    check_decoder(vocab, n)
    if len(prompt_ids) == 0:
        raise LLMError("no prompts given")
    guided = settings.cfg_scale != 1.0
    if guided and uncond_ids is None:
        raise LLMError("cfg_scale != 1 needs the unconditional prompt (uncond_ids, the empty prompt tokenized)")
    rows = [list(p) + [vocab.boi_id] for p in prompt_ids]
    if guided:
        rows += [list(uncond_ids or []) + [vocab.boi_id]] * len(prompt_ids)
    longest = max(len(r) for r in rows)
    needed = longest + n + 1                                  # … <boi> N visual tokens <eoi>
    if vocab.max_positions and needed > vocab.max_positions:
        raise LLMError(f"prompt too long: {longest - 1} tokens + <boi> + {n} visual tokens + <eoi> need "
                       f"{needed} positions, the LM has max_position_embeddings {vocab.max_positions}; "
                       f"shorten the prompt to at most {vocab.max_positions - n - 2} tokens")

    bsz = len(prompt_ids)
    rng = np.random.default_rng(seed)
    lo, hi = vocab.offset, vocab.offset + vocab.codebook_size
    ids, mask = left_pad(rows, vocab.pad_id)                                 # (R, T0)
    pos = position_ids_from_mask(mask)
    codes = np.zeros((bsz, n), dtype=np.int64)
    past = None
    for i in range(n):
        logits, past = step(ids, mask, pos, past)                            # (R, V)
        if logits.ndim != 2 or logits.shape[0] != len(rows) or logits.shape[1] < hi:
            raise LLMError(f"step returned logits {list(logits.shape)}, expected [{len(rows)}, >= {hi}]")
        visual = logits[:, lo:hi]                                            # (R, K)
        if guided:
            cond, uncond = visual[:bsz].astype(np.float64), visual[bsz:].astype(np.float64)
            visual = uncond + settings.cfg_scale * (cond - uncond)
        codes[:, i] = choose_tokens(visual, settings, rng)
        if i == n - 1:
            break                                                            # <eoi> needs no forward pass
        nxt = codes[:, i] + lo
        ids = np.concatenate([nxt, nxt])[:, None] if guided else nxt[:, None]       # (R, 1)
        pos = pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)
    return codes


def full_sequences(prompt_ids: Sequence[Sequence[int]], codes: np.ndarray, vocab: VisualVocab) -> list[list[int]]:
    """``prompt <boi> <v_…>×N <eoi>`` token lists (what the LM has read and written)."""
    return [list(p) + [vocab.boi_id] + [int(c) + vocab.offset for c in row] + [vocab.eoi_id]
            for p, row in zip(prompt_ids, codes)]


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------

class PromptEncoder:
    """Tokenizes prompts with the LM's ``tokenizer.json`` through ``tokenizers`` (no transformers needed)."""

    def __init__(self, lm_dir: str | os.PathLike[str]) -> None:
        path = Path(lm_dir) / "tokenizer.json"
        if not path.is_file():
            raise LLMError(f"{str(lm_dir)!r} has no tokenizer.json (a fast tokenizer is needed for generation)")
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise LLMError(f"prompts are tokenized with the `tokenizers` package, which does not import here "
                           f"({exc}): pip install 'v2flow-rt[llm-ort]'") from exc
        self.tokenizer = Tokenizer.from_file(str(path))

    def __call__(self, prompts: Sequence[str]) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        return [enc.ids for enc in self.tokenizer.encode_batch(list(prompts))]

    def unconditional(self) -> list[int]:
        """The empty prompt: what guidance contrasts against (and what training drops prompts to)."""
        return self([""])[0]


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------

class TorchStep:
    """A transformers causal LM as a step callable; ``past`` is its ``DynamicCache`` (kept in torch)."""

    def __init__(self, model: Any) -> None:
        import inspect

        self.model = model.eval()
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"   # transformers ≥5.2 vs older

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                 past: Any) -> tuple[np.ndarray, Any]:
        import torch
        from transformers import DynamicCache

        if past is None:
            past = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                             position_ids=torch.from_numpy(position_ids), use_cache=True, logits_to_keep=1,
                             **{self.cache_arg: past})
        present = out.cache if hasattr(out, "cache") else out.past_key_values
        return out.logits[:, -1].float().numpy(), present

    @classmethod
    def from_pretrained(cls, lm_dir: str | os.PathLike[str]) -> "TorchStep":
        import torch
        from transformers import AutoModelForCausalLM

        return cls(AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32))


class OrtStep:
    """An exported LLM graph (``llm.export`` I/O names) in ONNX Runtime; ``past`` is a list of numpy arrays."""

    def __init__(self, session: Any) -> None:
        self.session = session
        inputs = session.get_inputs()
        self.past_names = [i.name for i in inputs if i.name.startswith("past_key_values.")]
        self.out_names = [o.name for o in session.get_outputs()]
        if self.out_names[0] != "logits" or len(self.out_names) != 1 + len(self.past_names):
            raise LLMError(f"LLM graph outputs {self.out_names[:3]}…: expected logits + one present per past input")
        shape = next(i.shape for i in inputs if i.name == self.past_names[0])        # [batch, heads, past, dim]
        self.heads, self.head_dim = int(shape[1]), int(shape[3])
        self.past_dtype = np.float16 if "float16" in next(
            i.type for i in inputs if i.name == self.past_names[0]) else np.float32

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                 past: Any) -> tuple[np.ndarray, Any]:
        if past is None:
            empty = np.zeros((input_ids.shape[0], self.heads, 0, self.head_dim), dtype=self.past_dtype)
            past = [empty] * len(self.past_names)
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feeds.update(zip(self.past_names, past))
        outs = self.session.run(self.out_names, feeds)
        return np.asarray(outs[0][:, -1], dtype=np.float32), outs[1:]

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], threads: int = 0) -> "OrtStep":
        import onnxruntime as ort

        if not Path(path).is_file():
            raise LLMError(f"LLM graph {str(path)!r} does not exist (export it with llm.export.export_llm)")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        return cls(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
