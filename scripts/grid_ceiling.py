"""How much more than the grid baseline can one discrete code per token carry, at a given geometry?

The default model is judged against the grid baseline (each token's cell reduced to its mean colour,
enlarged back bilinearly). This script measures, on the same held-out crops and without any V2Flow
training, what simple codecs with the same number of codes reach:

- ``kmeans``: every cell replaced by the nearest of K k-means centroids fitted on training-photo cells
  (PCA to ``--pca`` dims first, so the fit takes seconds), i.e. the best context-free per-token lookup;
- ``kmeans_context``: each cell predicted by ridge regression from the centroids of its 3×3 neighbour
  cells, a linear stand-in for a decoder that looks at the other tokens;
- ``pca``: the PCA truncation alone (the ceiling of the lookups above).

It prints one JSON object per geometry (image side, cell side, crop scale, K), the figures in dB.

    python scripts/grid_ceiling.py --geometry 64:8:0.5 64:16:0.5 128:32:0.5 --codes 4096
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from v2flow_rt.data import HELDOUT_PHOTOS, TRAIN_PHOTOS, CropSampler, eval_crops, load_photo  # noqa: E402
from v2flow_rt.metrics import grid_baseline, psnr  # noqa: E402


def cells(x: np.ndarray, p: int) -> np.ndarray:
    """[B, C, H, W] -> [B, H/p, W/p, C·p·p] (one row per token cell)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, h // p, w // p, c * p * p)


def uncells(v: np.ndarray, p: int) -> np.ndarray:
    """Inverse of ``cells``: [B, g, g, C·p·p] -> [B, C, g·p, g·p]."""
    b, g, _, d = v.shape
    c = d // (p * p)
    return v.reshape(b, g, g, c, p, p).transpose(0, 3, 1, 4, 2, 5).reshape(b, c, g * p, g * p)


def neighbourhood(codes: np.ndarray) -> np.ndarray:
    """[B, g, g, D] -> [B·g·g, 9·D]: each cell's 3×3 neighbours (edges repeated), row-major."""
    b, g, _, d = codes.shape
    pad = np.pad(codes, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    return np.concatenate([pad[:, dy:dy + g, dx:dx + g] for dy in range(3) for dx in range(3)], -1).reshape(-1, 9 * d)


def measure(size: int, p: int, scale: float, k: int, pca_dims: int, samples: int, seed: int) -> dict:
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge

    start = time.time()
    g = size // p
    sampler = CropSampler([load_photo(n) for n in TRAIN_PHOTOS], size, scales=(scale,))
    n_crops = max(samples // (g * g), 64)
    fit, fit2 = (sampler.sample(n_crops, np.random.default_rng(seed + i)) for i in (0, 1))
    held = eval_crops(HELDOUT_PHOTOS, size, per_image=8, scale=scale)
    pca = PCA(pca_dims, random_state=seed).fit(cells(fit, p).reshape(-1, 3 * p * p))
    km = MiniBatchKMeans(k, batch_size=4096, n_init=1, max_iter=20, random_state=seed)
    km.fit(pca.transform(cells(fit, p).reshape(-1, 3 * p * p)))

    def code_vectors(x: np.ndarray) -> np.ndarray:          # (B, g, g, pca_dims)
        flat = pca.transform(cells(x, p).reshape(-1, 3 * p * p))
        return km.cluster_centers_[km.predict(flat)].reshape(x.shape[0], g, g, -1)

    def lookup(x: np.ndarray) -> np.ndarray:
        return uncells(pca.inverse_transform(code_vectors(x).reshape(-1, pca_dims)).reshape(x.shape[0], g, g, -1), p)

    ridge = Ridge(alpha=1.0).fit(neighbourhood(code_vectors(fit2)), cells(fit2, p).reshape(-1, 3 * p * p))
    context = uncells(ridge.predict(neighbourhood(code_vectors(held))).reshape(held.shape[0], g, g, -1), p)
    truncated = uncells(pca.inverse_transform(pca.transform(cells(held, p).reshape(-1, 3 * p * p)))
                        .reshape(held.shape[0], g, g, -1), p)
    base = psnr(grid_baseline(held, g), held, 2.0)
    out = {"image": size, "cell": p, "tokens": g * g, "crop_scale": scale, "codes": k, "pca_dims": pca_dims,
           "grid_baseline_psnr": base, "grid_baseline_nearest_psnr": psnr(grid_baseline(held, g, "nearest"), held, 2.0),
           "kmeans_psnr": psnr(lookup(held), held, 2.0), "kmeans_context_psnr": psnr(context, held, 2.0),
           "pca_psnr": psnr(truncated, held, 2.0)}
    out = {key: round(v, 2) if isinstance(v, float) else v for key, v in out.items()}
    out["kmeans_context_gain_db"] = round(out["kmeans_context_psnr"] - out["grid_baseline_psnr"], 2)
    out["seconds"] = round(time.time() - start, 1)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--geometry", nargs="+", default=["64:8:0.5", "64:16:0.5", "128:32:0.5"],
                        help="IMAGE:CELL:CROP_SCALE, e.g. 64:8:0.5 (the tiny preset)")
    parser.add_argument("--codes", type=int, nargs="+", default=[4096])
    parser.add_argument("--pca", type=int, default=64)
    parser.add_argument("--samples", type=int, default=40000, help="training cells for each fit")
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    results = []
    for geometry in a.geometry:
        try:
            size, p, scale = (f(v) for f, v in zip((int, int, float), geometry.split(":"), strict=True))
        except ValueError:
            parser.error(f"--geometry {geometry!r}: expected IMAGE:CELL:CROP_SCALE, e.g. 64:8:0.5")
        if size % p:
            parser.error(f"--geometry {geometry!r}: the image side must be a multiple of the cell side")
        for k in a.codes:
            results.append(measure(size, p, scale, k, a.pca, a.samples, a.seed))
            print(json.dumps(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    main()
