"""The LLM vocabulary embedding table V2Flow's codebook lives in, and a tiny bundled base LM.

``load_embedding_table`` reads the input-embedding matrix [V, d] of a causal LM without building the
model: from a Hugging Face directory (single or sharded safetensors, or ``pytorch_model.bin``), from a
single ``.safetensors`` file, or from the ``.pt`` tensor the official V2Flow ``llm_codebook_path``
points at. Safetensors are read with numpy only; torch is imported lazily, for pickles alone.

``create_base_lm`` writes a small seeded ``LlamaForCausalLM`` with a byte-level BPE tokenizer, so tests
and the bundled default model have a real LM to run offline (``v2flow_rt/assets/base_lm``).
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, LLMError
from ..fileio import staged_folder

# Input-embedding names of the common causal-LM families, tried in this order.
EMBEDDING_TENSOR_NAMES = (
    "model.embed_tokens.weight",          # LLaMA, Mistral, Qwen
    "transformer.wte.weight",             # GPT-2
    "model.decoder.embed_tokens.weight",  # OPT
    "gpt_neox.embed_in.weight",           # GPT-NeoX, Pythia
    "embed_tokens.weight",                # a bare decoder saved without the causal-LM wrapper
)
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3 of the bundled tokenizer
_FLOAT_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


# --------------------------------------------------------------------------------------------------
# Reading the embedding table
# --------------------------------------------------------------------------------------------------

def load_embedding_table(path: str | os.PathLike[str]) -> np.ndarray:
    """Read the input-embedding matrix of a causal LM as float32.

    Args:
        path: a Hugging Face causal-LM directory (``config.json`` plus ``model.safetensors``, a
            sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``), a ``.safetensors``
            file holding the table, or a ``.pt``/``.pth`` file holding one tensor.
    Returns:
        float32 array [V, d] (bf16 and fp16 weights are widened exactly).
    Raises:
        LLMError: the path is missing, a directory lacks ``config.json`` or weights, no embedding
            tensor is found (the message lists the names seen), or its shape disagrees with the config.
        CheckpointError: a weight file is unreadable, corrupted, of a non-float dtype, or a pickle
            that would execute code.
    """
    path = Path(path)
    if path.is_dir():
        return _load_from_hf_dir(path)
    if not path.exists():
        raise LLMError(f"LM path {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        names = list(_read_safetensors_header(path))
        name = _pick_embedding_name(names, expected=None, shapes=_safetensors_shapes([path]), where=path)
        return _read_safetensors_tensor(path, name)
    if path.suffix in _PICKLE_SUFFIXES:
        return _table_from_pickle(path)
    raise LLMError(f"{str(path)!r} is neither an LM directory nor a .safetensors/.pt/.pth/.bin file")


def _load_from_hf_dir(model_dir: Path) -> np.ndarray:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise LLMError(f"LM directory {str(model_dir)!r} has no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LLMError(f"cannot read {str(config_path)!r}: {exc}") from exc
    expected = _expected_shape(config, config_path)

    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file() or index.is_file():
        files = _shard_map(index, model_dir) if not single.is_file() else None
        paths = sorted(set(files.values())) if files else [single]
        shapes = _safetensors_shapes(paths)
        name = _pick_embedding_name(list(shapes), expected, shapes, where=model_dir)
        table = _read_safetensors_tensor(files[name] if files else single, name)
    else:
        state = _load_pickled_state(model_dir)
        shapes = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
        name = _pick_embedding_name(list(state), expected, shapes, where=model_dir)
        table = _tensor_to_numpy(state[name])

    if table.shape != expected:
        raise LLMError(f"embedding tensor {name!r} in {str(model_dir)!r} has shape {list(table.shape)}, "
                       f"config.json says [vocab_size, hidden_size] = {list(expected)}")
    return table


def _expected_shape(config: dict[str, Any], config_path: Path) -> tuple[int, int]:
    """[vocab_size, embedding width] from a config.json (multimodal configs nest it in text_config)."""
    if "vocab_size" not in config and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    # OPT-350m embeds at word_embed_proj_dim and projects up; GPT-2 calls the width n_embd.
    width = next((config[k] for k in ("word_embed_proj_dim", "hidden_size", "n_embd", "d_model")
                  if isinstance(config.get(k), int)), None)
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int) or width is None:
        raise LLMError(f"{str(config_path)!r} lacks an integer vocab_size and hidden_size "
                       f"(found vocab_size={vocab!r}, hidden_size={config.get('hidden_size')!r})")
    return vocab, width


def _pick_embedding_name(names: list[str], expected: tuple[int, int] | None,
                         shapes: dict[str, tuple[int, ...]], where: Path) -> str:
    """The known embedding name present, else the unique 2-D tensor of the expected shape."""
    for name in EMBEDDING_TENSOR_NAMES:
        if name in names:
            return name
    two_d = [n for n in names if len(shapes.get(n, ())) == 2]
    matching = [n for n in two_d if expected is None or shapes[n] == expected]
    if len(matching) == 1:
        return matching[0]
    want = (f"a 2-D tensor of shape {list(expected)}" if expected is not None
            else "a single 2-D tensor")
    found = ", ".join(f"{n} {list(shapes.get(n, ()))}" for n in sorted(names)) or "none"
    raise LLMError(f"no input-embedding tensor in {str(where)!r}: tried {list(EMBEDDING_TENSOR_NAMES)} "
                   f"and {want} ({len(matching)} candidates); tensors seen: {found}")


# --- safetensors, numpy only ---

def _read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {dtype, shape, data_offsets}, from the 8-byte length + JSON header."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > size - 8:
                raise ValueError(f"header length {header_len} exceeds the file size {size}")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"cannot read safetensors file {str(path)!r}: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"safetensors file {str(path)!r} has a header that is not a JSON object")
    header.pop("__metadata__", None)
    return header


def _safetensors_shapes(paths: list[Path]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for p in paths:
        for name, info in _read_safetensors_header(p).items():
            shapes[name] = tuple(info.get("shape", ()))
    return shapes


def _shard_map(index_path: Path, model_dir: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from model.safetensors.index.json."""
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        files = {name: model_dir / shard for name, shard in weight_map.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"cannot read shard index {str(index_path)!r}: {exc}") from exc
    for shard in sorted(set(files.values())):
        if not shard.is_file():
            raise CheckpointError(f"shard {shard.name!r} listed in {str(index_path)!r} is missing")
    return files


