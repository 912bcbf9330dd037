"""Images in, normalised pixel tensors out.

`load_image` turns anything a user may hand us (a path, bytes, a file object, a PIL image) into an
RGB PIL image, or raises `ImageError` with one line that names the file, the problem and the fix.
`ImageProcessor` then pads or resizes it to the vision tower's square and normalises it;
`ImageProcessor.load` does both steps short of normalising, so a server keeps only the small image.

Limits are checked from the file's header, before any pixel is decoded: only the formats in
`ACCEPTED_FORMATS` are opened at all, the decoded image must fit `max_pixels`, and so must every
intermediate image the processor allocates (the padded square, the resized image before a crop).
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, PngImagePlugin, TiffImagePlugin

from mllm.config import RESIZE_MODES
from mllm.errors import ImageError

DEFAULT_MAX_PIXELS = 40_000_000

ACCEPTED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
"""Pillow formats `load_image` opens; no other decoder runs, not even to read a header.

PNG (and APNG), JPEG (with the multi-picture JPEGs of phones, which Pillow names MPO), GIF and WebP are
what browsers and phones send; BMP is what Windows screenshots paste; TIFF carries scans and 16-bit or
float images. Each states its size in a header that Pillow reads without decoding, and only the first
frame or page is decoded. Others are refused: ICO/CUR decode their embedded PNG while opening, before
any size check; EPS runs Ghostscript; PSD, ICNS, DCX, FLI, JPEG 2000 and AVIF bring layers, resolution
levels or heavy decoders for no gain here; signature-less formats (TGA, ...) pass for damaged files.
"""

_ACCEPTED = "accepted: " + ", ".join(ACCEPTED_FORMATS)  # for error messages

MAX_TIFF_BLOCKS = 65_536
"""Most strips or tiles a TIFF may have. Opening a TIFF, Pillow unpacks every strip's offset and builds an object
per strip (an 8 MB file of one-row strips takes 370 MB and 3 s just to open); real files have a few thousand."""

# Tags of a TIFF directory that hold one value per strip or tile: offsets and byte counts.
_TIFF_BLOCK_TAGS = {
    TiffImagePlugin.STRIPOFFSETS: "strips",
    TiffImagePlugin.STRIPBYTECOUNTS: "strips",
    TiffImagePlugin.TILEOFFSETS: "tiles",
    TiffImagePlugin.TILEBYTECOUNTS: "tiles",
}
_TIFF_ONE_STRIP = 2**32 - 1  # RowsPerStrip's "all rows in one strip", as libtiff writes it

# A caller's own check of the header: (upright width, upright height, label) -> None, or raises ImageError.
HeaderCheck = Callable[[int, int, str], None]

ImageSource = str | os.PathLike | bytes | bytearray | BinaryIO | Image.Image

# Modes that carry an alpha channel; "transparency" in `img.info` (P, L, RGB with a tRNS chunk) is handled too.
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "PA")
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def load_image(source: ImageSource, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load `source` fully and return it as an RGB image, upright (EXIF orientation applied).

    `name` labels the image in error messages; it defaults to the path, or "image" for bytes and PIL images.
    Only `ACCEPTED_FORMATS` are opened. Animated GIF/WebP/APNG and multi-page TIFF give their first frame,
    the only one decoded. Images over `max_pixels` are refused from the header, before any pixel is decoded.
    """
    return _load(source, name, max_pixels, check_header=None)


def _load(source: ImageSource, name: str | None, max_pixels: int, check_header: HeaderCheck | None) -> Image.Image:
    """`load_image`, plus a caller's own `check_header` run on the header's size before decoding."""
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
                return _decode(source, label, max_pixels, check_header)
            with _open(fp, label) as img:
                return _decode(img, label, max_pixels, check_header)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(
            f"{label}: image exceeds Pillow's decompression-bomb limit of {2 * Image.MAX_IMAGE_PIXELS:,} pixels; "
            "raise PIL.Image.MAX_IMAGE_PIXELS (and max_pixels) if you trust this file, or downscale it"
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
        # Pillow reads a stream it cannot rewind into memory anyway; doing it here lets our checks rewind it.
        seekable = getattr(source, "seekable", None)
        return source if seekable is not None and seekable() else io.BytesIO(source.read())
    raise TypeError(
        f"load_image expects a path, bytes, a binary file object or a PIL image, got {type(source).__name__}"
    )


def _open(fp: str | BinaryIO, label: str) -> Image.Image:
    """`Image.open` trying only `ACCEPTED_FORMATS`; anything else is refused by name when it can be named."""
    _check_tiff_directory(fp, label)
    try:
        return Image.open(fp, formats=ACCEPTED_FORMATS)
    except Image.UnidentifiedImageError as e:
        refused = _sniff_format(fp)
        if refused is not None:
            raise ImageError(
                f"{label}: not an accepted format (looks like {refused}; {_ACCEPTED}); convert it to PNG or JPEG"
            ) from e
        raise ImageError(
            f"{label}: not a readable image (unknown format or corrupt data; {_ACCEPTED}); save it as PNG or JPEG"
        ) from e


@contextlib.contextmanager
def _rewound(fp: str | BinaryIO) -> Iterator[BinaryIO]:
    """`fp` as a binary file at offset 0: the path opened, or the (seekable, see `_as_file`) file rewound."""
    if isinstance(fp, str):
        with open(fp, "rb") as f:
            yield f
    else:
        fp.seek(0)
        yield fp


def _sniff_format(fp: str | BinaryIO) -> str | None:
    """The refused Pillow format whose signature starts the file, or None (unknown, or a damaged accepted one).

    Only the plugins' signature tests run, on the first 16 bytes as `Image.open` reads them: no plugin parses
    the file. A signature is a guess (a TGA file can start like a CUR one), and formats without one (TGA, IM,
    ...) cannot be named at all.
    """
    with _rewound(fp) as f:
        prefix = f.read(16)
    Image.init()  # registers every plugin, so every signature is known
    for format_id in Image.ID:
        accept = Image.OPEN[format_id][1]
        if accept is not None and accept(prefix):
            return None if format_id in ACCEPTED_FORMATS else format_id
    return None


def _check_tiff_directory(fp: str | BinaryIO, label: str) -> None:
    """Count a TIFF's strips or tiles in its first directory, before Pillow unpacks them (see MAX_TIFF_BLOCKS).

    BigTIFF, made for files over 4 GB and so for images far beyond max_pixels, is refused outright.
    A directory too damaged to read is left for Pillow to report.
    """
    with _rewound(fp) as f:
        head = f.read(8)
        if len(head) < 8 or head[:4] not in TiffImagePlugin.PREFIXES:
            return
        if b"+" in head[2:4]:
            raise ImageError(f"{label}: BigTIFF images are not accepted ({_ACCEPTED}); convert it to PNG or JPEG")
        order = "<" if head[:2] == b"II" else ">"
        f.seek(struct.unpack(order + "I", head[4:])[0])
        count = f.read(2)
        if len(count) < 2:
            return
        entries = f.read(12 * struct.unpack(order + "H", count)[0])  # 12 bytes each: tag, type, count, value
    for start in range(0, len(entries) - 11, 12):
        tag, _, values = struct.unpack_from(order + "HHI", entries, start)
        if values > MAX_TIFF_BLOCKS and tag in _TIFF_BLOCK_TAGS:
            raise ImageError(
                f"{label}: TIFF with {values:,} {_TIFF_BLOCK_TAGS[tag]}, over the {MAX_TIFF_BLOCKS:,} accepted; "
                "convert it to PNG or JPEG"
            )


def _decode(img: Image.Image, label: str, max_pixels: int, check_header: HeaderCheck | None) -> Image.Image:
    width, height = img.size  # from the header: nothing is decoded yet (for GIF, the first frame's extent too)
    if width == 0 or height == 0:
        raise ImageError(f"{label}: image has zero size ({width}x{height}); re-export it")
    if width * height > max_pixels:
        raise ImageError(
            f"{label}: {width}x{height} = {width * height:,} pixels exceeds max_pixels={max_pixels:,}; "
            "downscale the image or raise max_pixels"
        )
    if isinstance(img, TiffImagePlugin.TiffImageFile):
        _check_tiff_blocks(img, label, max_pixels)
    if check_header is not None:
        check_header(*((height, width) if _turned_by_header(img) else (width, height)), label)
    if getattr(img, "is_animated", False):
        img.seek(0)
    # Full decode now, so a truncated file fails here with its name rather than mid-batch later.
    img.load()
    return to_rgb(ImageOps.exif_transpose(img))


def _turned_by_header(img: Image.Image) -> bool:
    """Whether the EXIF orientation read with the header turns the image a quarter (orientations 5-8).

    A PNG may put its eXIf chunk after the pixels, where only decoding finds it: without one before them,
    the image counts as not turned here, and a late turn is caught once the image is upright.
    """
    if isinstance(img, PngImagePlugin.PngImageFile) and "exif" not in img.info:
        return False  # asking Pillow would decode the PNG to look for a late eXIf
    return img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)


def _check_tiff_blocks(img: TiffImagePlugin.TiffImageFile, label: str, max_pixels: int) -> None:
    """libtiff decodes a TIFF a tile or a strip at a time, into a buffer the header sizes apart from the image:
    a 16x16 image may declare 65536x65536 tiles, or strips of a million rows. Pillow's buffer holds a tile,
    or (for YCbCr files) the image's width times a tile's height or a strip's rows."""
    width, height = img.size
    tags = img.tag_v2
    if TiffImagePlugin.TILEWIDTH in tags:
        tile_width, tile_height = tags.get(TiffImagePlugin.TILEWIDTH), tags.get(TiffImagePlugin.TILELENGTH)
        if not (isinstance(tile_width, int) and isinstance(tile_height, int)):
            return  # a wrong count: Pillow and libtiff refuse the file when decoding
        block, pixels = f"tiles of {tile_width}x{tile_height}", max(tile_width, width) * tile_height
    else:
        rows = tags.get(TiffImagePlugin.ROWSPERSTRIP, height)
        if not isinstance(rows, int):
            return
        block, pixels = f"strips of {rows:,} rows", width * (height if rows == _TIFF_ONE_STRIP else rows)
    if pixels > max_pixels:
        raise ImageError(
            f"{label}: {width}x{height} TIFF in {block} needs a {pixels:,}-pixel buffer, over "
            f"max_pixels={max_pixels:,}; convert it to PNG or JPEG"
        )


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


