"""``V2FlowPipeline``: tokenize / detokenize / reconstruct images on any engine, through the one loop.

Data path (ONNX Runtime): image → codec_encode → tokenizer → ids → token_embed → [sampling loop: for
each masked-AR iteration: mar_step → ode (all solver steps in one call)] → codec_decode → image.
Every backend runs the same numpy loop (``sampling.sample_tokens``) with the same seeded randomness, so
backends differ only by their stage arithmetic.

The ONNX Runtime path imports numpy and onnxruntime only; torch is imported for torch backends.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import V2FlowConfig
from .data import as_rgb, from_model_range, load_image, resize_center_crop
from .engines.base import Engine
from .errors import ArtifactError, BackendUnavailable, ImageError, ShapeError
from .sampling import SamplerSettings, check_noise, check_orders, host_ode, sample_tokens, seeded_randomness
from .stages import BAKED_SAMPLER_FIELDS, baked_sampler, keep_indices

BACKENDS = ("ort", "ort-cuda", "ort-tensorrt", "trt", "torch", "torch-compile", "torch-cudagraph")
ImageInput = str | os.PathLike[str] | np.ndarray


class EngineStages:
    """The sampling loop's stage callables over an engine (numpy in, numpy out)."""

    def __init__(self, engine: Engine, config: V2FlowConfig, fake_latent: np.ndarray) -> None:
        self.engine, self.config = engine, config
        self.fake_latent = np.asarray(fake_latent, dtype=np.float32).reshape(-1)

    def mar_step(self, tokens: np.ndarray, mask: np.ndarray, buffer: np.ndarray) -> np.ndarray:
        keep = keep_indices(mask, self.config.buffer_size)          # only known tokens enter the encoder
        return self.engine.run("mar_step", {"tokens": tokens, "buffer": buffer, "keep_idx": keep})["z"]

    def velocity(self, x: np.ndarray, t: np.ndarray, c: np.ndarray) -> np.ndarray:
        return self.engine.run("velocity", {"x": x, "t": t, "c": c})["v"]

    def ode_for(self, settings: SamplerSettings) -> Any:
        """The fused ODE graph when its baked solver/steps/shift match ``settings``, else the host solver."""
        spec = self.engine.specs.get("ode")
        fused = spec is not None and (spec.attrs.get("solver"), spec.attrs.get("steps"),
                                      float(spec.attrs.get("shift", -1))) == (settings.solver, settings.steps,
                                                                              float(settings.shift))
        if not fused:
            return host_ode(self.velocity, settings)
        has_cfg = self.engine.has("ode_cfg")

        def ode(noise: np.ndarray, z: np.ndarray, z_uncond: np.ndarray | None, scale: float) -> np.ndarray:
            if z_uncond is None:
                return self.engine.run("ode", {"noise": noise, "z": z})["x0"]
            if not has_cfg:
                return host_ode(self.velocity, settings)(noise, z, z_uncond, scale)
            feeds = {"noise": noise, "z": z, "z_uncond": np.ascontiguousarray(z_uncond, dtype=np.float32),
                     "cfg_scale": np.array([scale], dtype=np.float32)}
            return self.engine.run("ode_cfg", feeds)["x0"]
        return ode


