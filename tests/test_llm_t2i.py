"""Text to image: training the LLM stage, the CLI verbs, the conditioning statistic, the bundled t2i LM."""

from __future__ import annotations

import json

import numpy as np
import pytest
from llm_fixtures import BASE_LM, REPO, expanded_lm, llm_v2flow  # noqa: F401

from v2flow_rt.cli import main
from v2flow_rt.data import from_model_range
from v2flow_rt.errors import CheckpointError, LLMError
from v2flow_rt.llm.captions import SUBJECTS, subject_crops
from v2flow_rt.llm.generate import GenerationSettings
from v2flow_rt.llm.t2i import TextToImage, conditioning_accuracy, image_features
from v2flow_rt.llm.vocab import VisualVocab

T2I = REPO / "v2flow_rt" / "assets" / "t2i"
DEFAULT_MODEL = REPO / "v2flow_rt" / "assets" / "default"


# --------------------------------------------------------------------------------------- training

def test_train_llm_cli_expands_trains_resumes_and_bundles(tmp_path, llm_v2flow) -> None:  # noqa: F811
    _, folder = llm_v2flow
    out, bundle = tmp_path / "run", tmp_path / "bundle"
    args = ["train-llm", "--lm", str(BASE_LM), "--model", str(folder), "--out", str(out), "--batch-size", "4",
            "--crops-per-subject", "4", "--threads", "1", "--lr", "3e-3", "--warmup", "1"]
    assert main([*args, "--steps", "4", "--bundle", str(bundle)]) == 0
    assert VisualVocab.from_dir(out / "expanded").codebook_size == 256          # a plain LM is expanded first
    final = out / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "v2flow.json", "training.json"):
        assert (final / name).is_file() and (bundle / name).is_file(), name
    record = json.loads((final / "training.json").read_text())
    assert record["trained_steps"] == 4 and set(record["subjects"]) == set(SUBJECTS)
    assert "train-llm --lm" in (bundle / "README.md").read_text()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 1 and np.isfinite(log[0]["loss"])
    # resuming with more steps continues from the saved step
    weights = (final / "model.safetensors").read_bytes()
    assert main([*args, "--steps", "6"]) == 0
    assert json.loads((final / "training.json").read_text())["trained_steps"] == 6
    assert (final / "model.safetensors").read_bytes() != weights
    # …but not with other settings
    with pytest.raises(CheckpointError, match="other settings"):
        from v2flow_rt.llm.train import LLMTrainSettings, train_llm
        train_llm(out / "expanded", folder, out, LLMTrainSettings(steps=8, batch_size=8, crops_per_subject=4))


def test_training_lowers_the_loss(tmp_path, expanded_lm, llm_v2flow) -> None:  # noqa: F811
    from v2flow_rt.llm.train import LLMTrainSettings, train_llm

    _, folder = llm_v2flow
    subjects = {k: SUBJECTS[k] for k in ("coffee", "hubble_deep_field")}
    train_llm(expanded_lm, folder, tmp_path, LLMTrainSettings(steps=30, batch_size=8, crops_per_subject=8, lr=3e-3,
                                                              warmup=2, threads=1), subjects=subjects, progress=False)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 30 and log[-1]["loss"] < 0.7 * log[0]["loss"]


def test_training_refuses_another_v2flow_model(tmp_path, expanded_lm) -> None:  # noqa: F811
    import torch

    from v2flow_rt.config import get_preset
    from v2flow_rt.llm.train import LLMTrainSettings, train_llm
    from v2flow_rt.reference.model import V2Flow

    torch.manual_seed(1)
    other = V2Flow(get_preset("tiny", codebook_size=256)).eval()
    with pytest.raises(LLMError, match="expanded with another V2Flow tokenizer"):
        train_llm(expanded_lm, other, tmp_path, LLMTrainSettings(steps=1))


# --------------------------------------------------------------------------------------- generate

