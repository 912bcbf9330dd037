"""load_image survives odd files and fails with one clear line on broken ones; ImageProcessor shapes and pads."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mllm.config import RESIZE_MODES
from mllm.image_processing import ImageError, ImageProcessor, load_image

S = 8
WHITE, RED, BLUE = (255, 255, 255), (255, 0, 0), (0, 0, 255)


def identity_processor(resize_mode: str = "resize") -> ImageProcessor:
    # mean 0 / std 1: the tensor is pixel / 255, so colours can be read back directly.
    return ImageProcessor(image_size=S, image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0), resize_mode=resize_mode)


def centre_colour(pixels: torch.Tensor) -> list[float]:
    return (pixels[:, S // 2, S // 2] * 255).tolist()


def save(img: Image.Image, path, **kwargs) -> str:
    img.save(path, **kwargs)
    return str(path)


def rgba_transparent(tmp_path):
    return save(Image.new("RGBA", (6, 4), (255, 0, 0, 0)), tmp_path / "rgba.png")


def p_transparent(tmp_path):
    img = Image.new("P", (6, 4), 0)
    img.putpalette([0, 0, 0] * 256)
    return save(img, tmp_path / "p.png", transparency=0)


def la_half(tmp_path):
    return save(Image.new("LA", (6, 4), (0, 128)), tmp_path / "la.png")


def pa_transparent(tmp_path):
    img = Image.new("PA", (6, 4), (0, 0))
    img.putpalette([0, 0, 0] * 256)
    return img  # Pillow cannot write PA files


def one_bit(tmp_path):
    return save(Image.new("1", (6, 4), 1), tmp_path / "one.png")


def grey(tmp_path):
    return save(Image.new("L", (6, 4), 77), tmp_path / "grey.png")


def cmyk_red(tmp_path):
    return save(Image.new("CMYK", (6, 4), (0, 255, 255, 0)), tmp_path / "cmyk.tiff")


def i16_full(tmp_path):
    return save(Image.fromarray(np.full((4, 6), 65535, dtype=np.uint16)), tmp_path / "i16.png")


def i16_big_endian(tmp_path):
    return save(Image.new("I;16B", (6, 4), 65535), tmp_path / "i16b.tiff")


def i32_full(tmp_path):
    return save(Image.fromarray(np.full((4, 6), 65535, dtype=np.int32)), tmp_path / "i32.tiff")


def float_half(tmp_path):
    return save(Image.fromarray(np.full((4, 6), 0.5, dtype=np.float32)), tmp_path / "f.tiff")


def ycbcr_white(tmp_path):
    return Image.new("YCbCr", (6, 4), (255, 128, 128))


def lab_white(tmp_path):
    return Image.new("LAB", (6, 4), (255, 128, 128))


def hsv_red(tmp_path):
    return Image.new("HSV", (6, 4), (0, 255, 255))


def animated(fmt: str, suffix: str):
    def build(tmp_path):
        frames = [Image.new("RGB", (6, 4), RED), Image.new("RGB", (6, 4), BLUE)]
        path = tmp_path / f"anim.{suffix}"
        frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100, lossless=True)
        return str(path)

    return build


@pytest.mark.parametrize(
    "build, expected",
    [
        (rgba_transparent, WHITE),
        (p_transparent, WHITE),
        (la_half, (127, 127, 127)),
        (pa_transparent, WHITE),
        (one_bit, WHITE),
        (grey, (77, 77, 77)),
        (cmyk_red, RED),
        (i16_full, WHITE),
        (i16_big_endian, WHITE),
        (i32_full, WHITE),
        (float_half, (128, 128, 128)),
        (ycbcr_white, WHITE),
        (lab_white, (254, 255, 254)),
        (hsv_red, RED),
        (animated("GIF", "gif"), RED),
        (animated("PNG", "png"), RED),
        (animated("WEBP", "webp"), RED),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_odd_but_valid_modes_give_expected_colour(tmp_path, build, expected):
    source = build(tmp_path)
    img = load_image(source)
    assert img.mode == "RGB" and img.size == (6, 4)
    pixels = identity_processor()([source])[0]
    assert pixels.shape == (3, S, S) and pixels.dtype == torch.float32
    assert torch.isfinite(pixels).all()
    assert centre_colour(pixels) == pytest.approx(expected, abs=1.5)


def test_int32_and_float_outside_known_ranges_are_stretched():
    ramp = np.array([[-100, 0, 100]], dtype=np.int32)
    assert np.asarray(load_image(Image.fromarray(ramp)))[0, :, 0].tolist() == [0, 128, 255]
    floats = np.array([[0.0, 5.0, 10.0]], dtype=np.float32)
    assert np.asarray(load_image(Image.fromarray(floats)))[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied_before_padding(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored 16x8 image is shown 8x16
    path = save(Image.new("RGB", (16, 8), RED), tmp_path / "rotated.png", exif=exif)
    assert load_image(path).size == (8, 16)
    pixels = identity_processor("pad")([path])[0]
    # Tall after rotation: padding goes left and right (black with mean 0), the full height stays red.
    assert (pixels[:, :, 0] * 255).tolist() == [[0.0] * S] * 3
    assert (pixels[:, 0, S // 2] * 255).tolist() == pytest.approx(RED, abs=1.5)


def test_pad_keeps_aspect_with_mean_colour(tmp_path):
    mean = (0.25, 0.5, 0.75)
    processor = ImageProcessor(image_size=16, image_mean=mean, image_std=(1.0, 1.0, 1.0))
    path = save(Image.new("RGB", (32, 8), RED), tmp_path / "wide.png")
    pixels = processor([path])[0] + torch.tensor(mean).view(3, 1, 1)  # undo normalisation -> 0..1
    assert pixels.shape == (3, 16, 16)
    pad = [int(m * 255) for m in mean]
    for row in range(3):  # the 32x8 image sits in rows 12..19 of 32, i.e. 6..9 of 16
        assert (pixels[:, row, :] * 255).round().T.tolist() == [pad] * 16
    assert (pixels[:, 8, 8] * 255).tolist() == pytest.approx(RED, abs=1.5)


def test_resize_mode_stretches_without_padding(tmp_path):
    path = save(Image.new("RGB", (32, 8), RED), tmp_path / "wide.png")
    pixels = identity_processor("resize")([path])[0]
    assert (pixels * 255).round().permute(1, 2, 0).reshape(-1, 3).unique(dim=0).tolist() == [list(RED)]


def test_normalisation_uses_mean_and_std():
    processor = ImageProcessor(image_size=S, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.25, 0.5))
    pixels = processor.preprocess(Image.new("RGB", (4, 4), WHITE))
    assert pixels[:, 0, 0].tolist() == pytest.approx([1.0, 2.0, 1.0])


def noise_png_bytes(fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def broken_path(tmp_path, kind: str) -> str:
    if kind == "missing":
        return str(tmp_path / "missing.png")
    if kind == "directory":
        (tmp_path / "folder.png").mkdir()
        return str(tmp_path / "folder.png")
    data = {
        "empty": b"",
        "random": np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes(),
        "truncated_png": noise_png_bytes("PNG")[: len(noise_png_bytes("PNG")) // 2],
        "truncated_jpeg": noise_png_bytes("JPEG")[: len(noise_png_bytes("JPEG")) // 2],
    }[kind]
    path = tmp_path / f"{kind}.img"
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "random", "truncated_png", "truncated_jpeg"])
def test_broken_files_raise_one_line_naming_the_file(tmp_path, kind):
    path = broken_path(tmp_path, kind)
    with pytest.raises(ImageError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(path + ": ") and "\n" not in message and "; " in message
    assert "Traceback" not in message


def test_truncated_file_is_detected_at_load_and_chained(tmp_path):
    path = broken_path(tmp_path, "truncated_jpeg")
    with pytest.raises(ImageError, match="truncated") as info:
        load_image(path)
    assert info.value.__cause__ is not None


def test_over_max_pixels_is_refused_with_the_fix(tmp_path):
    path = save(Image.new("RGB", (20, 20)), tmp_path / "big.png")
    with pytest.raises(ImageError, match=r"big\.png: 20x20 = 400 pixels exceeds max_pixels=100; .*raise max_pixels"):
        load_image(path, max_pixels=100)
    processor = ImageProcessor(image_size=S, image_mean=(0.5,) * 3, image_std=(0.5,) * 3, max_pixels=100)
    with pytest.raises(ImageError, match="max_pixels=100"):
        processor([path])


def test_pillow_decompression_bomb_becomes_image_error(tmp_path, monkeypatch):
    path = save(Image.new("RGB", (20, 20)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match=r"bomb\.png: .*MAX_IMAGE_PIXELS"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # warning range only: our own limit decides
    assert load_image(path).size == (20, 20)


def test_zero_size_image_is_refused():
    with pytest.raises(ImageError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)), name="blank")


def test_bytes_and_file_objects_use_their_name():
    with pytest.raises(ImageError, match=r"^upload\.png: "):
        load_image(b"not an image at all", name="upload.png")
    with pytest.raises(ImageError, match=r"^upload\.png: no image data"):
        load_image(b"", name="upload.png")
    assert load_image(io.BytesIO(noise_png_bytes())).size == (64, 64)
    with pytest.raises(ImageError, match=r"^image 2: "):
        identity_processor()([noise_png_bytes(), b"garbage"])


def test_batch_shapes_and_names(tmp_path):
    path = save(Image.new("RGB", (5, 9), BLUE), tmp_path / "blue.png")
    sources = [path, noise_png_bytes(), Image.new("L", (3, 3), 10), io.BytesIO(noise_png_bytes("JPEG"))]
    batch = identity_processor("pad")(sources)
    assert batch.shape == (4, 3, S, S) and batch.dtype == torch.float32
    assert identity_processor()([]).shape == (0, 3, S, S)
    with pytest.raises(ValueError, match="1 names for 2 images"):
        identity_processor()([path, path], names=["only one"])
    with pytest.raises(ImageError, match="^mine: "):
        identity_processor()([b"junk"], names=["mine"])


def test_preprocess_rejects_non_rgb():
    with pytest.raises(ValueError, match="load_image"):
        identity_processor().preprocess(Image.new("L", (4, 4)))


@pytest.mark.parametrize(
    "field, value",
    [
        ("image_size", 0),
        ("image_size", 2.5),
        ("resize_mode", "stretch"),
        ("image_mean", (0.5, 0.5)),
        ("image_mean", (128.0, 128.0, 128.0)),
        ("image_std", (0.5, 0.0, 0.5)),
        ("max_pixels", -1),
        ("max_pixels", S * S - 1),  # below the tower's own input: every image would be refused
    ],
)
def test_invalid_fields_raise_value_error_naming_the_field(field, value):
    kwargs = dict(image_size=S, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)) | {field: value}
    with pytest.raises(ValueError, match=f"ImageProcessor.{field}"):
        ImageProcessor(**kwargs)


def test_crop_mode_resizes_shortest_side_then_centre_crops():
    # A wide image: red left third, green middle, blue right third; the centre crop keeps only green.
    image = Image.new("RGB", (90, 30), (255, 0, 0))
    image.paste((0, 255, 0), (30, 0, 60, 30))
    image.paste((0, 0, 255), (60, 0, 90, 30))
    proc = ImageProcessor(image_size=10, image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0), resize_mode="crop")
    pixels = proc.preprocess(image)
    assert pixels.shape == (3, 10, 10)
    centre = (pixels[:, 2:8, 2:8] * 255).round()
    assert centre[1].min() > 240 and centre[0].max() < 15 and centre[2].max() < 15


# ---- ImageProcessor.load: the model-sized image ----------------------------------------------------------------
def noise(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    width, height = size
    rng = np.random.default_rng(width * 1000 + height)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "F":
        return Image.fromarray(rng.random((height, width), dtype=np.float32))
    return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8)).convert(mode)  # RGBA ->


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def full_image_pixels(processor: ImageProcessor, image: Image.Image) -> torch.Tensor:
    """(3, S, S): the preprocessing spelled out on the full image, as it ran before `load` existed."""
    size, bicubic = processor.image_size, Image.Resampling.BICUBIC
    if processor.resize_mode == "pad" and image.width != image.height:
        side = max(image.size)
        canvas = Image.new("RGB", (side, side), processor.pad_color)
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    elif processor.resize_mode == "crop":
        new_long = int(size * max(image.size) / min(image.size))
        new_width, new_height = (size, new_long) if image.width <= image.height else (new_long, size)
        left, top = (new_width - size) // 2, (new_height - size) // 2
        image = image.resize((new_width, new_height), bicubic).crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(image.resize((size, size), bicubic), dtype=np.float32) / 255.0)
    mean, std = (
        torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in (processor.image_mean, processor.image_std)
    )
    return (pixels.permute(2, 0, 1) - mean) / std


def assert_load_is_exact(processor: ImageProcessor, source) -> None:
    """`load` gives the (S, S) RGB image whose tensor is bit for bit that of the full decode."""
    side = processor.image_size
    small = processor.load(source)
    assert small.size == (side, side) and small.mode == "RGB"
    full = load_image(source)
    expected = full_image_pixels(processor, full)
    assert torch.equal(processor.preprocess(small), expected)
    assert torch.equal(processor.preprocess(full), expected)
    assert torch.equal(processor([source])[0], expected)


@pytest.mark.parametrize("resize_mode", RESIZE_MODES)
@pytest.mark.parametrize(
    "size", [(1, 1), (5, 3), (3, 5), (24, 24), (25, 24), (100, 40), (40, 100), (333, 17), (17, 333), (97, 96)]
)
def test_load_then_preprocess_equals_preprocessing_the_full_image(resize_mode, size):
    # Sizes below, at and above S = 24, square and not, with odd padding offsets and extreme aspect ratios.
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)  # CLIP's: a pad colour that is not grey
    processor = ImageProcessor(image_size=24, image_mean=mean, image_std=std, resize_mode=resize_mode)
    assert_load_is_exact(processor, encoded(noise(size)))


@pytest.mark.parametrize("resize_mode", RESIZE_MODES)
@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "1", "CMYK", "I;16", "F"])
def test_load_is_exact_for_every_mode(resize_mode, mode):
    assert_load_is_exact(identity_processor(resize_mode), noise((37, 13), mode))


@pytest.mark.parametrize("resize_mode", RESIZE_MODES)
def test_load_is_exact_for_a_rotated_photo_at_a_real_towers_size(resize_mode):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 640x480, shown 480x640
    photo = encoded(noise((640, 480)), "JPEG", quality=90, exif=exif)
    processor = ImageProcessor(image_size=336, image_mean=(0.5,) * 3, image_std=(0.5,) * 3, resize_mode=resize_mode)
    assert load_image(photo).size == (480, 640)
    assert_load_is_exact(processor, photo)


def test_pillows_same_size_resize_is_an_equal_copy():
    """What makes `preprocess(load(x))` exact: shaping an (S, S) image again changes no pixel."""
    image = noise((S, S))
    resized = image.resize((S, S), Image.Resampling.BICUBIC)
    assert resized is not image and resized.tobytes() == image.tobytes()


def test_load_labels_errors_like_load_image(tmp_path):
    with pytest.raises(ImageError, match=r"^mine: not a readable image"):
        identity_processor().load(b"junk", name="mine")
    with pytest.raises(ImageError, match=r"^image: not a readable image"):
        identity_processor().load(b"junk")
    path = save(Image.new("RGB", (40, 4)), tmp_path / "wide.png")
    processor = ImageProcessor(image_size=S, image_mean=(0.5,) * 3, image_std=(0.5,) * 3, max_pixels=1_000)
    message = (
        f"{path}: 40x4 would be padded to a 40x40 square = 1,600 pixels, over max_pixels=1,000; crop or downscale it"
    )
    with pytest.raises(ImageError) as info:
        processor.load(path)
    assert str(info.value) == message
    assert load_image(path, max_pixels=1_000).size == (40, 4)  # the general loader has no canvas to check
