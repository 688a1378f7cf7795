"""LLM export: one ONNX graph for prefill and decode, plus fp16 and int8 variants with measured quality.

The graph follows the optimum / onnxruntime-genai convention::

    input_ids [batch, sequence_length] int64, attention_mask [batch, total_sequence_length] int64,
    position_ids [batch, sequence_length] int64,
    past_key_values.{i}.key / .value [batch, kv_heads, past_sequence_length, head_dim] float32
      → logits [batch, sequence_length, vocab], present.{i}.key / .value [batch, kv_heads, total, head_dim]

A thin wrapper takes the flat past tensors and rebuilds a ``transformers.DynamicCache`` inside
``forward``; it is exported with the dynamo exporter at opset 18 (shared/spec/toolchain-facts.md). A
zero-length past makes the same graph the prefill. ``Dim("seq") + Dim("past")`` is rejected by
torch.export, so the mask length gets its own dynamic dim and is renamed afterwards.

Variants: ``fp32`` (``model.onnx``), ``fp16`` (weights and compute fp16, fp32 I/O, onnxruntime's
converter), ``int8`` (``quantize_dynamic``: int8 MatMul weights per channel, activations quantized per
tensor at run time) and ``int8-block`` (``MatMulNBits`` 8-bit weights in blocks of 32, activations
quantized per block: ``accuracy_level=4``). Per-tensor activation scales are coarse for this LM, whose
visual-token distributions are broad (≈3.7 nats), so ``int8`` moves them far more than ``int8-block``
does at about the same speed; both are kept, with their figures. Each variant's quality is measured
against fp32 on a fixed prompt set: free-running visual-token agreement (greedy, and sampled with one
seed: a run diverges for good after its first differing token, so these are harsh), and teacher-forced
on fp32's greedy sequences the mean KL divergence of the visual-token distribution and the top-1
agreement. The figures and file hashes go to
``llm_manifest.json``. Graphs over ~1.8 GB of weights go to one external-data file. Everything is written
into a temporary folder first and moved into place, manifest last.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportError, LLMError, ParityError
from ..fileio import staged_folder
from .generate import (
    GenerationSettings,
    OrtStep,
    PromptEncoder,
    generate_visual_tokens,
    left_pad,
    position_ids_from_mask,
)
from .vocab import VisualVocab, file_sha256

MANIFEST_NAME = "llm_manifest.json"
MANIFEST_FORMAT = "v2flow-rt/llm-onnx"
VARIANT_FILES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8.onnx",
                 "int8-block": "model_int8_block.onnx"}
PRECISIONS = tuple(VARIANT_FILES)
EXTERNAL_DATA_BYTES = 1_800_000_000     # protobuf's 2 GB limit, with headroom for the graph itself
QUALITY_PROMPTS = ("a photo of an astronaut", "a cup of coffee", "a rocket on the launch pad",
                   "a red motorcycle", "deep space full of galaxies", "a field of flowers",
                   "a brick wall", "")
PARITY_ATOL = 1e-3      # fp32 graph vs torch logits: both fp32, differing only in kernel summation order


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(input names, output names) of the LLM graph for ``num_layers`` decoder layers."""
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def _wrapper(model: Any) -> Any:
    """The flat-tensor KV-cache module around a transformers causal LM."""
    import inspect

    import torch
    from transformers import DynamicCache

    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    num_layers = model.config.get_text_config().num_hidden_layers

    class KVCacheLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                    past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(num_layers)],
                                 config=self.lm.config)
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=True, **{cache_arg: cache})
            present = out.cache if hasattr(out, "cache") else out.past_key_values
            flat = [t for layer in present.layers for t in (layer.keys, layer.values)]
            return (out.logits, *flat)

    return KVCacheLM().eval()


def _kv_shape(config: Any) -> tuple[int, int, int]:
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