def _read_safetensors_tensor(path: Path, name: str) -> np.ndarray:
    info = _read_safetensors_header(path)[name]
    dtype = info.get("dtype")
    if dtype == "BF16":  # safetensors.numpy cannot read bf16: widen the raw bits ourselves
        return _read_bf16(path, info)
    if dtype not in _FLOAT_DTYPES:
        raise CheckpointError(f"tensor {name!r} in {str(path)!r} has dtype {dtype}, "
                              f"expected one of BF16, {', '.join(_FLOAT_DTYPES)}")
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="numpy") as f:
            array = f.get_tensor(name)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read tensor {name!r} from {str(path)!r}: {exc}") from exc
    return np.ascontiguousarray(array, dtype=np.float32)


def _read_bf16(path: Path, info: dict[str, Any]) -> np.ndarray:
    shape = tuple(int(s) for s in info["shape"])
    start, end = (int(o) for o in info["data_offsets"])
    count = int(np.prod(shape, dtype=np.int64))
    if end - start != 2 * count:
        raise CheckpointError(f"bf16 tensor in {str(path)!r} spans {end - start} bytes, "
                              f"its shape {list(shape)} needs {2 * count}")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + header_len + start)
        raw = f.read(end - start)
    if len(raw) != end - start:
        raise CheckpointError(f"safetensors file {str(path)!r} is truncated")
    bits = np.frombuffer(raw, dtype="<u2")
    # bf16 is the top half of a float32: shifting the bits up 16 widens it exactly
    return (bits.astype(np.uint32) << 16).view(np.float32).reshape(shape)


# --- pickles, torch imported lazily ---

def _torch_load(path: Path) -> Any:
    from ..reference.checkpoint import safe_torch_load  # imports torch

    return safe_torch_load(path, mmap=zipfile.is_zipfile(path))   # mmap needs the zip format


