"""Images in, normalised pixel tensors out.

`load_image` turns anything a user may hand us (a path, bytes, a file object, a PIL image) into an
RGB PIL image, or raises `ImageError` with one line that names the file, the problem and the fix.
`ImageProcessor` then pads or resizes it to the vision tower's square and normalises it.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from mllm.config import RESIZE_MODES
from mllm.errors import ImageError

DEFAULT_MAX_PIXELS = 40_000_000

ImageSource = str | os.PathLike | bytes | bytearray | BinaryIO | Image.Image

# Modes that carry an alpha channel; "transparency" in `img.info` (P, L, RGB with a tRNS chunk) is handled too.
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "PA")
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def load_image(source: ImageSource, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load `source` fully and return it as an RGB image, upright (EXIF orientation applied).

    `name` labels the image in error messages; it defaults to the path, or "image" for bytes and PIL images.
    Animated GIF/WebP/APNG give their first frame. Images over `max_pixels` are refused from the header,
    before any pixel is decoded.
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels={max_pixels!r} must be > 0")
    label = name or _default_label(source)
    fp = None if isinstance(source, Image.Image) else _as_file(source, label)
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check is the limit that applies; Pillow's lower warning threshold
            # (~89 Mpx) would only be noise. Its hard DecompressionBombError is still caught below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if fp is None:
                return _decode(source, label, max_pixels)
            with Image.open(fp) as img:
                return _decode(img, label, max_pixels)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(
            f"{label}: image exceeds Pillow's decompression-bomb limit of {2 * Image.MAX_IMAGE_PIXELS:,} pixels; "
            "raise PIL.Image.MAX_IMAGE_PIXELS (and max_pixels) if you trust this file, or downscale it"
        ) from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(
            f"{label}: not a readable image (unknown format or corrupt data); save it as PNG or JPEG"
        ) from e
    except PermissionError as e:
        raise ImageError(f"{label}: permission denied; check the file's read permissions") from e
    except Exception as e:
        # Pillow's decoders raise OSError, SyntaxError, EOFError, struct.error, ... for damaged files;
        # all of them mean the same thing to the user.
        raise ImageError(f"{label}: cannot read image ({_short_reason(e)}); re-export or re-download it") from e


def _default_label(source: ImageSource) -> str:
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    file_name = getattr(source, "name", None)
    return file_name if isinstance(file_name, str) else "image"


def _as_file(source: ImageSource, label: str) -> str | BinaryIO:
    """What `Image.open` takes; catches the cases Pillow reports badly (missing, directory, empty)."""
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise ImageError(f"{label}: file not found; check the path")
        if os.path.isdir(path):
            raise ImageError(f"{label}: is a directory, not an image file; pass one of the images inside it")
        if os.path.getsize(path) == 0:
            raise ImageError(f"{label}: file is empty (0 bytes); re-export or re-download it")
        return path
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise ImageError(f"{label}: no image data (0 bytes); upload the image again")
        return io.BytesIO(source)
    if hasattr(source, "read"):
        return source
    raise TypeError(
        f"load_image expects a path, bytes, a binary file object or a PIL image, got {type(source).__name__}"
    )


def _decode(img: Image.Image, label: str, max_pixels: int) -> Image.Image:
    width, height = img.size  # from the header: nothing is decoded yet
    if width == 0 or height == 0:
        raise ImageError(f"{label}: image has zero size ({width}x{height}); re-export it")
    if width * height > max_pixels:
        raise ImageError(
            f"{label}: {width}x{height} = {width * height:,} pixels exceeds max_pixels={max_pixels:,}; "
            "downscale the image or raise max_pixels"
        )
    if getattr(img, "is_animated", False):
        img.seek(0)
    # Full decode now, so a truncated file fails here with its name rather than mid-batch later.
    img.load()
    return to_rgb(ImageOps.exif_transpose(img))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. Transparent pixels become white (a chat UI shows them on white)."""
    if img.mode in _HIGH_DEPTH_MODES:
        img = Image.fromarray(_scale_to_uint8(np.asarray(img), img.mode))  # (H, W) uint8 -> mode L
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # P, L, 1, CMYK, YCbCr, LAB, HSV: Pillow's own conversions are correct for these.
    return img.convert("RGB")