def _rename_dims(path: Path, num_layers: int, external: bool) -> None:
    """Give the dynamic axes the ecosystem's names (torch.export calls them s53, 'past + seq', …)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names: dict[str, list[str | None]] = {"input_ids": ["batch_size", "sequence_length"],
             "attention_mask": ["batch_size", "total_sequence_length"],
             "position_ids": ["batch_size", "sequence_length"],
             "logits": ["batch_size", "sequence_length", None]}
    for i in range(num_layers):
        for kv in ("key", "value"):
            names[f"past_key_values.{i}.{kv}"] = ["batch_size", None, "past_sequence_length", None]
            names[f"present.{i}.{kv}"] = ["batch_size", None, "total_sequence_length", None]
    for value in [*model.graph.input, *model.graph.output]:
        for dim, name in zip(value.type.tensor_type.shape.dim, names.get(value.name, [])):
            if name is not None and dim.HasField("dim_param"):
                dim.dim_param = name
    if external:  # rewrite the graph only; its tensors keep pointing into the untouched data file
        path.write_bytes(model.SerializeToString())
    else:
        onnx.save(model, str(path))


def _export_fp32(model: Any, path: Path, external: bool, opset: int) -> None:
    import torch
    from torch.export import Dim

    num_layers, kv_heads, head_dim = _kv_shape(model.config)
    inputs, outputs = io_names(num_layers)
    batch, seq, past_len = Dim("batch"), Dim("seq"), Dim("past")
    # example sizes above 1 so torch.export keeps the dims symbolic (0 and 1 are specialised)
    b, t, p = 2, 3, 4
    example = (torch.randint(0, 10, (b, t)), torch.ones(b, p + t, dtype=torch.int64),
               torch.arange(p, p + t).repeat(b, 1),
               [torch.zeros(b, kv_heads, p, head_dim) for _ in range(2 * num_layers)])
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: Dim.DYNAMIC},
              "position_ids": {0: batch, 1: seq}, "past": [{0: batch, 2: past_len}] * (2 * num_layers)}
    try:
        program = torch.onnx.export(_wrapper(model), example, dynamo=True, opset_version=opset,
                                    dynamic_shapes=shapes, input_names=inputs, output_names=outputs,
                                    verbose=False)
        if program is None:
            raise RuntimeError("torch.onnx.export returned no program")
        program.save(str(path), external_data=external)
    except Exception as exc:  # the exporter raises many types; name the stage and keep the cause
        raise ExportError(f"exporting the LLM graph failed: {type(exc).__name__}: {exc}") from exc
    _rename_dims(path, num_layers, external)


def validate_graph(model: Any, path: Path, threads: int = 1, seed: int = 0) -> float:
    """Run prefill (left-padded batch, zero past) and one decode step in torch and ORT; return the max
    abs logits difference, or raise ParityError above ``PARITY_ATOL``."""
    import torch

    from .generate import TorchStep

    rng = np.random.default_rng(seed)
    vocab = model.config.get_text_config().vocab_size
    ids = rng.integers(4, vocab, (2, 5)).astype(np.int64)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=np.int64)
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    ort_step, torch_step = OrtStep.from_file(path, threads), TorchStep(model)
    worst = 0.0
    with torch.inference_mode():
        o_logits, o_past = ort_step(ids, mask, pos, None)
        t_logits, t_past = torch_step(ids, mask, pos, None)
        worst = max(worst, float(np.abs(o_logits - t_logits).max()))
        nxt = rng.integers(4, vocab, (2, 1)).astype(np.int64)
        mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        o_logits, _ = ort_step(nxt, mask2, pos[:, -1:] + 1, o_past)
        t_logits, _ = torch_step(nxt, mask2, pos[:, -1:] + 1, t_past)
        worst = max(worst, float(np.abs(o_logits - t_logits).max()))
    if not worst <= PARITY_ATOL:
        raise ParityError("llm", "logits", worst, worst / (float(np.abs(t_logits).max()) + 1e-12),
                          f"atol {PARITY_ATOL}", "prefill with left padding + one decode step")
    return worst


def _fp16(src: Path, dst: Path, external: bool) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    half = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(half, str(dst), save_as_external_data=external, all_tensors_to_one_file=True,
              location=dst.name + ".data")


def _int8(src: Path, dst: Path, external: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8, use_external_data_format=external)


def _int8_block(src: Path, dst: Path, external: bool) -> None:
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4, bits=8)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=8, block_size=32, is_symmetric=True,
                                     accuracy_level=4, algo_config=config)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=external)


def teacher_forced(reference: OrtStep, other: OrtStep, prompt_ids: list[list[int]], codes: np.ndarray,
                   vocab: VisualVocab) -> dict[str, float]:
    """Feed ``prompt <boi> codes`` to both graphs in one prefill; compare their visual-token distributions
    at the N positions that predict the codes: mean KL(reference ‖ other) in nats and top-1 agreement."""
    seqs = [p + [vocab.boi_id] + [int(c) + vocab.offset for c in row] for p, row in zip(prompt_ids, codes)]
    ids, mask = left_pad(seqs, vocab.pad_id)
    pos = position_ids_from_mask(mask)
    n, lo, hi = codes.shape[1], vocab.offset, vocab.offset + vocab.codebook_size

    def log_probs(step: OrtStep) -> np.ndarray:
        empty = np.zeros((len(seqs), step.heads, 0, step.head_dim), dtype=step.past_dtype)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                 **{name: empty for name in step.past_names}}
        x = step.session.run(["logits"], feeds)[0][:, -n - 1:-1, lo:hi].astype(np.float64)   # (B, N, K)
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    ref, oth = log_probs(reference), log_probs(other)
    kl = float((np.exp(ref) * (ref - oth)).sum(axis=-1).mean())
    return {"kl_nats": kl, "top1_agreement": float((ref.argmax(-1) == oth.argmax(-1)).mean()),
            "reference_entropy_nats": float(-(np.exp(ref) * ref).sum(axis=-1).mean())}


def token_agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Agreement of two code arrays [B, N]: per position, whole images, and up to the first divergence."""
    same = reference == other
    first = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))
    return {"token_agreement": float(same.mean()), "image_exact": float(same.all(axis=1).mean()),
            "mean_tokens_before_divergence": float(first.mean())}


