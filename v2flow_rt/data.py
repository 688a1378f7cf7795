"""Built-in photos, image I/O and the crops the model trains and is evaluated on.

The photos are real images that ship inside pip packages (scikit-image, scikit-learn, matplotlib,
PyWavelets: the ``[data]`` extra), so training and evaluation need no download; ``procedural`` adds
seeded images for the colours the photos lack. Only numpy and pillow are imported at module load; the
package that holds a photo is located when that photo is first asked for.

Array conventions: an image is ``uint8 [H, W, 3]`` RGB; a model batch is ``float32 [B, 3, H, W]`` in
``[-1, 1]``.
"""

from __future__ import annotations

import importlib.util
import io
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from . import procedural
from .colour import ColourJitter
from .errors import ImageError, ShapeError
from .fileio import atomic_write

# name -> (package, file inside that package's sample-data folder). Licences as the packages state them
# (their loaders' docstrings): scikit-image's photos are CC0 or public domain ("no known copyright
# restrictions" for coins); scikit-learn's china and flower are CC BY 2.0 (sklearn/datasets/images/
# README.txt); matplotlib's grace_hopper is a US Navy photo (public domain); PyWavelets' ascent is from
# public-domain-image.com. Grayscale ones are returned as RGB.
PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut": ("skimage", "astronaut.png"),
    "coffee": ("skimage", "coffee.png"),
    "chelsea": ("skimage", "chelsea.png"),
    "rocket": ("skimage", "rocket.jpg"),
    "motorcycle_left": ("skimage", "motorcycle_left.png"),
    "motorcycle_right": ("skimage", "motorcycle_right.png"),
    "hubble_deep_field": ("skimage", "hubble_deep_field.jpg"),
    "retina": ("skimage", "retina.jpg"),
    "ihc": ("skimage", "ihc.png"),
    "camera": ("skimage", "camera.png"),        # grayscale
    "brick": ("skimage", "brick.png"),          # grayscale
    "grass": ("skimage", "grass.png"),          # grayscale
    "gravel": ("skimage", "gravel.png"),        # grayscale
    "cell": ("skimage", "cell.png"),            # grayscale, a cell in saline (CC0)
    "clock": ("skimage", "clock_motion.png"),   # grayscale, a motion-blurred wall clock (public domain)
    "coins": ("skimage", "coins.png"),          # grayscale, Greek coins from Pompeii
    "moon": ("skimage", "moon.png"),            # grayscale, the moon's surface
    "china": ("sklearn", "china.jpg"),
    "flower": ("sklearn", "flower.jpg"),
    "grace_hopper": ("matplotlib", "grace_hopper.jpg"),
    "ascent": ("pywt", "ascent.npz"),           # grayscale, people on a staircase
}
# Left out on purpose: scikit-image's microaneurysms (102 px), page and text (under 200 px tall, scanned
# text), color/logo/horse/chessboard (graphics, not photos), lfw_subset (25 px faces); PyWavelets' camera
# (= scikit-image's) and aero (no licence stated); matplotlib's other images (logos, clip art, data);
# mahotas' demo images (one is a copyrighted illustration, the others state no licence). Colours no
# photo has come from ``procedural`` instead.

# Never used in training: the held-out evaluation measures generalisation, not memorisation.
HELDOUT_PHOTOS: tuple[str, ...] = ("chelsea", "grace_hopper")
TRAIN_PHOTOS: tuple[str, ...] = tuple(n for n in PHOTOS if n not in HELDOUT_PHOTOS)
#: What ``train`` uses by default: the training photos and the procedural images.
TRAIN_IMAGES: tuple[str, ...] = TRAIN_PHOTOS + tuple(procedural.IMAGES)

_PIP_NAMES = {"skimage": "scikit-image", "sklearn": "scikit-learn", "matplotlib": "matplotlib",
              "pywt": "PyWavelets"}
# What PIL raises on a truncated or corrupt file differs by format and decoder.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


