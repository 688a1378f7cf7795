"""Run ``v2flow-rt`` as an install without the torch extras would: ``python without_torch.py ARGS...``.

torch, transformers, onnx, onnxscript, diffusers and torchvision raise ImportError on import, as they would
where only ``v2flow-rt[llm-ort]`` (numpy, onnxruntime, tokenizers, safetensors) is installed. Exits with
the CLI's code; 3 if one of them got imported anyway (it cannot, but the check keeps the claim honest).
"""

from __future__ import annotations

import importlib.abc
import sys

BLOCKED = ("torch", "transformers", "onnx", "onnxscript", "diffusers", "torchvision")


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: object, target: object = None) -> None:
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"No module named {name!r} (blocked: not installed in this environment)")
        return None


sys.meta_path.insert(0, _Blocker())

from v2flow_rt.cli import main  # noqa: E402  (after the blocker, or the CLI could import them)

code = main(sys.argv[1:])
if any(m.split(".")[0] in BLOCKED for m in sys.modules):
    sys.exit(3)
sys.exit(code)