def test_generate_cli_and_decoder_checks(tmp_path, expanded_lm, llm_v2flow) -> None:  # noqa: F811
    from PIL import Image

    _, folder = llm_v2flow
    out = tmp_path / "grid.png"
    assert main(["generate", "a cup of coffee", "--lm", str(expanded_lm), "--model", str(folder), "--out", str(out),
                 "--num", "2", "--top-k", "20", "--cfg", "1.5", "--threads", "1"]) == 0
    assert Image.open(out).size == (2 + 64 + 2 + 64 + 2, 2 + 64 + 2)
    assert main(["generate", "x", "--lm", str(BASE_LM), "--model", str(folder), "--out", str(out)]) == 2
    # the same prompt and seed give the same image; another seed another image
    t2i = TextToImage.from_pretrained(expanded_lm, folder, backend="torch", threads=1)
    a, b = t2i("a cup of coffee", seed=3), t2i("a cup of coffee", seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1, 64, 64, 3) and (t2i("a cup of coffee", seed=4) != a).any()
    # codes → image against the spec's float64 sampler at the generation decoder temperature, then the codec
    import torch
    from reference_loop import official_randomness, official_sample_tokens

    from v2flow_rt.llm.t2i import GENERATION_DECODER_TEMPERATURE
    from v2flow_rt.reference.codecs import build_codec

    model = llm_v2flow[0]
    codes = t2i.tokens("a cup of coffee", seed=3)
    decode = build_codec(model.config).decode
    with torch.no_grad():
        tokens = official_sample_tokens(model, model.embed_ids(torch.from_numpy(codes)), steps=model.config.ode_steps,
                                        temperature=GENERATION_DECODER_TEMPERATURE, seed=3)
        ref = from_model_range(decode(model.tokens_to_latent(torch.from_numpy(tokens).float())))
        noise = official_randomness(3, 1, 64, 192, 4)[1] * GENERATION_DECODER_TEMPERATURE
        noise_only = from_model_range(decode(model.tokens_to_latent(torch.from_numpy(noise))))
    assert np.abs(a.astype(int) - ref.astype(int)).max() <= 1            # float32 vs float64: one rounding step
    assert np.abs(a.astype(int) - noise_only.astype(int)).mean() > 5     # the velocity net moved the noise
    # a decoder with another token count, or other weights, is refused with a clear message
    from v2flow_rt.config import get_preset
    from v2flow_rt.reference.model import V2Flow

    other = V2Flow(get_preset("tiny", img_size=32, buffer_size=16, codebook_size=256)).eval()
    with pytest.raises(LLMError, match="decoder takes 16 visual tokens.*N = 64"):
        TextToImage(t2i.step, t2i.encoder, t2i.vocab, other)
    from v2flow_rt.reference.checkpoint import save_pretrained
    other_folder = save_pretrained(V2Flow(get_preset("tiny", codebook_size=256)).eval(), tmp_path / "other")
    with pytest.raises(LLMError, match="another V2Flow tokenizer"):
        TextToImage.from_pretrained(expanded_lm, other_folder)


def test_generation_renders_at_the_generation_decoder_temperature(expanded_lm, llm_v2flow) -> None:  # noqa: F811
    """Generated tokens are decoded at temperature 1 (a sample of the fine detail) even when the model's
    own default, meant for reconstruction, is 0 (as the bundled model's is); an explicit one wins."""
    from v2flow_rt.llm.t2i import GENERATION_DECODER_TEMPERATURE, decoder_sampling

    _, folder = llm_v2flow
    t2i = TextToImage.from_pretrained(expanded_lm, folder, backend="torch", threads=1)
    t2i.decoder.config.temperature = 0.0
    codes = t2i.tokens("a cup of coffee", seed=0, settings=GenerationSettings(temperature=0))
    sampled, smooth = (t2i.decoder.detokenize(codes, seed=5, temperature=t) for t in (1.0, 0.0))
    assert GENERATION_DECODER_TEMPERATURE == 1.0 and (sampled != smooth).any()
    np.testing.assert_array_equal(t2i.render(codes, seed=5), sampled)
    np.testing.assert_array_equal(t2i.render(codes, seed=5, temperature=0.0), smooth)
    np.testing.assert_array_equal(t2i.decoder.reconstruct(np.zeros((1, 64, 64, 3), np.uint8), seed=5),
                                  t2i.decoder.reconstruct(np.zeros((1, 64, 64, 3), np.uint8), seed=5,
                                                          temperature=0.0))
    assert decoder_sampling({"steps": 3}) == {"steps": 3, "temperature": 1.0}
    assert decoder_sampling({"temperature": 0.5})["temperature"] == 0.5