def _shortest_side_to(width: int, height: int, size: int) -> tuple[int, int]:
    """The size with the short side `size` and the aspect ratio kept (long side rounded down)."""
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def _resize_shortest_then_crop(image: Image.Image, size: int) -> Image.Image:
    """CLIP-style: bicubic resize so the short side is `size`, then a centred size x size crop."""
    new_w, new_h = _shortest_side_to(*image.size, size)
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
    """`pad`: centre on a square filled with the mean colour, then resize (LLaVA-1.5); `resize`: stretch;
    `crop`: resize the short side to `image_size`, then take the centre (CLIP)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Most pixels of the decoded image and of every image shaping it allocates (the padded square, the resized
    image before a crop); checked from the header, before decoding (a decompression-bomb guard)."""

    def __post_init__(self) -> None:
        for name in ("image_size", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ImageProcessor.{name}={value!r} must be a positive integer")
        if self.max_pixels < self.image_size**2:
            raise ValueError(
                f"ImageProcessor.max_pixels={self.max_pixels:,} is below image_size**2 = {self.image_size**2:,} "
                "(the tower's own input), so every image would be refused; raise it"
            )
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

    def load(self, source: ImageSource, name: str | None = None) -> Image.Image:
        """Load `source` under every limit and return the (S, S) RGB image the tower sees before normalisation.

        `preprocess(load(x))` equals `preprocess(load_image(x))` bit for bit, so a server can queue this small
        image (S*S*3 bytes) instead of the full decode (4 bytes a pixel in Pillow: up to 160 MB at 40 Mpx).
        `name` labels errors as in `load_image`.
        """
        label = name or _default_label(source)
        return self._model_sized(_load(source, label, self.max_pixels, self._check_canvas), label)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An RGB image (see `load_image`) -> (3, S, S) float32, normalised."""
        if image.mode != "RGB":
            raise ValueError(f"preprocess expects an RGB image, got mode {image.mode!r}; load it with load_image()")
        image = self._model_sized(image, "image")
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
            tensors.append(self.preprocess(self.load(source, name=name)))
        return torch.stack(tensors)  # (B, 3, S, S)

    def _model_sized(self, image: Image.Image, label: str) -> Image.Image:
        """An RGB image -> the (S, S) RGB image the tower sees: padded or cropped, then resized (bicubic).

        An (S, S) image comes back as an equal copy in every mode (no padding; Pillow's same-size resize
        copies), which is what makes `preprocess(load(x))` exact.
        """
        self._check_canvas(*image.size, label)
        size = self.image_size
        if self.resize_mode == "pad":
            image = _pad_to_square(image, self.pad_color)
        elif self.resize_mode == "crop":
            image = _resize_shortest_then_crop(image, size)
        return image.resize((size, size), Image.Resampling.BICUBIC)

    def _largest_step(self, width: int, height: int) -> tuple[str, int]:
        """The largest image `_model_sized` allocates for a width x height input: what it is, and its pixels.

        Pillow resizes in two passes, rows first: (new width) x (old height), then the result. So a tall
        thin image resized to S x S passes through an S x height image, far larger than the input. (Recent
        Pillow does very tall images columns first, which never takes more: the count bounds every version.)
        """
        size = self.image_size
        if self.resize_mode == "pad":
            side = max(width, height)
            return f"would be padded to a {side}x{side} square", side * side
        if self.resize_mode == "crop":
            new_width, new_height = _shortest_side_to(width, height, size)
            steps = [(new_width, height), (new_width, new_height)]
        else:
            steps = [(size, height)]  # then (size, size)
        step_width, step_height = max(steps, key=lambda step: step[0] * step[1])
        return f"would be resized through a {step_width}x{step_height} image", step_width * step_height

    def _check_canvas(self, width: int, height: int, label: str) -> None:
        """Refuse an upright width x height image whose shaping would allocate more than max_pixels.

        `load` runs it from the header, before decoding, and `_model_sized` again on the decoded image.
        """
        step, pixels = self._largest_step(width, height)
        if pixels > self.max_pixels:
            raise ImageError(
                f"{label}: {width}x{height} {step} = {pixels:,} pixels, over max_pixels={self.max_pixels:,}; "
                "crop or downscale it"
            )


def _pad_to_square(image: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), color)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas
