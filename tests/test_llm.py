"""The LLM stage: vocabulary expansion, the generation loop, torch ↔ ONNX Runtime parity, export, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from llm_fixtures import BASE_LM, CODEBOOK, expanded_lm, llm_onnx, llm_v2flow  # noqa: F401

from v2flow_rt.errors import LLMError
from v2flow_rt.llm.generate import (
    GenerationSettings,
    OrtStep,
    PromptEncoder,
    TorchStep,
    choose_tokens,
    generate_visual_tokens,
    left_pad,
    position_ids_from_mask,
)
from v2flow_rt.llm.vocab import VisualVocab, codeword_embeddings, expand_vocabulary, file_sha256, tokenizer_sha256

PROMPTS = ["a cup of coffee", "a photo of an astronaut on the moon with a flag", "gravel"]
SAMPLED = GenerationSettings(temperature=1.0, top_k=64, top_p=0.95)


@pytest.fixture(scope="module")
def torch_step(expanded_lm):  # noqa: F811
    return TorchStep.from_pretrained(expanded_lm)


@pytest.fixture(scope="module")
def ort_step(llm_onnx):  # noqa: F811
    return OrtStep.from_file(llm_onnx / "model.onnx", threads=1)


@pytest.fixture(scope="module")
def vocab(expanded_lm) -> VisualVocab:  # noqa: F811
    return VisualVocab.from_dir(expanded_lm)


@pytest.fixture(scope="module")
def encoder(expanded_lm) -> PromptEncoder:  # noqa: F811
    return PromptEncoder(expanded_lm)


# --------------------------------------------------------------------------------------- expansion

def test_expanded_lm_layout_and_embeddings(expanded_lm, llm_v2flow) -> None:  # noqa: F811
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, folder = llm_v2flow
    vocab = VisualVocab.from_dir(expanded_lm)
    assert (vocab.offset, vocab.codebook_size, vocab.boi_id, vocab.eoi_id) == (1024, CODEBOOK, 1024 + CODEBOOK,
                                                                             1025 + CODEBOOK)
    assert vocab.num_tokens == 64 and vocab.vocab_size == 1024 + CODEBOOK + 2 and vocab.max_positions == 512
    assert vocab.v2flow_sha256 == file_sha256(folder / "model.safetensors") and vocab.projection == "identity"
    assert vocab.tokenizer_sha256 == tokenizer_sha256(model) == tokenizer_sha256(folder)
    tok = AutoTokenizer.from_pretrained(expanded_lm)
    assert tok.convert_tokens_to_ids(["<v_0>", f"<v_{CODEBOOK - 1}>", "<boi>", "<eoi>"]) == [
        1024, 1023 + CODEBOOK, vocab.boi_id, vocab.eoi_id]
    # the tokenizers-only encoder reads the same ids as transformers, visual tokens included
    assert PromptEncoder(expanded_lm)(["a <boi><v_5><eoi>"])[0] == tok("a <boi><v_5><eoi>").input_ids

    lm = AutoModelForCausalLM.from_pretrained(expanded_lm, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(BASE_LM, dtype=torch.float32)
    emb = lm.get_input_embeddings().weight.detach().numpy()
    old = base.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(emb[:1024], old)                       # text rows untouched
    median = np.median(np.linalg.norm(old.astype(np.float64), axis=1))
    codebook = model.quantizer.codebook.detach().numpy().astype(np.float64)
    # same width → identity projection: visual rows are the unit codewords at the table's median norm
    np.testing.assert_allclose(emb[1024:1024 + CODEBOOK], codebook / np.linalg.norm(codebook, axis=1,
                               keepdims=True) * median, rtol=1e-5, atol=1e-7)
    head = lm.get_output_embeddings().weight.detach().numpy()[1024:1024 + CODEBOOK].astype(np.float64)
    cos = np.sum(head * codebook, axis=1) / np.linalg.norm(head, axis=1) / np.linalg.norm(codebook, axis=1)
    np.testing.assert_allclose(cos, 1.0, atol=1e-5)                      # head rows point along the codewords


def test_projection_when_widths_differ() -> None:
    rng = np.random.default_rng(0)
    v, d_c, d_lm, k = 300, 16, 24, 40
    v2f_table = rng.standard_normal((v, d_c))
    true_map = rng.standard_normal((d_c, d_lm))
    lm_table = v2f_table @ true_map                                      # the LM's table is a linear image
    codebook = rng.standard_normal((k, d_c))
    codebook /= np.linalg.norm(codebook, axis=1, keepdims=True)
    out, used, norm = codeword_embeddings(codebook, lm_table, v2f_table)
    assert used == "lstsq" and out.shape == (k, d_lm)
    want = codebook @ true_map                                           # least squares recovers the map
    cos = np.sum(out * want, axis=1) / np.linalg.norm(out, axis=1) / np.linalg.norm(want, axis=1)
    np.testing.assert_allclose(cos, 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), np.median(np.linalg.norm(lm_table, axis=1)), rtol=1e-5)
    # different vocabularies → a random semi-orthogonal map, which keeps every angle between codewords
    out, used, _ = codeword_embeddings(codebook, lm_table[:100], v2f_table)
    assert used == "orthogonal"
    unit = out / np.linalg.norm(out, axis=1, keepdims=True)
    np.testing.assert_allclose(unit @ unit.T, codebook @ codebook.T, atol=1e-5)
    with pytest.raises(LLMError, match="identity projection impossible"):
        codeword_embeddings(codebook, lm_table, v2f_table, projection="identity")
    with pytest.raises(LLMError, match="lstsq projection needs"):
        codeword_embeddings(codebook, lm_table[:100], v2f_table, projection="lstsq")


def _copy_lm(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_expansion_errors(tmp_path, expanded_lm, llm_v2flow) -> None:  # noqa: F811
    _, folder = llm_v2flow
    with pytest.raises(LLMError, match="does not exist"):
        expand_vocabulary(tmp_path / "missing", folder, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LLMError, match="unknown LM directory layout.*no config.json"):
        expand_vocabulary(tmp_path / "empty", folder, tmp_path / "out")
    no_type = _copy_lm(BASE_LM, tmp_path / "no_type")
    (no_type / "config.json").write_text(json.dumps({"vocab_size": 1024, "hidden_size": 128}))
    with pytest.raises(LLMError, match="unknown LM directory layout.*model_type"):
        expand_vocabulary(no_type, folder, tmp_path / "out")
    no_weights = _copy_lm(BASE_LM, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(LLMError, match="unknown LM directory layout.*no weights"):
        expand_vocabulary(no_weights, folder, tmp_path / "out")
    no_tok = _copy_lm(BASE_LM, tmp_path / "no_tok")
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(LLMError, match="unknown LM directory layout.*no tokenizer"):
        expand_vocabulary(no_tok, folder, tmp_path / "out")
    encoder_only = _copy_lm(BASE_LM, tmp_path / "bert")
    config = json.loads((encoder_only / "config.json").read_text())
    (encoder_only / "config.json").write_text(json.dumps({**config, "model_type": "not-a-model"}))
    with pytest.raises(LLMError, match="unknown LM directory layout"):
        expand_vocabulary(encoder_only, folder, tmp_path / "out")
    with pytest.raises(LLMError, match="already expanded.*v2flow.json"):
        expand_vocabulary(expanded_lm, folder, tmp_path / "out")
    stripped = _copy_lm(expanded_lm, tmp_path / "stripped")
    (stripped / "v2flow.json").unlink()
    with pytest.raises(LLMError, match="already expanded.*<boi>"):
        expand_vocabulary(stripped, folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------- host loop

def test_left_padding_positions() -> None:
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=3)
    np.testing.assert_array_equal(ids, [[5, 6, 7], [3, 3, 8]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    np.testing.assert_array_equal(position_ids_from_mask(mask), [[0, 1, 2], [0, 0, 0]])


def test_choose_tokens_follows_the_truncated_distribution() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((1, 50))
    assert choose_tokens(logits, GenerationSettings(temperature=0), rng)[0] == logits.argmax()
    # 20000 draws: each frequency within 5 standard errors of the softmax probability
    draws = np.array([choose_tokens(logits, GenerationSettings(temperature=0.7), rng)[0] for _ in range(20000)])
    p = np.exp(logits[0] / 0.7)
    p /= p.sum()
    freq = np.bincount(draws, minlength=50) / len(draws)
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / len(draws)) + 1e-4)
    top5 = set(np.argsort(-logits[0])[:5])
    draws = {int(choose_tokens(logits, GenerationSettings(top_k=5), rng)[0]) for _ in range(2000)}
    assert draws == top5
    # top-p: the smallest set of most likely tokens whose mass reaches p
    probs = np.exp(logits[0]) / np.exp(logits[0]).sum()
    order = np.argsort(-probs)
    need = int(np.searchsorted(np.cumsum(probs[order]), 0.5) + 1)
    draws = {int(choose_tokens(logits, GenerationSettings(top_p=0.5), rng)[0]) for _ in range(4000)}
    assert draws == set(order[:need].tolist())


def test_loop_matches_transformers_generate(expanded_lm, torch_step, vocab, encoder) -> None:  # noqa: F811
    """An independent reference: HF ``generate`` (its own left-padding, positions and cache handling) with
    the logits restricted to the visual vocabulary chooses the same greedy tokens as the numpy loop."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class VisualOnly(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            out = torch.full_like(scores, -float("inf"))
            out[:, vocab.offset:vocab.offset + vocab.codebook_size] = scores[:, vocab.offset:vocab.offset +
                                                                              vocab.codebook_size]
            return out

    prompts = encoder(PROMPTS)
    codes = generate_visual_tokens(torch_step, prompts, vocab, GenerationSettings(temperature=0))
    ids, mask = left_pad([p + [vocab.boi_id] for p in prompts], vocab.pad_id)
    out = torch_step.model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                    max_new_tokens=vocab.num_tokens, do_sample=False, pad_token_id=vocab.pad_id,
                                    eos_token_id=None, logits_processor=LogitsProcessorList([VisualOnly()]))
    np.testing.assert_array_equal(out[:, ids.shape[1]:].numpy() - vocab.offset, codes)