def test_lm_follows_the_tokenizer_not_the_decoder(tmp_path, expanded_lm, llm_v2flow) -> None:  # noqa: F811
    """A decoder retrained on the same codes keeps the LM; a changed resampler or codebook does not."""
    import dataclasses
    import shutil

    import torch

    from v2flow_rt.llm.vocab import tokenizer_sha256
    from v2flow_rt.reference.checkpoint import from_pretrained, save_pretrained

    _, folder = llm_v2flow
    vocab = VisualVocab.from_dir(expanded_lm)
    assert vocab.tokenizer_sha256 == tokenizer_sha256(folder) == tokenizer_sha256(from_pretrained(folder))
    assert vocab.made_for(folder)[0]
    model = from_pretrained(folder)
    with torch.no_grad():
        for p in [*model.flowloss.parameters(), *model.projector.parameters()]:
            p.add_(torch.randn_like(p))
    decoder_only = save_pretrained(model, tmp_path / "decoder_only")
    assert vocab.made_for(decoder_only) == (True, vocab.tokenizer_sha256)
    TextToImage.from_pretrained(expanded_lm, decoder_only, backend="torch", threads=1)
    with torch.no_grad():
        model.quantizer.codebook[0].mul_(-1)
    assert not vocab.made_for(model)[0]
    changed = save_pretrained(model, tmp_path / "codebook")
    with pytest.raises(LLMError, match="another V2Flow tokenizer"):
        TextToImage.from_pretrained(expanded_lm, changed)
    # an LM written before tokenizer_sha256 existed still checks the whole weights file
    old = tmp_path / "old_lm"
    shutil.copytree(expanded_lm, old)
    (old / "v2flow.json").write_text(dataclasses.replace(vocab, tokenizer_sha256="").to_json())
    assert VisualVocab.from_dir(old).made_for(folder)[0]
    assert not VisualVocab.from_dir(old).made_for(decoder_only)[0]


# --------------------------------------------------------------------------------------- conditioning

