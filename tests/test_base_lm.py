"""Tests for v2flow_rt.llm.base_lm: the bundled tiny LM, its generator, and the embedding-table reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

from v2flow_rt.errors import CheckpointError, LLMError
from v2flow_rt.llm.base_lm import create_base_lm, load_embedding_table

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "v2flow_rt" / "assets" / "base_lm"
SENTENCE = "a photo of a cat on a sofa"


def _write_config(model_dir: Path, vocab: int, hidden: int) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(
        {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden}))


# --- the bundled LM and its generator ---

def test_bundled_base_lm_loads_with_transformers() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(BUNDLED)
    tok = AutoTokenizer.from_pretrained(BUNDLED)
    assert model.config.vocab_size == 1024 and len(tok) == 1024
    assert not model.config.tie_word_embeddings
    assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [0, 1, 2, 3]
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, torch.nn.Embedding)
    reference = embedding.weight.detach().numpy()
    table = load_embedding_table(BUNDLED)
    assert table.dtype == np.float32 and table.shape == (1024, 128)
    np.testing.assert_array_equal(table, reference)  # exact: both read the same float32 bytes
    # the head is a separate matrix, so the reader must not have picked it up by shape
    assert not np.array_equal(table, model.get_output_embeddings().weight.detach().numpy())
    ids = tok(SENTENCE, return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 1024) and torch.isfinite(logits).all()


def test_create_base_lm_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    kwargs = {"vocab_size": 300, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
              "intermediate_size": 64, "max_position_embeddings": 64, "seed": 3}
    rng_before = torch.random.get_rng_state()
    a = create_base_lm(tmp_path / "a", **kwargs)
    b = create_base_lm(tmp_path / "b", **kwargs)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is left alone
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(wa) == sorted(wb) and "lm_head.weight" in wa
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    # another seed gives other weights
    c = create_base_lm(tmp_path / "c", **{**kwargs, "seed": 4})
    assert not np.array_equal(load_embedding_table(c), load_embedding_table(a))

    tok = AutoTokenizer.from_pretrained(a)
    assert len(tok) == 300
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<unk>", "<s>", "</s>", "<pad>"]
    ids = tok(SENTENCE).input_ids
    assert ids[0] == 1 and max(ids) < 300
    assert tok.decode(ids, skip_special_tokens=True) == SENTENCE


def test_create_base_lm_replaces_an_existing_folder(tmp_path: Path) -> None:
    out = tmp_path / "lm"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    create_base_lm(out, vocab_size=270, hidden_size=16, num_layers=1, num_heads=2,
                   intermediate_size=32, max_position_embeddings=32)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["lm"]  # no temporary folder left behind


# --- load_embedding_table on the layouts it accepts ---

def test_sharded_safetensors_dir(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 8)).astype(np.float32)
    norm = rng.standard_normal(8).astype(np.float32)
    head = rng.standard_normal((50, 8)).astype(np.float32)
    _write_config(tmp_path, 50, 8)
    save_numpy({"model.norm.weight": norm, "lm_head.weight": head},
               str(tmp_path / "model-00001-of-00002.safetensors"))
    save_numpy({"model.embed_tokens.weight": table}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "model.norm.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00001-of-00002.safetensors",
        "model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}))
    np.testing.assert_array_equal(load_embedding_table(tmp_path), table)


def test_unknown_name_falls_back_to_the_unique_config_shaped_tensor(tmp_path: Path) -> None:
    table = np.random.default_rng(1).standard_normal((30, 6)).astype(np.float32)
    _write_config(tmp_path, 30, 6)
    save_numpy({"decoder.tok_emb": table, "decoder.proj": np.zeros((6, 6), np.float32)},
               str(tmp_path / "model.safetensors"))
    np.testing.assert_array_equal(load_embedding_table(tmp_path), table)


def test_bf16_safetensors_matches_torch_widening(tmp_path: Path) -> None:
    bf16 = torch.randn(40, 12, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    file = tmp_path / "codebook.safetensors"
    save_torch({"weight": bf16}, str(file))
    table = load_embedding_table(file)
    assert table.dtype == np.float32
    np.testing.assert_array_equal(table, bf16.to(torch.float32).numpy())  # widening bf16 is exact
    # the same tensor inside an HF directory, under the LLaMA name
    _write_config(tmp_path / "hf", 40, 12)
    save_torch({"model.embed_tokens.weight": bf16, "lm_head.weight": bf16.clone()},
               str(tmp_path / "hf" / "model.safetensors"))
    np.testing.assert_array_equal(load_embedding_table(tmp_path / "hf"), bf16.float().numpy())


def test_safetensors_path_needs_no_torch(tmp_path: Path) -> None:
    save_torch({"model.embed_tokens.weight": torch.ones(4, 2, dtype=torch.bfloat16)},
               str(tmp_path / "t.safetensors"))
    code = ("import sys; from v2flow_rt.llm.base_lm import load_embedding_table as f; "
            f"t = f({str(tmp_path / 't.safetensors')!r}); "
            "assert 'torch' not in sys.modules, 'torch imported'; assert t.sum() == 8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env, timeout=60)


def test_pt_file_holding_a_tensor(tmp_path: Path) -> None:
    codebook = torch.randn(20, 5, dtype=torch.float16, generator=torch.Generator().manual_seed(3))
    torch.save(codebook, tmp_path / "llm_codebook.pt")
    np.testing.assert_array_equal(load_embedding_table(tmp_path / "llm_codebook.pt"),
                                  codebook.float().numpy())
    torch.save({"weight": codebook}, tmp_path / "embedding_state.pth")  # nn.Embedding.state_dict()
    np.testing.assert_array_equal(load_embedding_table(tmp_path / "embedding_state.pth"),
                                  codebook.float().numpy())
    torch.save(torch.zeros(3), tmp_path / "vector.pt")
    with pytest.raises(LLMError, match="1-D tensor"):
        load_embedding_table(tmp_path / "vector.pt")


def test_pytorch_model_bin_dir(tmp_path: Path) -> None:
    wte = torch.randn(16, 4, generator=torch.Generator().manual_seed(4))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 16,
                                                       "n_embd": 4}))
    torch.save({"transformer.wte.weight": wte, "transformer.wpe.weight": torch.zeros(8, 4)},
               tmp_path / "pytorch_model.bin")
    np.testing.assert_array_equal(load_embedding_table(tmp_path), wte.numpy())


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"echo pwned > {self.marker}",)


def test_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "llm_codebook.pt"
    torch.save(_RunsCode(marker), evil)
    assert not marker.exists()  # saving only records the call
    with pytest.raises(CheckpointError, match="llm_codebook.pt"):
        load_embedding_table(evil)
    assert not marker.exists()


# --- errors ---

def test_directory_errors(tmp_path: Path) -> None:
    with pytest.raises(LLMError, match="does not exist"):
        load_embedding_table(tmp_path / "missing")
    with pytest.raises(LLMError, match="no config.json"):
        load_embedding_table(tmp_path)
    _write_config(tmp_path, 10, 4)
    with pytest.raises(LLMError, match="no weights"):
        load_embedding_table(tmp_path)


def test_no_embedding_tensor_lists_names(tmp_path: Path) -> None:
    _write_config(tmp_path, 10, 4)
    save_numpy({"a.weight": np.zeros((10, 3), np.float32), "b.weight": np.zeros((4,), np.float32)},
               str(tmp_path / "model.safetensors"))
    with pytest.raises(LLMError, match=r"a\.weight \[10, 3\].*b\.weight \[4\]"):
        load_embedding_table(tmp_path)


def test_wrong_shape_table(tmp_path: Path) -> None:
    _write_config(tmp_path, 10, 4)
    save_numpy({"model.embed_tokens.weight": np.zeros((10, 5), np.float32)},
               str(tmp_path / "model.safetensors"))
    with pytest.raises(LLMError, match=r"shape \[10, 5\].*\[10, 4\]"):
        load_embedding_table(tmp_path)


def test_corrupted_safetensors(tmp_path: Path) -> None:
    _write_config(tmp_path, 10, 4)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_embedding_table(tmp_path)