def test_batched_rows_equal_single_prompts(torch_step, vocab, encoder) -> None:
    prompts = encoder(PROMPTS)
    batched = generate_visual_tokens(torch_step, prompts, vocab, GenerationSettings(temperature=0))
    for i, p in enumerate(prompts):
        single = generate_visual_tokens(torch_step, [p], vocab, GenerationSettings(temperature=0))
        np.testing.assert_array_equal(batched[i], single[0])
    assert len({tuple(r) for r in batched}) == len(prompts)              # the prompt matters


# --------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("settings", [GenerationSettings(temperature=0), SAMPLED,
                                      GenerationSettings(temperature=0.8, cfg_scale=2.0)],
                         ids=["greedy", "sampled", "sampled-cfg"])
@pytest.mark.parametrize("batch", [1, 3], ids=["batch1", "batch3-padded"])
def test_torch_and_ort_choose_identical_tokens(torch_step, ort_step, vocab, encoder, settings, batch) -> None:
    prompts = encoder(PROMPTS[:batch])
    uncond = encoder.unconditional()
    a = generate_visual_tokens(torch_step, prompts, vocab, settings, seed=7, uncond_ids=uncond)
    b = generate_visual_tokens(ort_step, prompts, vocab, settings, seed=7, uncond_ids=uncond)
    assert a.shape == (batch, 64) and a.min() >= 0 and a.max() < CODEBOOK
    np.testing.assert_array_equal(a, b)
    if not settings.greedy:
        c = generate_visual_tokens(ort_step, prompts, vocab, settings, seed=8, uncond_ids=uncond)
        assert (c != b).any()                                            # the seed matters


