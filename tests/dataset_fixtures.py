"""Image datasets for the scale-out tests: crops of the built-in photos in mixed sizes and modes, a few
corrupt files, written as a folder tree, as Parquet with an image-bytes column and as WebDataset tars."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# Files in the tree that are not images a decoder can read: each must end up in _errors.
CORRUPT = {"bad/truncated.png": "truncated", "bad/noise.jpg": "noise", "bad/empty.png": "empty",
           "bad/text.jpg": "text"}


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_images(root: Path, n: int = 60, seed: int = 0) -> dict[str, bytes]:
    """``n`` readable images (crops of the bundled photos: RGB/L/RGBA/P/I;16/CMYK, 20-300 px a side, PNG
    and JPEG, in sub-folders) plus ``CORRUPT``; written under ``root``; returns key → file bytes."""
    from v2flow_rt.data import load_photo

    rng = np.random.default_rng(seed)
    photos = [load_photo(name) for name in ("astronaut", "coffee", "chelsea", "rocket")]
    files: dict[str, bytes] = {}
    modes = ["RGB", "L", "RGBA", "P", "I;16", "CMYK"]
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = (int(v) for v in rng.integers(20, 300, size=2))
        y, x = int(rng.integers(0, photo.shape[0] - h)), int(rng.integers(0, photo.shape[1] - w))
        img = Image.fromarray(photo[y:y + h, x:x + w])
        mode = modes[i % len(modes)]
        if mode == "I;16":
            img = Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257)
        elif mode == "RGBA":
            rgba = np.dstack([np.asarray(img), rng.integers(0, 256, size=(h, w), dtype=np.uint8)])
            img = Image.fromarray(rgba, mode="RGBA")
        elif mode != "RGB":
            img = img.convert(mode)
        fmt = "JPEG" if mode in ("RGB", "L", "CMYK") and i % 2 else "PNG"
        files[f"{['photos', 'more/deep', 'misc'][i % 3]}/img_{i:03d}.{fmt.lower().replace('jpeg', 'jpg')}"] = \
            _encode(img, fmt)
    good_png = next(v for k, v in files.items() if k.endswith(".png"))
    files["bad/truncated.png"] = good_png[: len(good_png) // 2]
    files["bad/noise.jpg"] = rng.integers(0, 256, size=3000, dtype=np.uint8).tobytes()
    files["bad/empty.png"] = b""
    files["bad/text.jpg"] = b"this is not an image\n"
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    return files


def write_parquet(files: dict[str, bytes], path: Path, rows_per_group: int = 16) -> None:
    """One Parquet file: ``key`` = the relative path, ``image`` = the bytes (several row groups)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = sorted(files)
    table = pa.table({"key": keys, "image": [files[k] for k in keys], "caption": [f"c{i}" for i in range(len(keys))]})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=rows_per_group)


def write_tars(files: dict[str, bytes], folder: Path, per_tar: int = 25) -> None:
    """WebDataset shards: sample ``{stem}`` = members ``{stem}.{ext}`` and ``{stem}.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(files)
    for t, start in enumerate(range(0, len(keys), per_tar)):
        with tarfile.open(folder / f"shard-{t:03d}.tar", "w") as tar:
            for key in keys[start:start + per_tar]:
                stem, ext = key.rsplit(".", 1)
                for name, data in ((f"{stem}.{ext}", files[key]), (f"{stem}.json", json.dumps({"k": key}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def netns_available() -> bool:
    """Whether this process may run a command in a private network namespace with loopback only."""
    try:
        return subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def in_netns(*argv: str) -> list[str]:
    """``argv`` wrapped to run in a private network namespace (Ray binds only 127.0.0.1 there)."""
    inner = " ".join(f"'{a}'" for a in argv)
    return ["unshare", "-n", "sh", "-c", f"ip link set lo up; exec {inner}"]


def python_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    return env


PYTHON = sys.executable


def kill_session(sid: int) -> None:
    """SIGKILL what is left of the session a test started (Ray's workers outlive a killed driver briefly)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:                 # field 6 of /proc/PID/stat: the session id
            try:
                os.kill(int(stat.parent.name), 9)
            except ProcessLookupError:
                pass
