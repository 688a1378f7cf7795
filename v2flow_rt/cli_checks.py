"""The command line's edge: options checked before any work, and the error boundary around a command.

``check_options`` refuses a bad option value (naming the option, the bound and what was given) before a
model is loaded or a file written. ``run_command`` turns what a user can cause and fix (the package's own
errors, an OSError on a path they gave) into one line on stderr and exit status 2, Ctrl-C into one line
and 130; anything else is a bug and keeps its traceback. ``--debug`` (or ``V2FLOW_DEBUG=1``) re-raises.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .engines.base import preserved_float_environment
from .errors import ConfigError, V2FlowError
from .manifest import PRECISIONS
from .sampling.loop import MAX_CFG, MAX_NUM_ITER, MAX_STEPS, MAX_TEMPERATURE, check_float, check_int

TORCH_PRECISIONS = ("fp32", "fp16", "bf16")
TRAINING = ("train", "train-llm")
THREADS_ZERO_OK = ("train", "train-llm", "generate")       # their --threads 0 means the library's default
IMAGE_OUT = ("detokenize", "reconstruct", "generate")      # --out is an image file


def _opt(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(a: argparse.Namespace) -> None:
    """Raise ConfigError naming the first option whose value is out of range or of the wrong form."""
    cmd = a.command
    v = vars(a)

    def ints(name: str, lo: int, hi: int | None = None) -> None:
        if v.get(name) is not None:
            check_int(_opt(name), v[name], lo, hi)

    def floats(name: str, lo: float, hi: float) -> None:
        if v.get(name) is not None:
            check_float(_opt(name), v[name], lo, hi)

    ints("seed", 0, 2 ** 63 - 1)
    if cmd in TRAINING:
        ints("steps", 1)
    else:
        ints("steps", 1, MAX_STEPS)
    ints("num_iter", 1, MAX_NUM_ITER)
    ints("threads", 0 if cmd in THREADS_ZERO_OK else 1)
    for name in ("num", "batch", "batch_size", "repeat", "max_batch", "per_image", "shard_size", "concurrency",
                 "instances", "crops_per_subject"):
        ints(name, 1)
    for name in ("warmup", "tokenizer_steps", "aux_context", "top_k", "queue_delay_us", "exit_timeout"):
        ints(name, 0)
    floats("temperature", 0.0, MAX_TEMPERATURE)     # noise scale; generate: the LM's sampling temperature
    floats("top_p", 1e-6, 1.0)
    floats("decoder_temperature", 0.0, MAX_TEMPERATURE)
    floats("cfg", 0.0, MAX_CFG)
    floats("scale", 1e-3, 1.0)
    floats("lr", 1e-12, 10.0)
    floats("ema_decay", 0.0, 1.0)
    floats("max_minutes", 0.0, 1e7)
    floats("prompt_drop", 0.0, 1.0)
    floats("colour_aug", 0.0, 1.0)
    if cmd == "export":
        _precision_list("--precision", a.precision)
    elif isinstance(v.get("precision"), str) and isinstance(v.get("backend"), str) and cmd != "generate":
        known = TORCH_PRECISIONS if a.backend.startswith("torch") else PRECISIONS
        if a.precision not in known:
            raise ConfigError(f"unknown precision {a.precision!r}; choose one of {', '.join(known)} "
                              f"(backend {a.backend})")
    for name in ("precisions",):
        if isinstance(v.get(name), str) and cmd in ("bench", "demo", "build"):
            _precision_list(_opt(name), v[name])
    if isinstance(v.get("prompt"), str):
        try:
            v["prompt"].encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ConfigError(f"the prompt is not valid UTF-8 text (a stray byte at character {exc.start}); "
                              f"give it as UTF-8") from None
    if cmd == "tokenize":
        _writable_parent("--out", a.out)
    if cmd in IMAGE_OUT:
        _image_out("--out", a.out)
    if cmd == "eval" and a.grid:
        _image_out("--grid", a.grid)


def _precision_list(option: str, text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise ConfigError(f"{option} {text!r} names no precision; choose from {', '.join(PRECISIONS)}")
    bad = [p for p in names if p not in PRECISIONS]
    if bad:
        raise ConfigError(f"{option}: unknown precision(s) {bad}; choose from {', '.join(PRECISIONS)}")
    return names


def _writable_parent(option: str, out: str) -> None:
    """The folder ``out`` would be written into must exist (it is not created) and be writable."""
    target = Path(out)
    parent = target.parent
    if target.is_dir():
        raise ConfigError(f"{option} {out} is a folder; give a file name (.npy or .json)")
    if not parent.exists():
        raise ConfigError(f"{option} {out}: the folder {parent} does not exist")
    if not parent.is_dir():
        raise ConfigError(f"{option} {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {out}: the folder {parent} is not writable")


def _image_out(option: str, out: str) -> None:
    from PIL import Image

    p = Path(out)
    if p.suffix and p.suffix.lower() not in Image.registered_extensions():
        raise ConfigError(f"{option} {out}: unknown image file extension {p.suffix!r}; use e.g. .png")
    if not p.suffix:
        raise ConfigError(f"{option} {out}: no image file extension; use e.g. {out}.png")
    if p.is_dir():
        raise ConfigError(f"{option} {out} is a folder; give an image file name")
    for q in p.parents:
        if q.exists():
            if not q.is_dir():
                raise ConfigError(f"{option} {out}: {q} is a file, not a folder")
            break


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def os_message(exc: OSError) -> str:
    """An OSError as ``PATH: what went wrong`` (both paths of a rename)."""
    what = exc.strerror or _one_line(str(exc)) or type(exc).__name__
    if exc.filename is None:
        return what
    where = os.fsdecode(exc.filename)
    if exc.filename2 is not None:
        where += f" → {os.fsdecode(exc.filename2)}"
    return f"{where}: {what}"


def debug_wanted(a: argparse.Namespace | None) -> bool:
    return bool(getattr(a, "debug", False)) or os.environ.get("V2FLOW_DEBUG", "") not in ("", "0")


def run_command(func: Callable[[Any], int], a: argparse.Namespace) -> int:
    """Run one verb behind the error boundary (see the module docstring); return the exit status."""
    prefix = f"v2flow-rt {a.command}"
    debug = debug_wanted(a)
    try:
        check_options(a)
        with preserved_float_environment():     # a verb may flush denormals; a caller's thread gets it back
            return func(a)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prefix}: interrupted (nothing half-written was left in place)", file=sys.stderr)
        return 130
    except V2FlowError as exc:
        if debug:
            raise
        print(f"{prefix}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        if debug:
            raise
        print(f"{prefix}: error: {os_message(exc)} (--debug shows where)", file=sys.stderr)
        return 2


def add_debug_flag(parser: argparse.ArgumentParser, sub: argparse._SubParsersAction) -> None:
    """``--debug`` before or after the verb: show the full traceback of an error instead of one line."""
    help_text = "show the traceback of an error instead of one line (also V2FLOW_DEBUG=1)"
    parser.add_argument("--debug", action="store_true", help=help_text)
    for p in set(sub.choices.values()):
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=help_text)