# --------------------------------------------------------------------------------------- export

def test_export_manifest_io_and_variants(llm_onnx, expanded_lm) -> None:  # noqa: F811
    import onnx

    from v2flow_rt.llm.export import io_names, read_manifest

    manifest = read_manifest(llm_onnx)
    inputs, outputs = io_names(2)
    assert manifest["inputs"] == inputs and manifest["outputs"] == outputs
    assert inputs[3:5] == ["past_key_values.0.key", "past_key_values.0.value"] and outputs[1] == "present.0.key"
    assert manifest["fp32_vs_torch_max_abs_logit_diff"] < 1e-3 and not manifest["external_data"]
    graph = onnx.load(str(llm_onnx / "model.onnx"), load_external_data=False).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert dims["past_key_values.1.value"] == ["batch_size", 4, "past_sequence_length", 32]
    assert dims["logits"] == ["batch_size", "sequence_length", 1024 + CODEBOOK + 2]
    for variant in manifest["variants"].values():
        assert (llm_onnx / variant["file"]).is_file() and variant["sha256"] == file_sha256(llm_onnx / variant["file"])
        assert 0.0 <= variant["token_agreement"] <= 1.0 and 0.0 <= variant["sampled"]["token_agreement"] <= 1.0
    assert set(manifest["variants"]) == {"fp32", "fp16", "int8", "int8-block"}
    fp32 = manifest["variants"]["fp32"]
    assert fp32["token_agreement"] == fp32["sampled"]["image_exact"] == fp32["teacher_forced"]["top1_agreement"] == 1
    assert abs(fp32["teacher_forced"]["kl_nats"]) < 1e-9
    for variant in manifest["variants"].values():
        assert 0 <= variant["teacher_forced"]["kl_nats"] < 0.5 * fp32["teacher_forced"]["reference_entropy_nats"]
    assert manifest["variants"]["int8"]["bytes"] < manifest["variants"]["fp32"]["bytes"]