def test_image_features_are_histograms_and_mean_colour() -> None:
    img = np.zeros((1, 4, 4, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 10, 200, 255
    f = image_features(img)[0]
    want = np.zeros(24)
    want[[0, 8 + 6, 16 + 7]] = 1.0                                          # bins 10//32, 200//32, 255//32
    np.testing.assert_allclose(f[:24], want)
    np.testing.assert_allclose(f[24:], [10 / 255, 200 / 255, 1.0])


def test_conditioning_accuracy_separates_subjects() -> None:
    subjects = {k: SUBJECTS[k] for k in ("astronaut", "coffee", "hubble_deep_field", "flower")}
    refs = {k: from_model_range(v) for k, v in subject_crops(subjects, 64, 32, seed=0).items()}
    held_out = {k: from_model_range(v) for k, v in subject_crops(subjects, 64, 8, seed=1).items()}
    report = conditioning_accuracy(held_out, refs)
    assert report["accuracy"] >= 0.8 and report["chance"] == 0.25 and report["pairs"] == 32
    names = list(held_out)
    shuffled = {names[i]: held_out[names[(i + 1) % 4]] for i in range(4)}  # every label wrong
    assert conditioning_accuracy(shuffled, refs)["accuracy"] <= 0.2
    with pytest.raises(LLMError, match="no reference crops"):
        conditioning_accuracy({"unknown": held_out["coffee"]}, refs)


# --------------------------------------------------------------------------------------- bundled model

@pytest.mark.skipif(not (T2I / "v2flow.json").is_file(), reason="the bundled t2i LM is not built yet")
def test_bundled_t2i_matches_the_default_decoder_and_follows_prompts() -> None:
    from v2flow_rt.llm.vocab import tokenizer_sha256

    vocab = VisualVocab.from_dir(T2I)
    assert vocab.tokenizer_sha256 == tokenizer_sha256(DEFAULT_MODEL)
    assert sum(f.stat().st_size for f in T2I.iterdir()) < 10_000_000                 # small enough to commit
    t2i = TextToImage.from_pretrained("default", "default", backend="torch", threads=1)
    greedy = GenerationSettings(temperature=0)
    images = t2i(["deep space full of galaxies", "a field of flowers"], seed=0, settings=greedy)
    dark, bright = images.reshape(2, -1).mean(axis=1)
    assert dark < bright                                                 # galaxies on black vs sunlit petals


def test_evaluate_conditioning_end_to_end(expanded_lm, llm_v2flow) -> None:  # noqa: F811
    from v2flow_rt.llm.t2i import evaluate_conditioning

    _, folder = llm_v2flow
    t2i = TextToImage.from_pretrained(expanded_lm, folder, backend="torch", threads=1)
    subjects = {k: SUBJECTS[k] for k in ("coffee", "brick")}
    report = evaluate_conditioning(t2i, seeds=(0, 1), subjects=subjects, per_subject=8, steps=2)
    assert report["pairs"] == 12 and report["captions"] == 6 and report["chance"] == 0.5
    assert report["images"]["coffee"].shape == (6, 64, 64, 3) and report["references"]["brick"].shape == (8, 64, 64, 3)
    for key in ("accuracy", "accuracy_vs_raw_crops", "ceiling_vs_raw_crops", "ceiling_vs_decoded_crops"):
        assert 0.0 <= report[key] <= 1.0, key
    # Per-prompt figures against raw crops average (6 images per prompt) to the overall one.
    per_raw = report["per_prompt_vs_raw_crops"]
    assert set(per_raw) == {"coffee", "brick"}
    assert abs(sum(per_raw.values()) / 2 - report["accuracy_vs_raw_crops"]) < 1e-12
    ceiling = report["ceiling_per_prompt_vs_raw_crops"]                  # 2 fresh crops per subject
    assert set(ceiling) == {"coffee", "brick"}
    assert abs(sum(ceiling.values()) / 2 - report["ceiling_vs_raw_crops"]) < 1e-12


@pytest.mark.skipif(not (T2I / "v2flow.json").is_file(), reason="the bundled t2i LM is not built yet")
def test_bundled_t2i_is_conditioned_on_its_prompts() -> None:
    """Four subjects unlike each other, every caption, two seeds, the settings of ``v2flow-rt generate``:
    the README's statistic must put each caption's images nearest its own subject (chance: 1 in 4)."""
    from v2flow_rt.llm.t2i import evaluate_conditioning

    t2i = TextToImage.from_pretrained("default", "default", backend="torch", threads=1)
    subjects = {k: SUBJECTS[k] for k in ("coffee", "hubble_deep_field", "brick", "flower")}
    report = evaluate_conditioning(t2i, seeds=(0, 1), settings=GenerationSettings(temperature=0.8, cfg_scale=3.0),
                                   subjects=subjects, per_subject=32)
    assert report["pairs"] == 24 and report["chance"] == 0.25
    assert report["accuracy"] >= 0.75 and report["accuracy_vs_raw_crops"] >= 0.75, report["confusion"]
    assert min(report["per_prompt"].values()) >= 0.5, report["per_prompt"]