# ----------------------------------------------------------------------------- photos

def _photo_path(package: str, file: str) -> str:
    """The path of ``file`` in ``package``'s bundled sample data; ImageError if not installed."""
    if package not in _PIP_NAMES:
        raise ImageError(f"unknown photo package {package!r}; expected one of {sorted(_PIP_NAMES)}")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.submodule_search_locations is None:
        raise ImageError(f"photo file {file!r} ships with {_PIP_NAMES[package]}, which is not "
                         f"installed (pip install {_PIP_NAMES[package]})")
    if package == "skimage":
        import skimage.data

        return os.path.join(os.path.dirname(skimage.data.__file__), file)
    if package == "sklearn":
        # The folder sklearn.datasets.load_sample_images() reads. Importing sklearn.datasets costs
        # ~2 s (it pulls in scipy), so find the folder from the package's location instead.
        return os.path.join(next(iter(spec.submodule_search_locations)), "datasets", "images", file)
    if package == "pywt":   # its data folder, found without importing pywt
        return os.path.join(next(iter(spec.submodule_search_locations)), "data", file)
    import matplotlib.cbook  # package == "matplotlib"

    return str(matplotlib.cbook.get_sample_data(file, asfileobj=False))


def load_photo(name: str) -> np.ndarray:
    """Load a built-in photo by name (a key of ``PHOTOS``) or a procedural image (``procedural.IMAGES``).

    Returns uint8 [H, W, 3] RGB (the grayscale photos are repeated over three channels).
    Raises ImageError for an unknown name (listing the known ones) or a missing package.
    """
    if name in procedural.IMAGES:
        return procedural.make(name)
    if name not in PHOTOS:
        raise ImageError(f"unknown photo {name!r}; known photos: {', '.join(PHOTOS)}; "
                         f"procedural images: {', '.join(procedural.IMAGES)}")
    package, file = PHOTOS[name]
    path = _photo_path(package, file)
    if file.endswith(".npz"):   # PyWavelets keeps its images as uint8 [H, W] arrays
        try:
            with np.load(path) as arrays:
                return as_rgb(arrays["data"], f"photo {name!r}")
        except (OSError, KeyError, ValueError) as e:
            raise ImageError(f"{path}: cannot read photo {name!r} ({e})") from e
    return load_image(path)


# ----------------------------------------------------------------------------- reading

def _to_rgb(im: Image.Image, path: str) -> np.ndarray:
    """Convert a decoded PIL image of any common mode to uint8 [H, W, 3] RGB."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale (PNG/TIFF). PIL's own convert("L") clips at 255 instead of scaling, which
        # turns most 16-bit images white; map 0..65535 linearly onto 0..255 instead.
        arr = np.asarray(im).astype(np.float64)
        gray = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        raise ImageError(f"{path}: floating-point image (mode 'F') has no fixed value range; "
                         f"expected an 8-bit or 16-bit image")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        # Composite onto white: a transparent background is meant to be invisible, and black
        # (what dropping alpha gives for most files) would read as content.
        rgba = np.asarray(im.convert("RGBA")).astype(np.float64)  # [H, W, 4]
        alpha = rgba[:, :, 3:] / 255.0
        rgb = rgba[:, :, :3] * alpha + 255.0 * (1.0 - alpha)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    if mode != "RGB":
        try:
            im = im.convert("RGB")
        except ValueError as e:
            raise ImageError(f"{path}: cannot convert image mode {mode!r} to RGB ({e})") from e
    return np.asarray(im, dtype=np.uint8).copy()


def load_image(path: str | os.PathLike[str], min_size: int = 1) -> np.ndarray:
    """Read any PIL-readable image file as uint8 [H, W, 3] RGB.

    Modes are converted: L/1/P/CMYK/YCbCr via PIL, alpha (RGBA, LA, P with transparency) composited
    onto white, 16-bit grayscale scaled to 8 bit. The EXIF orientation is applied, so a phone photo
    comes out the way it is displayed. Multi-frame files give their first frame.

    Raises ImageError naming the path for a missing file, a directory, a non-image, a truncated or
    corrupt file, an unconvertible mode, or an image whose shorter side is under ``min_size``.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise ImageError(f"{p}: no such file")
    if os.path.isdir(p):
        raise ImageError(f"{p}: is a directory, expected an image file")
    return _decode(p, p, min_size)