def test_quantized_graphs_run_in_the_loop(llm_onnx, torch_step, vocab, encoder) -> None:  # noqa: F811
    """Each reduced-precision graph in the loop chooses (greedy) mostly the fp32 PyTorch tokens: a graph whose
    logits were wrong (not merely rounded) would agree about as often as chance (1 in 256)."""
    prompts = encoder(PROMPTS)
    greedy = GenerationSettings(temperature=0)
    want = generate_visual_tokens(torch_step, prompts, vocab, greedy)
    # Measured: 1.0, 0.67, 1.0 (a greedy decode diverges for good after its first different token).
    floors = {"model_fp16.onnx": 0.95, "model_int8.onnx": 0.25, "model_int8_block.onnx": 0.9}
    for name, floor in floors.items():
        step = OrtStep.from_file(llm_onnx / name, 1)
        codes = generate_visual_tokens(step, prompts, vocab, SAMPLED)
        assert codes.shape == (3, 64) and codes.min() >= 0 and codes.max() < CODEBOOK
        agree = float((generate_visual_tokens(step, prompts, vocab, greedy) == want).mean())
        assert agree >= floor, (name, agree)


def test_external_data_export(expanded_lm, tmp_path, torch_step, vocab, encoder) -> None:  # noqa: F811
    from v2flow_rt.llm.export import export_llm

    manifest = json.loads(export_llm(expanded_lm, tmp_path / "ext", precisions=("fp32",),
                                     external_data=True).read_text())
    files = manifest["variants"]["fp32"]["files"]
    assert manifest["external_data"] and len(files) == 2 and any(f.endswith(".data") for f in files)
    weight_bytes = sum(p.numel() * 4 for p in torch_step.model.parameters())
    assert (tmp_path / "ext" / "model.onnx.data").stat().st_size > 0.99 * weight_bytes   # (tiny norms stay inline)
    prompts = encoder(PROMPTS)
    a = generate_visual_tokens(OrtStep.from_file(tmp_path / "ext" / "model.onnx", 1), prompts, vocab, SAMPLED)
    np.testing.assert_array_equal(a, generate_visual_tokens(torch_step, prompts, vocab, SAMPLED))


# --------------------------------------------------------------------------------------- ORT alone

def test_generate_on_ort_runs_without_torch(llm_onnx, expanded_lm, llm_v2flow, tmp_path) -> None:  # noqa: F811
    """``generate --backend ort`` in a process where torch, transformers and onnx cannot be imported (the
    ``llm-ort`` extra alone) gives the image the in-process ORT path gives, whose codes are the torch
    backend's; without graphs to run it says in one line what to export, instead of a traceback."""
    import os
    import subprocess
    import sys

    from PIL import Image

    from v2flow_rt.export.folder import export_model
    from v2flow_rt.llm.t2i import TextToImage

    _, folder = llm_v2flow
    lm = tmp_path / "lm"
    shutil.copytree(expanded_lm, lm)
    shutil.copytree(llm_onnx, lm / "onnx")                 # the LM's graphs where an ORT-only host finds them
    decoder = tmp_path / "decoder"
    export_model(folder, decoder, stages=["codec_encode", "tokenizer", "token_embed", "mar_step", "ode", "ode_cfg",
                                          "codec_decode"],
                 progress=False, validate=False, quality=False)
    script = Path(__file__).with_name("without_torch.py")
    env = {**os.environ, "V2FLOW_RT_CACHE": str(tmp_path / "empty-cache")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(script), "generate", "a cup of coffee", "--backend", "ort",
                               "--lm", str(lm), "--threads", "1", "--temperature", "0", "--cfg", "1", *args],
                              capture_output=True, text=True, timeout=300, env=env)

    for model_args in (["--model", str(folder), "--decoder-onnx", str(decoder)], ["--model", str(decoder)]):
        out = tmp_path / "ort.png"
        done = run(*model_args, "--out", str(out))
        assert done.returncode == 0, done.stderr
        got = np.asarray(Image.open(out).convert("RGB"))
        ort = TextToImage.from_pretrained(lm, folder, backend="ort", decoder_onnx=str(decoder), threads=1)
        want = ort("a cup of coffee", seed=0, settings=GenerationSettings(temperature=0))[0]
        np.testing.assert_array_equal(got, want)
    torch_t2i = TextToImage.from_pretrained(lm, folder, backend="torch", threads=1)
    greedy = GenerationSettings(temperature=0)
    prompt = "a cup of coffee"
    np.testing.assert_array_equal(ort.tokens(prompt, 0, greedy), torch_t2i.tokens(prompt, 0, greedy))
    ref = torch_t2i(prompt, seed=0, settings=greedy)[0]
    assert np.abs(ref.astype(int) - got.astype(int)).max() <= 2        # fp32 ORT vs PyTorch decode, in uint8
    # no decoder graphs and no torch to make them: one line naming the way out, nothing written
    missing = run("--model", str(folder), "--out", str(tmp_path / "none.png"))
    assert missing.returncode == 2 and not (tmp_path / "none.png").exists()
    line = missing.stderr.strip()
    assert "\n" not in line and "torch is not installed" in line and "--decoder-onnx" in line, line


# --------------------------------------------------------------------------------------- errors

def test_generation_errors(torch_step, vocab, encoder) -> None:
    prompt = encoder(["a cup of coffee"])
    with pytest.raises(LLMError, match="decoder takes 63 visual tokens.*N = 64"):
        generate_visual_tokens(torch_step, prompt, vocab, num_tokens=63)
    long_prompt = encoder([" ".join(["coffee"] * 500)])
    with pytest.raises(LLMError, match=r"prompt too long: \d+ tokens .* max_position_embeddings 512; shorten"):
        generate_visual_tokens(torch_step, long_prompt, vocab)
    with pytest.raises(LLMError, match="needs the unconditional prompt"):
        generate_visual_tokens(torch_step, prompt, vocab, GenerationSettings(cfg_scale=3.0))
    with pytest.raises(LLMError, match="no prompts"):
        generate_visual_tokens(torch_step, [], vocab)
    for bad in (GenerationSettings(temperature=-1), GenerationSettings(top_p=0), GenerationSettings(top_k=-2)):
        with pytest.raises(LLMError):
            generate_visual_tokens(torch_step, prompt, vocab, bad)
    with pytest.raises(LLMError, match="no v2flow.json"):
        VisualVocab.from_dir(BASE_LM)