def _scale_to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Map high-bit-depth greyscale to 0..255.

    - `I;16*`: divide by 257, which maps 0..65535 exactly onto 0..255.
    - `I` (int32): Pillow decodes some 16-bit files to this mode, so values inside 0..65535 are read as
      16-bit (/257). Anything else (negative, or > 16 bits) has no natural scale and is min-max stretched.
    - `F` (float32): 0..1 is read as a fraction of full scale (x255); other ranges are min-max stretched.
      NaN and inf become 0 / the finite extremes.
    """
    values = np.nan_to_num(pixels.astype(np.float64))
    low, high = float(values.min()), float(values.max())
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    elif high > low:
        scaled = (values - low) / (high - low) * 255.0
    else:
        scaled = np.zeros_like(values)  # a constant image outside the known ranges: no contrast to keep
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _short_reason(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _resize_shortest_then_crop(image: Image.Image, size: int) -> Image.Image:
    """CLIP-style: bicubic resize so the short side is `size`, then a centred size x size crop."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class ImageProcessor:
    image_size: int
    """Side of the square the vision tower expects, in pixels."""
    image_mean: tuple[float, float, float]
    """Per-channel (R, G, B) mean as a fraction of 255; also the pad colour."""
    image_std: tuple[float, float, float]
    """Per-channel (R, G, B) std as a fraction of 255."""
    resize_mode: str = "pad"
    """`pad`: centre on a square filled with the mean colour, then resize (LLaVA-1.5); `resize`: stretch."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Larger images are refused from their header, before decoding (a decompression-bomb guard)."""

    def __post_init__(self) -> None:
        for name in ("image_size", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ImageProcessor.{name}={value!r} must be a positive integer")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(
                f"ImageProcessor.resize_mode={self.resize_mode!r} is not valid; allowed values: {', '.join(RESIZE_MODES)}"
            )
        for name in ("image_mean", "image_std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3 or not all(np.isfinite(value)):
                raise ValueError(f"ImageProcessor.{name} must be 3 finite values (R, G, B), got {value!r}")
            object.__setattr__(self, name, value)
        if not all(0.0 <= m <= 1.0 for m in self.image_mean):
            raise ValueError(
                f"ImageProcessor.image_mean={self.image_mean!r} must be fractions in 0..1 (divide 0..255 values by 255)"
            )
        if not all(s > 0 for s in self.image_std):
            raise ValueError(f"ImageProcessor.image_std={self.image_std!r} must be > 0 in every channel")

    @property
    def pad_color(self) -> tuple[int, int, int]:
        # Truncated like LLaVA's `expand2square`, so padded images match released checkpoints exactly.
        r, g, b = (int(m * 255) for m in self.image_mean)
        return r, g, b

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An RGB image (see `load_image`) -> (3, S, S) float32, normalised."""
        if image.mode != "RGB":
            raise ValueError(f"preprocess expects an RGB image, got mode {image.mode!r}; load it with load_image()")
        size = self.image_size
        if self.resize_mode == "pad":
            image = _pad_to_square(image, self.pad_color)
        elif self.resize_mode == "crop":
            image = _resize_shortest_then_crop(image, size)
        image = image.resize((size, size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)  # (S, S, 3) in 0..1
        pixels = pixels.permute(2, 0, 1)  # (3, S, S)
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1)
        return ((pixels - mean) / std).contiguous()

    def __call__(self, sources: list[ImageSource], names: list[str] | None = None) -> torch.Tensor:
        """Load and preprocess every source -> (B, 3, S, S). Errors name the image: its path, or "image {i+1}"."""
        if names is not None and len(names) != len(sources):
            raise ValueError(f"got {len(names)} names for {len(sources)} images; pass one name per image")
        size = self.image_size
        if not sources:
            return torch.zeros((0, 3, size, size), dtype=torch.float32)
        tensors = []
        for i, source in enumerate(sources):
            if names is not None:
                name = names[i]
            elif isinstance(source, str | os.PathLike):
                name = os.fspath(source)
            else:
                name = f"image {i + 1}"
            tensors.append(self.preprocess(load_image(source, name=name, max_pixels=self.max_pixels)))
        return torch.stack(tensors)  # (B, 3, S, S)


def _pad_to_square(image: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), color)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas
