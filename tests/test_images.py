"""The safe image loader: every file kind generated on the fly with Pillow."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from multimodal_models.data.images import (
    DEFAULT_MAX_PIXELS,
    encode_png,
    load_image,
    read_image_size,
    strip_metadata,
    to_rgb,
)
from multimodal_models.errors import ImageLoadError

ORIENTATION = 0x0112
GPS_IFD = 0x8825


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def two_tone(width: int = 40, height: int = 20) -> Image.Image:
    """Red picture whose left quarter is blue: shows where the left edge went after rotation."""
    image = Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, width // 4, height))
    return image


def close_to(pixel, expected, tolerance=6) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature + valid IHDR chunk claiming width x height, then a tiny IDAT and IEND."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


# --- sources and formats ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "format,options", [("PNG", {}), ("JPEG", {"quality": 95}), ("WEBP", {"lossless": True}), ("BMP", {}), ("GIF", {})]
)
def test_supported_formats_decode_to_rgb(format, options):
    image = load_image(encode(two_tone(), format, **options))
    assert image.mode == "RGB" and image.size == (40, 20)
    assert close_to(image.getpixel((30, 10)), (255, 0, 0), tolerance=12)
    assert close_to(image.getpixel((2, 10)), (0, 0, 255), tolerance=12)


def test_every_kind_of_source_gives_the_same_pixels(tmp_path):
    data = encode(two_tone(), "PNG")
    path = tmp_path / "picture.png"
    path.write_bytes(data)
    expected = np.asarray(load_image(data))
    for source in (path, str(path), bytearray(data), memoryview(data), io.BytesIO(data), Image.open(io.BytesIO(data))):
        assert np.array_equal(np.asarray(load_image(source)), expected)


def test_result_is_detached_from_the_file_and_has_no_metadata(tmp_path):
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"
    path = tmp_path / "photo.jpg"
    two_tone().save(path, exif=exif.tobytes())
    image = load_image(path)
    path.unlink()  # the returned image must not need the file any more
    assert image.getpixel((30, 10))[0] > 200
    assert image.info == {} and len(image.getexif()) == 0


def test_a_pil_image_given_is_not_modified():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    result = load_image(rgba)
    assert rgba.mode == "RGBA" and rgba.getpixel((0, 0)) == (255, 0, 0, 0)
    assert result.getpixel((0, 0)) == (255, 255, 255)
    rgb = Image.new("RGB", (4, 4), (1, 2, 3))
    assert load_image(rgb) is not rgb


# --- orientation and pixel modes -------------------------------------------------------------


@pytest.mark.parametrize("format", ["JPEG", "PNG"])
def test_exif_orientation_6_rotates_clockwise(format):
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # display = stored rotated 90 degrees clockwise: the left edge goes to the top
    image = load_image(encode(two_tone(), format, exif=exif.tobytes()))
    assert image.size == (20, 40)
    assert close_to(image.getpixel((10, 3)), (0, 0, 255), tolerance=12)
    assert close_to(image.getpixel((10, 36)), (255, 0, 0), tolerance=12)


@pytest.mark.parametrize("format", ["JPEG", "PNG"])
def test_exif_orientation_8_rotates_counter_clockwise(format):
    exif = Image.Exif()
    exif[ORIENTATION] = 8  # display = stored rotated 90 degrees counter-clockwise: the left edge goes to the bottom
    image = load_image(encode(two_tone(), format, exif=exif.tobytes()))
    assert image.size == (20, 40)
    assert close_to(image.getpixel((10, 36)), (0, 0, 255), tolerance=12)
    assert close_to(image.getpixel((10, 3)), (255, 0, 0), tolerance=12)


def test_palette_with_transparency_is_composited_on_white():
    palette_image = Image.new("P", (4, 2), 1)
    palette_image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette_image.paste(0, (0, 0, 2, 2))  # left half uses index 0, the transparent one
    image = load_image(encode(palette_image, "PNG", transparency=0))
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((3, 0)) == (200, 10, 10)


def test_transparent_gif_is_composited_on_white():
    palette_image = Image.new("P", (4, 2), 1)
    palette_image.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    palette_image.paste(0, (0, 0, 2, 2))
    image = load_image(encode(palette_image, "GIF", transparency=0))
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((3, 0)) == (10, 200, 10)


@pytest.mark.parametrize(
    "mode,color,expected",
    [
        ("RGBA", (255, 0, 0, 128), (255, 127, 127)),
        ("LA", (0, 0), (255, 255, 255)),
        ("LA", (100, 255), (100, 100, 100)),
    ],
)
def test_alpha_is_composited_on_white(mode, color, expected):
    image = load_image(encode(Image.new(mode, (3, 3), color), "PNG"))
    assert close_to(image.getpixel((1, 1)), expected, tolerance=1)


def test_cmyk_jpeg_converts_to_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.paste((255, 0, 255, 0), (8, 0, 16, 16))  # pure green
    image = load_image(encode(cmyk, "JPEG", quality=95))
    assert image.mode == "RGB"
    assert close_to(image.getpixel((2, 8)), (255, 0, 0), tolerance=12)
    assert close_to(image.getpixel((13, 8)), (0, 255, 0), tolerance=12)


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 40000, 65535]], dtype=np.uint16)
    source = Image.fromarray(values)
    assert source.mode == "I;16"
    image = load_image(encode(source, "PNG"))
    assert [image.getpixel((x, 0))[0] for x in range(5)] == [0, 1, 128, 156, 255]
    assert image.getpixel((3, 0)) == (156, 156, 156)


def test_thirty_two_bit_integer_image_holding_16_bit_data_is_scaled():
    source = Image.fromarray(np.array([[0, 65535, 30000]], dtype=np.int32))
    assert source.mode == "I"
    assert [load_image(source).getpixel((x, 0))[0] for x in range(3)] == [0, 255, 117]


def test_float_images_are_scaled_from_0_1():
    source = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert source.mode == "F"
    assert [load_image(source).getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_one_bit_and_greyscale_images_expand_to_rgb():
    one_bit = Image.new("1", (2, 1), 0)
    one_bit.putpixel((1, 0), 1)
    image = load_image(encode(one_bit, "PNG"))
    assert [image.getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), (255, 255, 255)]
    assert load_image(encode(Image.new("L", (2, 2), 77), "PNG")).getpixel((0, 0)) == (77, 77, 77)


def test_animated_gif_gives_the_first_frame():
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    image = load_image(buffer.getvalue())
    assert image.getpixel((4, 4)) == (255, 0, 0)


def test_to_rgb_returns_plain_rgb_images_unchanged():
    rgb = Image.new("RGB", (2, 2))
    assert to_rgb(rgb) is rgb


# --- refusals ------------------------------------------------------------------------------------


def noisy(width=64, height=64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("format", ["PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_files_are_reported(tmp_path, format, keep):
    data = encode(noisy(), format)
    path = tmp_path / f"cut.{format.lower()}"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageLoadError, match="truncated") as error:
        load_image(path)
    assert str(path) in str(error.value)


def test_png_cut_right_after_its_header_is_reported_as_truncated():
    with pytest.raises(ImageLoadError, match="truncated or corrupt PNG"):
        load_image(encode(noisy(), "PNG")[:40], name="upload.png")


def test_text_file_named_png_is_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("these are my notes, not a picture\n")
    with pytest.raises(ImageLoadError, match="not an image") as error:
        load_image(path)
    assert str(error.value).startswith(str(path))


def test_empty_file_and_empty_bytes(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(b"", name="request body")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageLoadError, match="no such file") as error:
        load_image(tmp_path / "nope.png")
    assert "nope.png" in str(error.value)
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)


def test_unsupported_format_is_named():
    with pytest.raises(ImageLoadError, match="unsupported image format TIFF"):
        load_image(encode(Image.new("RGB", (4, 4)), "TIFF"))


def test_text_mode_file_object_is_refused(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(encode(noisy(4, 4), "PNG"))
    with open(path, encoding="latin-1") as handle, pytest.raises(ImageLoadError, match="text mode"):
        load_image(handle)


def test_the_name_given_is_used_in_errors():
    with pytest.raises(ImageLoadError, match=r"^upload #3: "):
        load_image(b"GIF89a garbage", name="upload #3")


def test_header_claiming_100000_by_100000_pixels_is_refused():
    bomb = png_header_only(100_000, 100_000)
    with pytest.raises(ImageLoadError, match=f"max_pixels={DEFAULT_MAX_PIXELS:,}"):
        load_image(bomb, name="bomb.png")


def test_pixel_limit_does_not_rely_on_pillows_global_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # some libraries switch Pillow's guard off
    with pytest.raises(ImageLoadError, match=r"100000x100000 = 10,000,000,000 pixels.*max_pixels=64,000,000"):
        load_image(png_header_only(100_000, 100_000))
    with pytest.raises(ImageLoadError, match=r"64x64 = 4,096 pixels.*max_pixels=4,000"):
        load_image(encode(noisy(), "PNG"), max_pixels=4_000)
    assert load_image(encode(noisy(), "PNG"), max_pixels=4_096).size == (64, 64)


def test_pixel_limit_applies_to_pil_images_too():
    with pytest.raises(ImageLoadError, match="max_pixels=100"):
        load_image(Image.new("RGB", (20, 20)), max_pixels=100)


def test_read_image_size_reads_only_the_header():
    assert read_image_size(encode(noisy(30, 12), "JPEG")) == (30, 12)
    assert read_image_size(png_header_only(5000, 4000)) == (5000, 4000)
    with pytest.raises(ImageLoadError, match="not an image"):
        read_image_size(b"hello there, not an image")


# --- metadata ------------------------------------------------------------------------------------


def photo_with_gps() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"
    exif[0x0131] = "Software 1.0"
    exif.get_ifd(GPS_IFD).update({1: "N", 2: (48.0, 51.0, 29.0), 3: "E", 4: (2.0, 17.0, 40.0)})
    return encode(two_tone(), "JPEG", exif=exif.tobytes(), comment=b"secret comment")


def test_strip_metadata_drops_exif_gps_and_comments():
    original = Image.open(io.BytesIO(photo_with_gps()))
    assert original.getexif().get_ifd(GPS_IFD)  # the test photo does carry a GPS position
    clean = strip_metadata(original)
    assert clean.info == {}
    assert len(clean.getexif()) == 0
    assert np.array_equal(np.asarray(clean), np.asarray(original))


def test_strip_metadata_keeps_palette_transparency():
    palette_image = Image.new("P", (2, 2), 0)
    palette_image.info.update(transparency=0, dpi=(72, 72))
    clean = strip_metadata(palette_image)
    assert clean.info == {"transparency": 0}


def test_encode_png_carries_no_metadata():
    original = Image.open(io.BytesIO(photo_with_gps()))
    original.info["icc_profile"] = b"fake profile"
    data = encode_png(original)
    reopened = Image.open(io.BytesIO(data))
    assert reopened.format == "PNG"
    assert len(reopened.getexif()) == 0
    assert not reopened.info.get("exif") and "icc_profile" not in reopened.info
    assert b"eXIf" not in data and b"tEXt" not in data and b"iCCP" not in data and b"CameraMaker" not in data
    assert np.array_equal(np.asarray(reopened.convert("RGB")), np.asarray(original.convert("RGB")))


def test_encode_png_converts_modes_png_cannot_hold():
    data = encode_png(Image.new("CMYK", (2, 2), (0, 255, 255, 0)))
    assert Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0)) == (255, 0, 0)