def export_llm(lm_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
               precisions: tuple[str, ...] = PRECISIONS, external_data: bool | None = None,
               prompts: tuple[str, ...] = QUALITY_PROMPTS, opset: int = 18, threads: int = 1) -> Path:
    """Export an expanded LM (``expand_vocabulary`` output) to ONNX; return the manifest path.

    Args:
        lm_dir: the expanded LM folder (with ``v2flow.json``).
        out_dir: the folder for the graphs and ``llm_manifest.json`` (replaced atomically).
        precisions: variants to write; ``fp32`` is always written (the others are derived from it).
        external_data: force (True) or forbid (False) external weights; None: when weights > 1.8 GB.
        prompts: the fixed prompt set the quality figures are measured on (greedy, seed 0).
    Raises:
        LLMError: ``lm_dir`` is not an expanded LM; unknown precision.
        ExportError / ParityError: the export failed, or the fp32 graph disagrees with torch.
    """
    import torch
    from transformers import AutoModelForCausalLM

    unknown = sorted(set(precisions) - set(VARIANT_FILES))
    if unknown:
        raise LLMError(f"unknown precision(s) {unknown}; choose from {sorted(VARIANT_FILES)}")
    lm_path = Path(lm_dir)
    vocab = VisualVocab.from_dir(lm_path)
    model = AutoModelForCausalLM.from_pretrained(lm_path, dtype=torch.float32).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES if external_data is None else external_data

    out = Path(out_dir)
    with staged_folder(out) as tmp:   # swapped into place of out when the block succeeds
        start = time.time()
        _export_fp32(model, tmp / VARIANT_FILES["fp32"], external, opset)
        export_s = time.time() - start
        parity = validate_graph(model, tmp / VARIANT_FILES["fp32"], threads)
        if "fp16" in precisions:
            _fp16(tmp / VARIANT_FILES["fp32"], tmp / VARIANT_FILES["fp16"], external)
        if "int8" in precisions:
            _int8(tmp / VARIANT_FILES["fp32"], tmp / VARIANT_FILES["int8"], external)
        if "int8-block" in precisions:
            _int8_block(tmp / VARIANT_FILES["fp32"], tmp / VARIANT_FILES["int8-block"], external)

        encoder = PromptEncoder(lm_path)
        prompt_ids = encoder(list(prompts))
        greedy, sampled = GenerationSettings(temperature=0.0), GenerationSettings(temperature=1.0)
        fp32 = OrtStep.from_file(tmp / VARIANT_FILES["fp32"], threads)
        refs = [generate_visual_tokens(fp32, prompt_ids, vocab, s, seed=0) for s in (greedy, sampled)]
        variants: dict[str, Any] = {}
        for name in ("fp32", *[p for p in PRECISIONS[1:] if p in precisions]):
            graph = tmp / VARIANT_FILES[name]
            step = OrtStep.from_file(graph, threads)
            codes = [generate_visual_tokens(step, prompt_ids, vocab, s, seed=0) for s in (greedy, sampled)]
            files = sorted(f.name for f in tmp.iterdir() if f.name.startswith(graph.name))
            variants[name] = {"file": graph.name, "files": files,
                              "bytes": sum((tmp / f).stat().st_size for f in files), "sha256": file_sha256(graph),
                              **token_agreement(refs[0], codes[0]),
                              "sampled": token_agreement(refs[1], codes[1]),
                              "teacher_forced": teacher_forced(fp32, step, prompt_ids, refs[0], vocab)}
        num_layers, kv_heads, head_dim = _kv_shape(model.config)
        inputs, outputs = io_names(num_layers)
        manifest = {
            "format": MANIFEST_FORMAT, "version": 1, "opset": opset, "source_lm": str(lm_path),
            "lm_weights_sha256": _weights_sha(lm_path), "visual_vocab": json.loads(vocab.to_json()),
            "num_layers": num_layers, "kv_heads": kv_heads, "head_dim": head_dim, "inputs": inputs,
            "outputs": outputs, "external_data": external, "export_seconds": round(export_s, 1),
            "fp32_vs_torch_max_abs_logit_diff": parity,
            "quality": {"metric": "visual-token agreement with the fp32 graph (greedy; 'sampled': temperature 1, "
                                  "seed 0); 'teacher_forced': on fp32's greedy sequences, mean KL(fp32 || variant) "
                                  "of the visual-token distribution and top-1 agreement", "prompts": list(prompts)},
            "variants": variants,
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out / MANIFEST_NAME


def _weights_sha(lm_path: Path) -> str:
    single = lm_path / "model.safetensors"
    return file_sha256(single) if single.is_file() else ""


def read_manifest(onnx_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``llm_manifest.json`` of an exported folder; LLMError if missing or unreadable."""
    path = Path(onnx_dir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LLMError(f"cannot read the LLM export manifest {str(path)!r}: {exc}") from exc
    if data.get("format") != MANIFEST_FORMAT:
        raise LLMError(f"{str(path)!r} is not an LLM export manifest (format {data.get('format')!r})")
    return data
