"""Regenerate the bundled tiny base LM at ``v2flow_rt/assets/base_lm`` (run from the repository root).

The weights depend only on the seed; the tokenizer is trained on CPython's ``pydoc_data.topics``, so
regenerate with the same Python minor version to get the same vocabulary.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from v2flow_rt.llm.base_lm import create_base_lm

if __name__ == "__main__":
    out = create_base_lm(Path(__file__).resolve().parents[1] / "v2flow_rt" / "assets" / "base_lm")
    print(f"wrote {out}")
