"""Hostile images: each is refused from its header with one clear line, before any pixel is decoded.

The files are built here, a few KB each: headers that claim huge sizes over tiny (or no) pixel data.
"Before any pixel is decoded" is checked by recording every decoder Pillow creates: each format's `load()`
goes through `Image._getdecoder`, so a file refused from its header creates none.
"""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image, TiffImagePlugin

from mllm.image_processing import MAX_TIFF_BLOCKS, ImageError, ImageProcessor, load_image

S = 336  # a real tower's side, so the canvases in the messages are those a server would meet
ACCEPTED = "accepted: PNG, JPEG, GIF, WEBP, BMP, TIFF"


def processor(resize_mode: str = "pad", image_size: int = S, max_pixels: int = 40_000_000) -> ImageProcessor:
    return ImageProcessor(
        image_size=image_size,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        resize_mode=resize_mode,
        max_pixels=max_pixels,
    )


@pytest.fixture
def decoders(monkeypatch) -> list[str]:
    """The decoders Pillow creates during the test, by name ("zip" for PNG, "gif", "raw", ...)."""
    created = []
    real = Image._getdecoder

    def recording(mode, decoder_name, *args):
        created.append(decoder_name)
        return real(mode, decoder_name, *args)

    monkeypatch.setattr(Image, "_getdecoder", recording)
    return created


class Decoding(Exception):
    """Raised instead of decoding: the file passed every header check."""


@pytest.fixture
def stop_at_decoding(monkeypatch) -> None:
    def refuse(*args):
        raise Decoding

    monkeypatch.setattr(Image, "_getdecoder", refuse)


# ---- files built from their headers ----------------------------------------------------------------------------
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, frames: int = 1, late: bytes = b"") -> bytes:
    """A black 1-bit PNG: its zero rows deflate ~1000:1, so 40000x1000 takes 5 KB. `frames` > 1 makes an APNG
    (every frame full size); `late` goes after the pixels (an eXIf chunk, say)."""
    rows = zlib.compress(bytes(((width + 7) // 8 + 1) * height), 9)  # per row: a filter byte + packed bits
    body = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    if frames > 1:
        body += png_chunk(b"acTL", struct.pack(">II", frames, 0))
    sequence = 0
    for frame in range(frames):
        if frames > 1:
            body += png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", sequence, width, height, 0, 0, 1, 10, 0, 0))
            sequence += 1
        if frame == 0:
            body += png_chunk(b"IDAT", rows)
        else:
            body += png_chunk(b"fdAT", struct.pack(">I", sequence) + rows)
            sequence += 1
    return b"\x89PNG\r\n\x1a\n" + body + late + png_chunk(b"IEND", b"")


def gif(screen: tuple[int, int], frames: list[tuple[int, int, int, int]]) -> bytes:
    """A GIF of (left, top, width, height) frames, each with one pixel of LZW data (clear, colour 0, end):
    enough for a 1x1 frame, and Pillow reads a frame's size from its descriptor alone."""
    out = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"  # 2-colour palette
    for frame in frames:
        out += b"\x2c" + struct.pack("<HHHHB", *frame, 0) + b"\x02\x02\x44\x01\x00"
    return out + b"\x3b"


def jpeg(width: int, height: int) -> bytes:
    """A JPEG header (start, frame, scan) with no image data: all Pillow reads to open it."""
    frame = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    scan = b"\xff\xda" + struct.pack(">HB", 12, 3) + b"\x01\x00\x02\x11\x03\x11\x00\x3f\x00"
    return b"\xff\xd8" + frame + scan + bytes(16) + b"\xff\xd9"


def bmp(width: int, height: int) -> bytes:
    """A 1-bit BMP header and palette, with no rows."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 1, 0, 0, 2835, 2835, 2, 0)
    palette = b"\0\0\0\0\xff\xff\xff\0"
    start = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", start, 0, 0, start) + info + palette


def webp(width: int, height: int) -> bytes:
    """An animated WebP of two 8x8 frames on a width x height canvas (declared in its VP8X chunk)."""
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"VP8X"
    data[24:27], data[27:30] = (width - 1).to_bytes(3, "little"), (height - 1).to_bytes(3, "little")
    return bytes(data)


def mpo(frames: int) -> bytes:
    """A phone's multi-picture JPEG: a black 8x8 picture, then white ones."""
    pictures = [Image.new("RGB", (8, 8))] + [Image.new("RGB", (8, 8), (255, 255, 255))] * (frames - 1)
    buffer = io.BytesIO()
    pictures[0].save(buffer, "MPO", save_all=True, append_images=pictures[1:])
    return buffer.getvalue()


def ico(embedded: bytes) -> bytes:
    """An icon whose one entry is a PNG; the directory says 256x256 (0 means 256), whatever the PNG says."""
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(embedded), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + embedded


DATA = -1  # in a TIFF tag: the offset of the pixel data


def tiff(*pages: dict[int, int | list[int]], data: bytes = bytes(64)) -> bytes:
    """A little-endian TIFF, one directory per page, every tag a LONG; lists longer than one value go after
    their directory. All strips and tiles point at `data`."""
    pages = [{tag: value if isinstance(value, list) else [value] for tag, value in sorted(p.items())} for p in pages]
    sizes = [2 + 12 * len(page) + 4 + sum(4 * len(v) for v in page.values() if len(v) > 1) for page in pages]
    data_at = 8 + sum(sizes)
    out = b"II*\0" + struct.pack("<I", 8)
    for i, (page, size) in enumerate(zip(pages, sizes)):
        arrays_at = len(out) + 2 + 12 * len(page) + 4
        entries, arrays = b"", b""
        for tag, values in page.items():
            packed = struct.pack(f"<{len(values)}I", *(data_at if v == DATA else v for v in values))
            if len(values) == 1:
                entries += struct.pack("<HHI", tag, 4, 1) + packed
            else:
                entries += struct.pack("<HHII", tag, 4, len(values), arrays_at + len(arrays))
                arrays += packed
        next_page = len(out) + size if i + 1 < len(pages) else 0
        out += struct.pack("<H", len(page)) + entries + struct.pack("<I", next_page) + arrays
    return out + data


def grey_page(width: int, height: int, extra: dict | None = None) -> dict[int, int | list[int]]:
    """An uncompressed 8-bit grey page in one strip. Tags by number (TIFF 6.0): 256/257 width/height,
    258 bits per sample, 259 compression, 262 photometric, 273/278/279 strip offsets/rows/byte counts."""
    page = {
        256: width,
        257: height,
        258: 8,
        259: 1,
        262: 1,
        273: DATA,
        278: height,
        279: min(width * height, 2**32 - 1),
    }
    return page | (extra or {})


def tiled_page(width: int, height: int, tile: int, tiles: int = 1, compression: int = 1) -> dict:
    """An 8-bit grey page in `tiles` square tiles (322/323 tile width/height, 324/325 tile offsets/byte counts)."""
    offsets, counts = ([DATA] * tiles, [1] * tiles) if tiles > 1 else (DATA, 1)
    return {256: width, 257: height, 258: 8, 259: compression, 262: 1, 322: tile, 323: tile, 324: offsets, 325: counts}


# ---- the corpus: each input -> its one-line refusal ------------------------------------------------------------
# (id, file, resize mode, the message after "image 1: ")
CANVAS = "crop or downscale it"
CORPUS = [
    (
        "png_40000x1000_pad",
        lambda: png(40_000, 1_000),
        "pad",
        "40000x1000 would be padded to a 40000x40000 square = 1,600,000,000 pixels, over max_pixels=40,000,000; "
        + CANVAS,
    ),
    (
        "png_200000x200_pad",
        lambda: png(200_000, 200),
        "pad",
        "200000x200 would be padded to a 200000x200000 square = 40,000,000,000 pixels, over "
        "max_pixels=40,000,000; " + CANVAS,
    ),
    (
        "png_200000x200_crop",  # the short side to 336: 336000x336, 113 Mpx
        lambda: png(200_000, 200),
        "crop",
        "200000x200 would be resized through a 336000x336 image = 112,896,000 pixels, over max_pixels=40,000,000; "
        + CANVAS,
    ),
    (
        "png_200x200000_resize",  # rows first (all but the newest Pillow): 336 wide x 200000 high, then shrunk
        lambda: png(200, 200_000),
        "resize",
        "200x200000 would be resized through a 336x200000 image = 67,200,000 pixels, over max_pixels=40,000,000; "
        + CANVAS,
    ),
    (
        "png_6325x6325",
        lambda: png(6_325, 6_325),
        "pad",
        "6325x6325 = 40,005,625 pixels exceeds max_pixels=40,000,000; downscale the image or raise max_pixels",
    ),
    (
        "apng_3_frames_40000x1000",
        lambda: png(40_000, 1_000, frames=3),
        "pad",
        "40000x1000 would be padded to a 40000x40000 square = 1,600,000,000 pixels, over max_pixels=40,000,000; "
        + CANVAS,
    ),
    (
        "gif_40000x1000",
        lambda: gif((40_000, 1_000), [(0, 0, 1, 1)]),
        "pad",
        "40000x1000 would be padded to a 40000x40000 square = 1,600,000,000 pixels, over max_pixels=40,000,000; "
        + CANVAS,
    ),
    (
        "gif_first_frame_beyond_its_10x10_screen",  # Pillow grows the image to the first frame's extent
        lambda: gif((10, 10), [(0, 0, 40_000, 1_000), (0, 0, 1, 1)]),
        "pad",
        "40000x1000 would be padded to a 40000x40000 square = 1,600,000,000 pixels, over max_pixels=40,000,000; "
        + CANVAS,
    ),
    (
        "webp_animated_16383x2441_canvas",
        lambda: webp(16_383, 2_441),
        "pad",
        "16383x2441 would be padded to a 16383x16383 square = 268,402,689 pixels, over max_pixels=40,000,000; "
        + CANVAS,
    ),
    (
        "jpeg_header_65535x65535",
        lambda: jpeg(65_535, 65_535),
        "pad",
        "image exceeds Pillow's decompression-bomb limit of 178,956,970 pixels; raise PIL.Image.MAX_IMAGE_PIXELS "
        "(and max_pixels) if you trust this file, or downscale it",
    ),
    (
        "jpeg_header_7000x7000",
        lambda: jpeg(7_000, 7_000),
        "pad",
        "7000x7000 = 49,000,000 pixels exceeds max_pixels=40,000,000; downscale the image or raise max_pixels",
    ),
    (
        "jpeg_header_65535x100_crop",  # the short side to 336: 220197x336
        lambda: jpeg(65_535, 100),
        "crop",
        "65535x100 would be resized through a 220197x336 image = 73,986,192 pixels, over max_pixels=40,000,000; "
        + CANVAS,
    ),
    (
        "bmp_header_40000x1000",
        lambda: bmp(40_000, 1_000),
        "pad",
        "40000x1000 would be padded to a 40000x40000 square = 1,600,000,000 pixels, over max_pixels=40,000,000; "
        + CANVAS,
    ),
    (
        "tiff_claiming_100000x100000",
        lambda: tiff(grey_page(100_000, 100_000)),
        "pad",
        "image exceeds Pillow's decompression-bomb limit of 178,956,970 pixels; raise PIL.Image.MAX_IMAGE_PIXELS "
        "(and max_pixels) if you trust this file, or downscale it",
    ),
    (
        "tiff_two_pages_first_40000x1000",
        lambda: tiff(grey_page(40_000, 1_000), grey_page(8, 8)),
        "pad",
        "40000x1000 would be padded to a 40000x40000 square = 1,600,000,000 pixels, over max_pixels=40,000,000; "
        + CANVAS,
    ),
    (
        "tiff_16x16_in_65536x65536_tiles",  # deflate: libtiff would allocate the whole tile
        lambda: tiff(tiled_page(16, 16, tile=65_536, compression=8)),
        "pad",
        "16x16 TIFF in tiles of 65536x65536 needs a 4,294,967,296-pixel buffer, over max_pixels=40,000,000; "
        "convert it to PNG or JPEG",
    ),
    (
        "tiff_1000x16_in_strips_of_a_million_rows",
        lambda: tiff(grey_page(1_000, 16, {259: 5, 278: 1_000_000})),  # LZW: libtiff decodes it
        "pad",
        "1000x16 TIFF in strips of 1,000,000 rows needs a 1,000,000,000-pixel buffer, over max_pixels=40,000,000; "
        "convert it to PNG or JPEG",
    ),
    (
        "tiff_100000_one_row_strips",
        lambda: tiff(grey_page(1, 100_000, {273: [DATA] * 100_000, 278: 1, 279: [1] * 100_000})),
        "pad",
        f"TIFF with 100,000 strips, over the {MAX_TIFF_BLOCKS:,} accepted; convert it to PNG or JPEG",
    ),
    (
        "tiff_100000_tiles",
        lambda: tiff(tiled_page(16, 16, tile=16, tiles=100_000)),
        "pad",
        f"TIFF with 100,000 tiles, over the {MAX_TIFF_BLOCKS:,} accepted; convert it to PNG or JPEG",
    ),
    (
        "bigtiff",
        lambda: b"II+\0" + struct.pack("<HHQ", 8, 0, 16) + bytes(64),
        "pad",
        f"BigTIFF images are not accepted ({ACCEPTED}); convert it to PNG or JPEG",
    ),
    (
        "ico_embedding_a_40000x1000_png",
        lambda: ico(png(40_000, 1_000)),
        "pad",
        f"not an accepted format (looks like ICO; {ACCEPTED}); convert it to PNG or JPEG",
    ),
    (
        "psd_header",
        lambda: b"8BPS\0\1" + bytes(6) + struct.pack(">HIIHH", 3, 30_000, 30_000, 8, 3) + bytes(64),
        "pad",
        f"not an accepted format (looks like PSD; {ACCEPTED}); convert it to PNG or JPEG",
    ),
]


@pytest.mark.parametrize("name, build, resize_mode, message", CORPUS, ids=[case[0] for case in CORPUS])
def test_hostile_file_is_refused_from_its_header(decoders, name, build, resize_mode, message):
    data = build()
    assert len(data) < 1_000_000  # a small upload
    with pytest.raises(ImageError) as info:
        processor(resize_mode)([data])
    assert str(info.value) == "image 1: " + message
    assert decoders == []  # refused before a single pixel was decoded


def test_a_tiff_with_too_many_strips_is_refused_before_pillow_reads_it(monkeypatch):
    opened = []
    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "_open", lambda self: opened.append(self))
    data = tiff(grey_page(1, 100_000, {273: [DATA] * 100_000, 278: 1, 279: [1] * 100_000}))
    with pytest.raises(ImageError, match="100,000 strips"):
        load_image(data)
    assert opened == []


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's, while it tries the directory
@pytest.mark.parametrize(
    "data",
    [b"II*\0", b"II*\0" + struct.pack("<I", 1_000)],  # no directory offset; a directory past the end
    ids=["header_only", "directory_past_the_end"],
)
def test_a_tiff_without_a_readable_directory_is_left_to_pillow(data):
    with pytest.raises(ImageError, match=r"^image: not a readable image \(unknown format or corrupt data; accepted"):
        load_image(data)


@pytest.mark.parametrize(
    "fmt, mode, named",
    [
        ("ICO", "RGB", "ICO"),
        ("ICNS", "RGB", "ICNS"),
        ("PCX", "RGB", "PCX"),
        ("PPM", "RGB", "PPM"),
        ("DDS", "RGB", "DDS"),
        ("SGI", "RGB", "SGI"),
        ("QOI", "RGB", "QOI"),
        ("EPS", "RGB", "EPS"),
        ("JPEG2000", "RGB", "JPEG2000"),
        ("AVIF", "RGB", "AVIF"),
        ("XBM", "1", "XBM"),
        ("DIB", "RGB", "DIB"),
        ("TGA", "RGB", "CUR"),  # an uncompressed TGA starts like a cursor file: the name is a guess
        ("IM", "RGB", None),  # no signature
    ],
)
def test_formats_outside_the_allow_list_are_refused_by_name(decoders, fmt, mode, named):
    buffer = io.BytesIO()
    try:
        Image.new(mode, (8, 8)).save(buffer, fmt)
    except (KeyError, OSError) as e:  # a codec this Pillow was built without
        pytest.skip(f"this Pillow cannot write {fmt}: {e}")
    with pytest.raises(ImageError) as info:
        load_image(buffer.getvalue(), name="upload")
    if named is None:
        expected = f"upload: not a readable image (unknown format or corrupt data; {ACCEPTED}); save it as PNG or JPEG"
    else:
        expected = f"upload: not an accepted format (looks like {named}; {ACCEPTED}); convert it to PNG or JPEG"
    assert str(info.value) == expected
    assert decoders == []


@pytest.mark.filterwarnings("ignore:Image was not the expected size")
def test_pillow_alone_decodes_an_icos_png_while_opening_it(decoders):
    """Why ICO is refused rather than size-checked: its embedded PNG is decoded before the size is known."""
    Image.open(io.BytesIO(ico(png(600, 600))))
    assert decoders == ["zip"]


def test_an_unreadable_stream_is_read_once_and_still_named():
    class Stream(io.RawIOBase):  # a socket-like stream: read, no seek
        def __init__(self, data: bytes):
            self.data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            return self.data.readinto(buffer)

    with pytest.raises(ImageError, match=r"^image: not an accepted format \(looks like ICO"):
        load_image(Stream(ico(png(8, 8))))
    assert load_image(Stream(png(8, 8))).size == (8, 8)


# ---- multi-frame files: only the first frame is decoded --------------------------------------------------------
@pytest.mark.parametrize(
    "data, size, decoder",
    [
        (gif((1, 1), [(0, 0, 1, 1), (0, 0, 60_000, 60_000)]), (1, 1), "gif"),
        (png(2_000, 1_000, frames=50), (2_000, 1_000), "zip"),
        (tiff(grey_page(8, 8), grey_page(100_000, 100_000), grey_page(60_000, 1)), (8, 8), "raw"),
        (mpo(3), (8, 8), "jpeg"),  # opened as JPEG: the allow-list keeps phones' pictures
    ],
    ids=["gif_second_frame_60000x60000", "apng_50_frames", "tiff_second_page_100000x100000", "mpo_3_pictures"],
)
def test_only_the_first_frame_is_decoded(decoders, data, size, decoder):
    image = load_image(data)
    assert image.size == size and image.getextrema() == ((0, 0), (0, 0), (0, 0))  # black: the first frame
    assert decoders == [decoder]


def test_animated_webp_decodes_its_first_frame_only(decoders):
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert load_image(buffer.getvalue()).getpixel((4, 4)) == (255, 0, 0)
    assert decoders == ["raw"]  # libwebp's one frame, handed over as raw pixels


def test_a_tiff_in_one_strip_as_libtiff_writes_it_loads(decoders):
    data = tiff(grey_page(8, 8, {278: 2**32 - 1}))  # RowsPerStrip's "all rows" value, not 4 billion rows
    assert load_image(data).size == (8, 8)
    assert decoders == ["raw"]


# ---- the limit itself, and EXIF turns --------------------------------------------------------------------------
def test_6324_square_passes_every_header_check_and_6325_does_not(stop_at_decoding):
    with pytest.raises(ImageError, match="cannot read image") as info:
        processor("pad").load(png(6_324, 6_324))  # 39,992,976 pixels: up to decoding, where the test stops
    assert isinstance(info.value.__cause__, Decoding)
    with pytest.raises(ImageError, match="6325x6325 = 40,005,625 pixels exceeds max_pixels"):
        processor("pad").load(png(6_325, 6_325))


def test_the_model_sized_image_of_an_accepted_bomb_is_small():
    image = processor("pad", max_pixels=1_000_000).load(png(1_000, 1_000), name="square")
    assert image.size == (S, S) and image.mode == "RGB"
    with pytest.raises(ImageError, match=r"^wide: 1001x10 would be padded to a 1001x1001 square = 1,002,001"):
        processor("pad", max_pixels=1_000_000).load(png(1_001, 10), name="wide")


def exif_png(width: int, height: int, orientation: int, late: bool = False) -> bytes:
    """A PNG whose eXIf chunk sits before the pixels (as Pillow writes it) or after them (`late`)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    if late:
        return png(width, height, late=png_chunk(b"eXIf", exif.tobytes()[6:]))  # without the "Exif\0\0" marker
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, "PNG", exif=exif)
    return buffer.getvalue()


SMALL = dict(resize_mode="resize", image_size=8, max_pixels=500)  # resize: rows first, so 8 x height matters
TALL = "5x100 would be resized through a 8x100 image = 800 pixels, over max_pixels=500; crop or downscale it"


@pytest.mark.parametrize(
    "data, refused, decoded",
    [
        (png(5, 100), True, []),  # tall as stored
        (exif_png(100, 5, orientation=6), True, []),  # wide as stored, tall upright: known from the header
        (exif_png(5, 100, orientation=6), False, ["zip"]),  # tall as stored, wide upright
        (png(100, 5), False, ["zip"]),
        (exif_png(100, 5, orientation=6, late=True), True, ["zip"]),  # the turn shows only once decoded
    ],
    ids=["tall", "turned_tall_by_header", "turned_wide_by_header", "wide", "turned_tall_by_late_exif"],
)
def test_limits_apply_to_the_upright_image(decoders, data, refused, decoded):
    if refused:
        with pytest.raises(ImageError) as info:
            processor(**SMALL).load(data, name="photo")
        assert str(info.value) == "photo: " + TALL
    else:
        assert processor(**SMALL).load(data).size == (8, 8)
    assert decoders == decoded


def test_crop_mode_counts_the_resized_image_before_the_crop():
    # 4x1000 -> short side 8: 8x2000 before the centre crop, four times the pixels of the image itself.
    with pytest.raises(ImageError, match=r"^image: 4x1000 would be resized through a 8x2000 image = 16,000 pixels"):
        processor("crop", image_size=8, max_pixels=15_999).load(png(4, 1_000))
    assert processor("crop", image_size=8, max_pixels=16_000).load(png(4, 1_000)).size == (8, 8)


def test_preprocess_checks_the_canvas_of_an_image_given_in_memory():
    with pytest.raises(ImageError, match=r"^image: 3000x10 would be padded to a 3000x3000 square = 9,000,000"):
        processor("pad", max_pixels=1_000_000).preprocess(Image.new("RGB", (3_000, 10)))