def _table_from_pickle(path: Path) -> np.ndarray:
    """A .pt holding one tensor (the official llm_codebook_path) or a state dict with one 2-D tensor."""
    import torch
    obj = _torch_load(path)
    if isinstance(obj, dict):
        shapes = {k: tuple(v.shape) for k, v in obj.items() if isinstance(v, torch.Tensor)}
        obj = obj[_pick_embedding_name(list(shapes), None, shapes, where=path)]
    if not isinstance(obj, torch.Tensor) or obj.dim() != 2:
        what = f"a {obj.dim()}-D tensor" if isinstance(obj, torch.Tensor) else type(obj).__name__
        raise LLMError(f"{str(path)!r} holds {what}, expected one 2-D embedding tensor [V, d]")
    return _tensor_to_numpy(obj)


def _load_pickled_state(model_dir: Path) -> dict[str, Any]:
    single = model_dir / "pytorch_model.bin"
    index = model_dir / "pytorch_model.bin.index.json"
    if single.is_file():
        state = _torch_load(single)
    elif index.is_file():
        state = {}
        for shard in sorted(set(_shard_map(index, model_dir).values())):
            state.update(_torch_load(shard))
    else:
        raise LLMError(f"LM directory {str(model_dir)!r} has no weights: expected model.safetensors, "
                       "model.safetensors.index.json or pytorch_model.bin")
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(single)!r} holds a {type(state).__name__}, expected a state dict")
    return state


def _tensor_to_numpy(tensor: Any) -> np.ndarray:
    import torch
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise CheckpointError(f"embedding is {getattr(tensor, 'dtype', type(tensor).__name__)}, "
                              "expected a floating-point tensor")
    return np.ascontiguousarray(tensor.detach().to(torch.float32).numpy())


# --------------------------------------------------------------------------------------------------
# Writing the tiny base LM
# --------------------------------------------------------------------------------------------------

def create_base_lm(out_dir: str | os.PathLike[str], *, vocab_size: int = 1024, hidden_size: int = 128,
                   num_layers: int = 2, num_heads: int = 4, intermediate_size: int = 256,
                   max_position_embeddings: int = 512, seed: int = 0) -> Path:
    """Write a seeded Hugging Face ``LlamaForCausalLM`` directory with its own BPE tokenizer.

    The tokenizer is a byte-level BPE of exactly ``vocab_size`` entries (``<unk> <s> </s> <pad>`` at
    ids 0..3), trained on the text of CPython's ``pydoc_data.topics`` (offline, deterministic for a
    given Python version); it prepends ``<s>`` like LLaMA's. Weights come from
    ``torch.manual_seed(seed)`` and ``LlamaForCausalLM(config)``, untied, float32; the caller's RNG
    state is left untouched. Everything is written to a temporary sibling, then renamed into place.

    Returns:
        ``Path(out_dir)``, loadable offline by ``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained``.
    Raises:
        LLMError: ``vocab_size`` is too small for the byte alphabet or ``hidden_size`` does not split
            into ``num_heads`` heads.
    """
    byte_alphabet = 256
    if vocab_size < byte_alphabet + len(SPECIAL_TOKENS):
        raise LLMError(f"vocab_size {vocab_size} < {byte_alphabet + len(SPECIAL_TOKENS)}: a byte-level "
                       "BPE needs the 256 bytes plus the 4 special tokens")
    if hidden_size % num_heads:
        raise LLMError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    with staged_folder(out) as tmp:   # swapped into place of out when the block succeeds
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
            max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=3)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        model.save_pretrained(tmp)
        _train_tokenizer(vocab_size, max_position_embeddings).save_pretrained(tmp)
        _portable_tokenizer_class(tmp / "tokenizer_config.json")
        for f in tmp.iterdir():
            f.chmod(0o644)
    return out


def _corpus() -> list[str]:
    """CPython's pydoc topic texts, in key order: offline English prose that ships with Python."""
    from pydoc_data.topics import topics
    return [topics[key] for key in sorted(topics)]


def _train_tokenizer(vocab_size: int, max_length: int) -> Any:
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    unk, bos, eos, pad = SPECIAL_TOKENS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:  # the corpus ran out of merges
        raise LLMError(f"BPE training reached {tok.get_vocab_size()} tokens, not {vocab_size}")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, bos_token=bos, eos_token=eos,
                                   pad_token=pad, model_max_length=max_length)


def _portable_tokenizer_class(config_path: Path) -> None:
    """Name the class transformers 4 knows too; transformers 5 maps it to ``TokenizersBackend``."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
