"""dtrain.data.decode: every mode PIL opens becomes 8 bits by its real range, read from real files PIL wrote."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dtrain.data.decode import BACKGROUND, GREY_MODES, decode_image
from dtrain.errors import UserError

RAMP16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)   # 0 .. 65520
KNOWN16 = np.array([[0, 257, 32896, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)


def write_16bit(path: Path, values: np.ndarray, mode: str = "I;16") -> Path:
    """values (uint16, H x W) as a 16-bit greyscale file in `mode` (I;16, I;16L or I;16B), as PIL writes it."""
    dtype = ">u2" if mode == "I;16B" else "<u2"
    Image.frombytes(mode, values.shape[::-1], values.astype(dtype).tobytes()).save(path)
    return path


def opened_mode(path: Path) -> str:
    with Image.open(path) as im:
        return im.mode


def grey(path: Path) -> np.ndarray:
    return decode_image(path, None, 1)[..., 0].astype(int)


@pytest.mark.parametrize("mode, suffix, opens_as", [("I;16", ".png", "I;16"), ("I;16", ".tif", "I;16"),
                                                    ("I;16L", ".tif", "I;16"), ("I;16B", ".tif", "I;16B")])
def test_16bit_images_are_scaled_by_their_full_scale_not_clipped(tmp_path, mode, suffix, opens_as):
    path = write_16bit(tmp_path / f"ramp{suffix}", RAMP16, mode)
    assert opened_mode(path) == opens_as
    assert np.abs(grey(path) - RAMP16 / 257).max() <= 1                       # within one grey level
    known = write_16bit(tmp_path / f"known{suffix}", KNOWN16, mode)
    assert grey(known).tolist() == [[0, 1, 128, 255], [4, 78, 156, 233]]       # value / 257, rounded
    rgb = decode_image(known, None, 3)
    assert (rgb == rgb[..., :1]).all() and rgb[..., 0].tolist() == grey(known).tolist()


def test_16bit_png_written_with_known_values_matches_them_after_resizing_too(tmp_path):
    flat = write_16bit(tmp_path / "flat.png", np.full((40, 40), 51400, np.uint16))   # 51400 / 257 = 200
    assert opened_mode(flat) == "I;16"
    assert (decode_image(flat, 16, 3) == 200).all()


@pytest.mark.parametrize("values, expected", [
    ([[0, 100], [200, 255]], [[0, 100], [200, 255]]),                  # within 0..255: as they are
    ([[0, 1000], [30000, 65535]], [[0, 4], [117, 255]]),               # within 0..65535: as 16-bit, / 257
    ([[-5, 100], [200, 100000]], [[0, 0], [1, 255]]),                  # else min..max
])
def test_32bit_integer_images_by_their_value_range(tmp_path, values, expected):
    path = tmp_path / "i.tif"
    Image.fromarray(np.array(values, np.int32)).save(path)
    assert opened_mode(path) == "I"
    assert grey(path).tolist() == expected


@pytest.mark.parametrize("values, expected", [
    ([[0.0, 0.5], [0.25, 1.0]], [[0, 128], [64, 255]]),                # within 0..1: x 255
    ([[-10.0, 0.5], [5.0, 30.0]], [[0, 67], [96, 255]]),               # else min..max
    ([[np.nan, 0.5], [0.25, 1.0]], [[64, 128], [64, 255]]),            # NaN counts as the (finite) minimum
    ([[3.0, 3.0], [3.0, 3.0]], [[3, 3], [3, 3]]),                      # all equal: the value, clipped
])
def test_float_images_by_their_value_range(tmp_path, values, expected):
    path = tmp_path / "f.tif"
    Image.fromarray(np.array(values, np.float32)).save(path)
    assert opened_mode(path) == "F"
    assert grey(path).tolist() == expected


def test_transparency_is_composited_over_white(tmp_path):
    rgba = np.array([[[200, 0, 0, 0], [200, 0, 0, 255]], [[200, 0, 0, 128], [0, 0, 0, 0]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    got = decode_image(tmp_path / "rgba.png", None, 3)
    assert got[0, 0].tolist() == list(BACKGROUND) == [255, 255, 255]          # transparent: the background
    assert got[0, 1].tolist() == [200, 0, 0]                                   # opaque: as it is
    assert got[1, 0].tolist() == [227, 127, 127]                               # half: the mix
    la = np.array([[[0, 128], [90, 255]]], np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert opened_mode(tmp_path / "la.png") == "LA"
    assert grey(tmp_path / "la.png").tolist() == [[127, 90]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)                           # index 0 (red) transparent
    assert opened_mode(tmp_path / "p.png") == "P"
    assert decode_image(tmp_path / "p.png", None, 3)[0].tolist() == [[255, 255, 255], [0, 0, 255]]


def test_cmyk_through_pils_conversion_and_bilevel(tmp_path):
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    cmyk.save(tmp_path / "c.tif")
    assert opened_mode(tmp_path / "c.tif") == "CMYK"
    assert (decode_image(tmp_path / "c.tif", None, 3) == np.array(cmyk.convert("RGB"))).all()
    assert decode_image(tmp_path / "c.tif", None, 3)[0, 0].tolist() == [255, 0, 0]
    bits = Image.new("1", (2, 1))
    bits.putpixel((1, 0), 1)
    bits.save(tmp_path / "b.png")
    assert grey(tmp_path / "b.png").tolist() == [[0, 255]]


def test_grey_modes_are_the_modes_that_decode_to_one_grey(tmp_path):
    """imagefolder gives a set of GREY_MODES images one channel: each of them decodes with R = G = B."""
    write_16bit(tmp_path / "a.png", KNOWN16)
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(tmp_path / "b.tif")
    Image.fromarray(np.array([[0.0, 0.7]], np.float32)).save(tmp_path / "c.tif")
    Image.fromarray(np.array([[[10, 128]]], np.uint8), "LA").save(tmp_path / "d.png")
    Image.new("1", (2, 2), 1).save(tmp_path / "e.png")
    Image.new("L", (2, 2), 33).save(tmp_path / "f.png")
    for path in sorted(tmp_path.iterdir()):
        assert opened_mode(path) in GREY_MODES
        rgb = decode_image(path, None, 3)
        assert (rgb == rgb[..., :1]).all() and (rgb[..., 0] == decode_image(path, None, 1)[..., 0]).all()


def test_a_missing_file_or_a_folder_is_named_as_such(tmp_path):
    with pytest.raises(UserError, match=r"missing.png does not exist$"):
        decode_image(tmp_path / "missing.png", 32)
    with pytest.raises(UserError, match="is a folder, not an image file$"):
        decode_image(tmp_path, 32)
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(UserError, match="cannot decode image .*x.png.*Remove or replace the file"):
        decode_image(tmp_path / "x.png", 32)