def decode_image(data: bytes, name: str, min_size: int = 1) -> np.ndarray:
    """``load_image`` for the bytes of an image file (a Parquet cell, a tar member); ``name`` is what
    errors call it. Raises ImageError as ``load_image`` does."""
    return _decode(io.BytesIO(data), name, min_size)


def _decode(source: str | io.BytesIO, name: str, min_size: int) -> np.ndarray:
    try:
        with Image.open(source) as f:
            f.load()  # decode now: a truncated file fails here, not later in a worker
            arr = _to_rgb(ImageOps.exif_transpose(f), name)
    except ImageError:
        raise
    except Image.UnidentifiedImageError as e:
        raise ImageError(f"{name}: not an image file PIL can read") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: image too large to decode safely ({e})") from e
    except _DECODE_ERRORS as e:
        raise ImageError(f"{name}: truncated or corrupt image ({type(e).__name__}: {e})") from e
    h, w = arr.shape[:2]
    if min(h, w) < min_size:
        raise ImageError(f"{name}: image is {w}x{h} pixels, expected both sides >= {min_size}")
    return arr


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def image_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files as given, folders expanded to the image files directly inside them (sorted by name).

    Raises ImageError for a path that does not exist or a folder without image files.
    """
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ImageError(f"{path}: folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        elif path.exists():
            out.append(path)
        else:
            raise ImageError(f"{path}: no such file or folder")
    return out


# ----------------------------------------------------------------------------- conversions

def as_rgb(img: np.ndarray, what: str = "image") -> np.ndarray:
    """An in-memory image of any common layout → uint8 [H, W, 3] RGB.

    Accepts uint8 or uint16 arrays [H, W] (grayscale), [H, W, 1], [H, W, 3] or [H, W, 4] (alpha is
    composited onto white, as for files). Anything else raises ImageError naming ``what``.
    """
    arr = np.asarray(img)
    if arr.dtype == np.uint16:
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
    if arr.dtype != np.uint8:
        raise ImageError(f"{what}: expected uint8 (or uint16) pixel values, got {arr.dtype}; float images "
                         f"must be [B, 3, H, W] in [-1, 1]")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or min(arr.shape[:2]) < 1:
        raise ImageError(f"{what}: expected [H, W], [H, W, 3] or [H, W, 4] pixels, got shape {arr.shape}")
    if arr.shape[2] == 4:
        return _to_rgb(Image.fromarray(arr, mode="RGBA"), what)
    return np.ascontiguousarray(arr)


def _check_image(img: np.ndarray, what: str) -> np.ndarray:
    """Return ``img`` as an ndarray after checking it is uint8 [H, W, 3]; ShapeError otherwise."""
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ShapeError(f"{what}: expected a uint8 [H, W, 3] image, got {arr.dtype} {arr.shape}")
    return arr


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] or [H, W, 3] -> float32 [B, 3, H, W] in [-1, 1] (0 -> -1, 255 -> 1)."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] != 3:
        raise ShapeError(f"to_model_range: expected uint8 [B, H, W, 3] or [H, W, 3], "
                         f"got {np.asarray(images).dtype} {np.asarray(images).shape}")
    x = arr.transpose(0, 3, 1, 2).astype(np.float32)  # [B, 3, H, W]
    return x / np.float32(127.5) - np.float32(1.0)


def from_model_range(x: np.ndarray) -> np.ndarray:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] (clipped, rounded to nearest).

    Accepts anything ``np.asarray`` takes (a CPU torch tensor without grad works). Raises ShapeError
    for another layout and ImageError if the batch holds NaN or inf (a bug upstream, not an image).
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise ShapeError(f"from_model_range: expected float [B, 3, H, W], got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ImageError(f"from_model_range: batch has {int((~np.isfinite(arr)).sum())} "
                         f"non-finite values")
    u8 = np.clip(np.rint((arr + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(u8.transpose(0, 2, 3, 1))  # [B, H, W, 3]


def _downscale(img: np.ndarray, scale: float) -> np.ndarray:
    """Resize uint8 [H, W, 3] by ``scale`` (PIL BICUBIC, which antialiases when shrinking)."""
    if scale == 1.0:
        return img
    h, w = img.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(img).resize(size, resample=Image.Resampling.BICUBIC))


def resize_center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """ADM's ``center_crop_arr``: uint8 [H, W, 3] -> uint8 [size, size, 3].

    While the shorter side is at least ``2 * size`` the image is halved with BOX filtering (as ADM
    does, ``>=``), then resized with BICUBIC so the shorter side equals ``size``, then center-cropped.
    """
    arr = _check_image(img, "resize_center_crop")
    if size < 1:
        raise ShapeError(f"resize_center_crop: size must be >= 1, got {size}")
    pil = Image.fromarray(arr)
    while min(pil.size) >= 2 * size:
        pil = pil.resize((pil.width // 2, pil.height // 2), resample=Image.Resampling.BOX)
    k = size / min(pil.size)
    pil = pil.resize((round(pil.width * k), round(pil.height * k)), resample=Image.Resampling.BICUBIC)
    out = np.asarray(pil)
    y = (out.shape[0] - size) // 2
    x = (out.shape[1] - size) // 2
    return np.ascontiguousarray(out[y:y + size, x:x + size])


# ----------------------------------------------------------------------------- crops

class CropSampler:
    """Random training crops from a fixed set of photos, with the downscaled copies cached.

    Each crop picks a random image, then a random scale among those at which that image is still at
    least ``size`` pixels on both sides (scales too small for an image are skipped for it), then a
    random position and, if ``flip``, a random horizontal flip. Sampling after construction is pure
    numpy slicing, so it is cheap enough to call every training step. ``colour`` (a
    ``colour.ColourJitter``) then recolours some of the crops.

    Raises ShapeError for a non-image input or bad size/scales, ImageError for an image too small
    for ``size`` at every scale.
    """

    def __init__(self, images: Sequence[np.ndarray], size: int,
                 scales: Sequence[float] = (1.0, 0.5, 0.25), flip: bool = True,
                 colour: ColourJitter | None = None) -> None:
        if len(images) == 0:
            raise ShapeError("CropSampler: expected at least one image, got none")
        if size < 1:
            raise ShapeError(f"CropSampler: size must be >= 1, got {size}")
        if len(scales) == 0 or any(not 0.0 < s <= 1.0 for s in scales):
            raise ShapeError(f"CropSampler: scales must be a non-empty list in (0, 1], got {scales}")
        self.size = size
        self.scales = tuple(float(s) for s in scales)
        self.flip = flip
        self.colour = colour
        # levels[i] = downscaled copies of image i (uint8 [h, w, 3]) large enough for a crop
        self.levels: list[list[np.ndarray]] = []
        for i, img in enumerate(images):
            arr = _check_image(img, f"CropSampler image {i}")
            level = [d for d in (_downscale(arr, s) for s in self.scales)
                     if d.shape[0] >= size and d.shape[1] >= size]
            if not level:
                raise ImageError(f"CropSampler image {i}: {arr.shape[1]}x{arr.shape[0]} pixels is "
                                 f"smaller than a {size}x{size} crop at every scale {self.scales}")
            self.levels.append(level)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Draw ``n`` crops -> float32 [n, 3, size, size] in [-1, 1]; same rng state, same crops."""
        s = self.size
        # One vectorised draw per decision: reproducible and independent of how levels are laid out.
        img_idx = rng.integers(0, len(self.levels), size=n)
        u_scale, u_y, u_x = rng.random(n), rng.random(n), rng.random(n)
        flips = rng.random(n) < 0.5 if self.flip else np.zeros(n, dtype=bool)
        out = np.empty((n, s, s, 3), dtype=np.uint8)
        for k in range(n):
            level = self.levels[img_idx[k]]
            src = level[min(int(u_scale[k] * len(level)), len(level) - 1)]
            y = min(int(u_y[k] * (src.shape[0] - s + 1)), src.shape[0] - s)
            x = min(int(u_x[k] * (src.shape[1] - s + 1)), src.shape[1] - s)
            crop = src[y:y + s, x:x + s]
            out[k] = crop[:, ::-1] if flips[k] else crop
        if self.colour is not None:
            out = self.colour(out, rng)
        return to_model_range(out)


def random_crops(images: Sequence[np.ndarray], size: int, n: int, rng: np.random.Generator,
                 scales: Sequence[float] = (1.0, 0.5, 0.25), flip: bool = True) -> np.ndarray:
    """One-shot ``CropSampler(images, size, scales, flip).sample(n, rng)``: float32 [n, 3, size, size].

    This redoes the downscaling each call; a training loop should build one CropSampler instead.
    """
    return CropSampler(images, size, scales, flip).sample(n, rng)


def _grid_shape(n: int, aspect: float) -> tuple[int, int]:
    """(rows, cols) with rows * cols == n whose cols / rows is closest to ``aspect`` (= W / H)."""
    pairs = [(n // c, c) for c in range(1, n + 1) if n % c == 0]
    return min(pairs, key=lambda rc: abs(np.log(rc[1] / rc[0]) - np.log(aspect)))


def eval_crops(names: Sequence[str], size: int, per_image: int = 8,
               scale: float = 0.5) -> np.ndarray:
    """Deterministic crops of built-in photos -> float32 [len(names) * per_image, 3, size, size].

    ``grid_crops`` of ``load_photo(name)`` for each name. Raises ImageError for an unknown photo or one
    smaller than ``size`` after downscaling.
    """
    return grid_crops([load_photo(n) for n in names], size, per_image, scale, labels=[repr(n) for n in names])


def grid_crops(images: Sequence[np.ndarray], size: int, per_image: int = 8, scale: float = 0.5,
               labels: Sequence[str] | None = None) -> np.ndarray:
    """Deterministic crops of images -> float32 [len(images) * per_image, 3, size, size] in [-1, 1].

    Each image is downscaled by ``scale`` and cut into ``per_image`` crops whose corners lie on an
    evenly spaced rows x cols grid (rows * cols == per_image, shaped like the image), in row-major
    order. No randomness, so every run and every backend sees the same evaluation set.
    Raises ShapeError for per_image < 1 or a scale outside (0, 1], ImageError (naming ``labels[i]``)
    for an image smaller than ``size`` after downscaling.
    """
    if per_image < 1:
        raise ShapeError(f"eval crops: per_image must be >= 1, got {per_image}")
    if not 0.0 < scale <= 1.0:
        raise ShapeError(f"eval crops: scale must be in (0, 1], got {scale}")
    crops = []
    for i, image in enumerate(images):
        label = labels[i] if labels is not None else f"image {i}"
        img = _downscale(_check_image(image, label), scale)
        h, w = img.shape[:2]
        if min(h, w) < size:
            raise ImageError(f"eval crops: {label} is {w}x{h} after scale {scale}, smaller than a "
                             f"{size}x{size} crop (use a larger scale)")
        rows, cols = _grid_shape(per_image, w / h)
        ys = np.rint(np.linspace(0, h - size, rows)).astype(int) if rows > 1 else [(h - size) // 2]
        xs = np.rint(np.linspace(0, w - size, cols)).astype(int) if cols > 1 else [(w - size) // 2]
        crops += [img[y:y + size, x:x + size] for y in ys for x in xs]
    if not crops:
        return np.zeros((0, 3, size, size), dtype=np.float32)
    return to_model_range(np.stack(crops))


def fitting_crops(images: Sequence[np.ndarray], size: int, per_image: int = 8, scale: float = 0.5,
                  labels: Sequence[str] | None = None) -> tuple[np.ndarray, str]:
    """``grid_crops`` at ``scale`` where every image is large enough for it, else at full scale, else one
    resized centre crop per image (``resize_center_crop``, as the official preprocessing does): the
    built-in photos are 300-1000 pixels, smaller than a 512² or 1024² model's crop after downscaling.

    Returns (crops float32 [n, 3, size, size] in [-1, 1], how they were cut: ``"scale 0.5"``,
    ``"scale 1.0"`` or ``"resized centre crop"``), so a report can say what it measured.
    """
    for s in dict.fromkeys((scale, 1.0)):
        try:
            return grid_crops(images, size, per_image, s, labels), f"scale {s}"
        except ImageError:
            continue
    crops = np.stack([resize_center_crop(_check_image(im, f"image {i}"), size) for i, im in enumerate(images)])
    return to_model_range(crops), "resized centre crop"


# ----------------------------------------------------------------------------- writing

def _save_atomic(path: str | os.PathLike[str], pil: Image.Image) -> None:
    """Save through ``fileio.atomic_write``: readers never see half a file."""
    p = Path(path)
    fmt = Image.registered_extensions().get(p.suffix.lower())
    if fmt is None:
        raise ImageError(f"{p}: unknown image file extension {p.suffix!r}; expected e.g. .png")
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(p, lambda tmp: pil.save(tmp, format=fmt))


def save_image(path: str | os.PathLike[str], img: np.ndarray) -> None:
    """Write a uint8 [H, W, 3] image; the format comes from the extension. Atomic."""
    _save_atomic(path, Image.fromarray(_check_image(img, f"save_image {os.fspath(path)}")))


def save_grid(path: str | os.PathLike[str], rows: Sequence[Sequence[np.ndarray]], pad: int = 2,
              labels: Sequence[str] | None = None) -> None:
    """Write rows of uint8 [H, W, 3] images as one image on white, ``pad`` pixels apart. Atomic.

    Images may differ in size: each row is as tall as its tallest image and images are top-aligned.
    ``labels`` (one per row) are drawn in black with PIL's default font in a column on the left.
    Raises ShapeError for no rows, a non-image cell, or a label count that differs from the rows.
    """
    if len(rows) == 0 or any(len(r) == 0 for r in rows):
        raise ShapeError("save_grid: expected at least one row, each with at least one image")
    if labels is not None and len(labels) != len(rows):
        raise ShapeError(f"save_grid: got {len(labels)} labels for {len(rows)} rows")
    cells = [[_check_image(im, f"save_grid row {i} image {j}") for j, im in enumerate(r)]
             for i, r in enumerate(rows)]
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 0
    if labels is not None:
        label_w = max(int(probe.textbbox((0, 0), t, font=font)[2]) for t in labels) + pad
    row_h = [max(im.shape[0] for im in r) for r in cells]
    row_w = [sum(im.shape[1] for im in r) + pad * (len(r) - 1) for r in cells]
    width = pad + label_w + max(row_w) + pad
    height = pad + sum(row_h) + pad * (len(cells) - 1) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = pad
    for i, r in enumerate(cells):
        if labels is not None:
            top, bottom = probe.textbbox((0, 0), labels[i], font=font)[1::2]
            draw.text((pad, y + (row_h[i] - (bottom - top)) // 2 - top), labels[i],
                      fill=(0, 0, 0), font=font)
        x = pad + label_w
        for im in r:
            canvas.paste(Image.fromarray(im), (x, y))
            x += im.shape[1] + pad
        y += row_h[i] + pad
    _save_atomic(path, canvas)