class V2FlowPipeline:
    """Tokenize, detokenize and reconstruct on one engine. Build with ``from_pretrained``."""

    def __init__(self, engine: Engine, config: V2FlowConfig, fake_latent: np.ndarray, max_batch: int = 16) -> None:
        self.engine, self.config, self.max_batch = engine, config, max_batch
        self.stages = EngineStages(engine, config, fake_latent)
        # Either path serves each verb: the one-call graph, or the stages the loop runs.
        needed = [] if engine.has("tokenize") else ["codec_encode", "tokenizer"]
        needed += [] if engine.has("detokenize") else ["token_embed", "mar_step", "codec_decode"]
        for stage in needed:
            if not engine.has(stage):
                hint = ""
                if stage.startswith("codec") and config.codec == "dcae":
                    hint = ("; the model's DC-AE codec was not available when this was built: record one with "
                            "`v2flow-rt import-official ... --codec DIR` (or export with --codec DIR)")
                raise ArtifactError(f"{engine.describe()} lacks stage {stage!r} (has {engine.stage_names}){hint}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], backend: str = "ort", precision: str = "fp32",
                        threads: int | None = None, device: str | None = None, **engine_kwargs: Any) -> V2FlowPipeline:
        """``path``: an export folder (``manifest.json``) for ort/trt backends; for torch backends, a model
        folder, ``"default"``, or an export folder (its source checkpoint is used)."""
        if backend not in BACKENDS:
            raise BackendUnavailable(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        folder = Path(path)
        if backend.startswith("torch"):
            return cls._torch(path, backend, precision, threads, device, **engine_kwargs)
        if not (folder / "manifest.json").is_file():
            raise ArtifactError(f"{path} is not an export folder (no manifest.json); run "
                                f"`v2flow-rt export {path} --out DIR` first, or use backend='torch'")
        engine: Engine
        if backend == "trt":
            from .engines.trt import TrtEngine
            engine = TrtEngine(folder, precision, **engine_kwargs)
        else:
            from .engines.ort import OrtEngine
            provider = {"ort": "cpu", "ort-cuda": "cuda", "ort-tensorrt": "tensorrt"}[backend]
            engine = OrtEngine(folder, precision, provider=provider, threads=threads, **engine_kwargs)
        manifest = engine.manifest
        return cls(engine, manifest.config, manifest.fake_latent, int(manifest.stage_options.get("max_batch", 16)))

    @classmethod
    def _torch(cls, path: str | os.PathLike[str], backend: str, precision: str, threads: int | None,
               device: str | None, **engine_kwargs: Any) -> V2FlowPipeline:
        try:
            from .engines.torch import TorchEngine
            from .reference.checkpoint import from_pretrained
        except ImportError as exc:
            raise BackendUnavailable("torch backends need torch: pip install 'v2flow-rt[torch]'") from exc
        source: str | os.PathLike[str] = path
        manifest_path = Path(path) / "manifest.json"
        if manifest_path.is_file():
            source = json.loads(manifest_path.read_text()).get("source_checkpoint") or ""
            if not source or not Path(source).exists():
                raise ArtifactError(f"{path} records no reachable source checkpoint ({source!r}); pass the model "
                                    f"folder itself for a torch backend")
        model = from_pretrained(str(source))
        mode = {"torch": "eager", "torch-compile": "compile", "torch-cudagraph": "cudagraph"}[backend]
        engine = TorchEngine(model, mode=mode, device=device, precision=precision, threads=threads, **engine_kwargs)
        fake = model.fake_latent.detach().float().cpu().numpy()
        return cls(engine, model.config, fake, engine_kwargs.get("max_batch", 16))

    # ------------------------------------------------------------------ images
    def prepare(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Paths or arrays → float32 [B, 3, S, S] in [-1, 1] (center-cropped and resized to the model size).

        Accepts a path, a uint8 image [H, W], [H, W, 3|4], a batch [B, H, W, 3], a list of any of these,
        or float32 [B, 3, S, S] already in [-1, 1]. Anything else raises ImageError.
        """
        size = self.config.img_size
        if isinstance(images, np.ndarray) and images.dtype.kind == "f":
            if images.ndim != 4 or images.shape[1:] != (3, size, size):
                raise ImageError(f"float images must be [B, 3, {size}, {size}] in [-1, 1] (or pass uint8 pixels "
                                 f"[H, W, 3]), got {images.dtype} {images.shape}")
            if not np.isfinite(images).all() or np.abs(images).max() > 1.0 + 1e-4:
                raise ImageError("float images must be finite and within [-1, 1]")
            return images.astype(np.float32)
        if isinstance(images, np.ndarray) and images.ndim == 4:
            items: list[Any] = list(images)
        elif isinstance(images, (str, os.PathLike, np.ndarray)):
            items = [images]
        else:
            items = list(images)
        if not items:
            raise ImageError("no images given")
        out = []
        for i, item in enumerate(items):
            if isinstance(item, (str, os.PathLike)):
                rgb = load_image(item)
            else:
                rgb = as_rgb(item, what=f"image {i}")
            out.append(resize_center_crop(rgb, size))
        batch = np.stack(out).transpose(0, 3, 1, 2).astype(np.float32)
        return batch / np.float32(127.5) - np.float32(1.0)

    # ------------------------------------------------------------------ the three verbs
    def _chunks(self, n: int) -> list[slice]:
        return [slice(i, min(n, i + self.max_batch)) for i in range(0, n, self.max_batch)]

    def tokenize(self, images: ImageInput | Sequence[ImageInput], one_call: bool | None = None) -> np.ndarray:
        """Images → visual token ids int64 [B, N] (deterministic).

        ``one_call``: None uses the one-call ``tokenize`` graph when the engine has it (the same ids as the
        stage path: ``validate`` checks it), False the codec_encode + tokenizer stages, True requires it.
        """
        x = self.prepare(images)
        fused = self._use_one_call("tokenize", one_call)
        ids = []
        for part in self._chunks(len(x)):
            if fused:
                ids.append(self.engine.run("tokenize", {"images": x[part]})["ids"])
                continue
            latent = self.engine.run("codec_encode", {"images": x[part]})["latent"]
            ids.append(self.engine.run("tokenizer", {"latent": latent})["ids"])
        return np.concatenate(ids).astype(np.int64)

    def serves_in_one_call(self, stage: str, settings: SamplerSettings | None = None) -> bool:
        """Whether ``tokenize`` / ``detokenize`` (with ``settings``) would run as one call of its graph."""
        return self._use_one_call(stage, None, settings)

    def _use_one_call(self, stage: str, wanted: bool | None, settings: SamplerSettings | None = None) -> bool:
        """Whether a one-call graph serves this request: it exists and (detokenize) bakes ``settings``."""
        if wanted is False:
            return False
        why = ""
        if not self.engine.has(stage):
            why = f"{self.engine.describe()} has no one-call {stage!r} graph"
        elif settings is not None:
            attrs = self.engine.spec(stage).attrs
            baked = {k: attrs.get(k) for k in BAKED_SAMPLER_FIELDS}
            asked = baked_sampler(settings)
            if baked != asked:
                diff = {k: (baked[k], asked[k]) for k in BAKED_SAMPLER_FIELDS if baked[k] != asked[k]}
                why = f"its baked settings differ from the request (baked, asked): {diff}"
        if why and wanted:
            raise ArtifactError(f"one_call=True, but {why}")
        return not why

    def detokenize(self, ids: np.ndarray, steps: int | None = None, solver: str | None = None,
                   cfg: float | None = None, seed: int | None = 0, temperature: float | None = None,
                   num_iter: int | None = None, cfg_mode: str | None = None, output: str = "uint8",
                   orders: np.ndarray | None = None, noise: np.ndarray | None = None,
                   one_call: bool | None = None) -> np.ndarray:
        """ids [B, N] → images uint8 [B, S, S, 3] (or float [B, 3, S, S] in [-1, 1] with output='float').

        Randomness: ``seed`` (each chunk of ``max_batch`` images starting at image i is seeded ``seed + i``),
        or explicit ``orders`` int64 [B, N] (a permutation per row) and ``noise`` float32 [B, N, C] (each
        token's standard-normal initial noise), as ``sampling.sample_tokens`` takes them; either one
        replaces what the seed would draw. ``sampling.seeded_randomness`` gives what a seed stands for.

        ``one_call``: None decodes each chunk with one call of the ``detokenize`` graph when the engine has
        one baked with exactly these settings (``stages.BAKED_SAMPLER_FIELDS``), else through the loop;
        False always loops; True requires the graph (ArtifactError naming the difference otherwise). Both
        paths take their orders and noise from the same seeded generator, so the result does not depend
        on which one ran (to floating-point rounding).
        """
        ids = np.asarray(ids)
        n, k = self.config.num_tokens, self.config.codebook_size
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] != n or ids.dtype.kind not in "iu":
            raise ShapeError(f"ids must be integers [B, {n}], got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= k):
            raise ShapeError(f"ids must be in [0, {k}), got range [{ids.min()}, {ids.max()}]")
        settings = SamplerSettings.from_config(self.config, steps=steps, solver=solver, cfg_scale=cfg,
                                               temperature=temperature, num_iter=num_iter, cfg_mode=cfg_mode)
        if orders is not None:
            check_orders(orders, len(ids), n)
        if noise is not None:
            check_noise(noise, len(ids), n, self.config.token_dim)
        fused = self._use_one_call("detokenize", one_call, settings)
        if not fused and not self.engine.has("mar_step"):
            self._use_one_call("detokenize", True, settings)     # no loop stages: say why the graph cannot serve
        ode = self.stages.ode_for(settings)
        images = []
        for part in self._chunks(len(ids)):
            chunk_seed = None if seed is None else seed + part.start
            if fused:
                feeds = self._one_call_feeds(ids[part], settings, chunk_seed, orders, noise, part)
                images.append(self.engine.run("detokenize", feeds)["images"])
                continue
            buffer = self.engine.run("token_embed", {"ids": ids[part].astype(np.int64)})["buffer"]
            tokens = sample_tokens(self.stages, buffer, settings, chunk_seed, token_dim=self.config.token_dim, ode=ode,
                                   orders=None if orders is None else orders[part],
                                   noise=None if noise is None else noise[part])
            g = self.config.grid_size
            latent = np.ascontiguousarray(tokens.transpose(0, 2, 1).reshape(len(tokens), -1, g, g))
            images.append(self.engine.run("codec_decode", {"latent": latent})["images"])
        out = np.clip(np.concatenate(images), -1.0, 1.0)
        return out if output == "float" else from_model_range(out)

    def _one_call_feeds(self, ids: np.ndarray, settings: SamplerSettings, seed: int | None,
                        orders: np.ndarray | None, noise: np.ndarray | None, part: slice) -> dict[str, np.ndarray]:
        """The detokenize graph's inputs for one chunk: the caller's orders / noise, or the seed's."""
        cfg = self.config
        if orders is None or noise is None:
            drawn = seeded_randomness(seed, len(ids), cfg.num_tokens, cfg.token_dim, settings.num_iter)
        feeds = {"ids": np.ascontiguousarray(ids, dtype=np.int64),
                 "orders": np.ascontiguousarray(drawn[0] if orders is None else orders[part]),
                 "noise": np.ascontiguousarray(drawn[1] if noise is None else noise[part])}
        if settings.guided:
            feeds["cfg_scale"] = np.array([settings.cfg_scale], dtype=np.float32)
        return feeds

    def reconstruct(self, images: ImageInput | Sequence[ImageInput], one_call: bool | None = None,
                    **sampling: Any) -> np.ndarray:
        """Images → tokens → images (uint8 [B, S, S, 3]); ``one_call`` for both halves and ``sampling`` as for
        ``tokenize`` and ``detokenize``."""
        return self.detokenize(self.tokenize(images, one_call=one_call), one_call=one_call, **sampling)
