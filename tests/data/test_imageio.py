"""Decoding of PNG/JPEG/DICOM into grayscale arrays, and lossless PNG coding."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxrfl_ray.data.imageio import ImageReadError, decode_png, downscale, encode_png, read_image
from tests.conftest import gradient, write_dicom, write_png


def test_rgba_copy_of_grayscale_becomes_one_channel(tmp_path):
    grey = gradient(40, 50)
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    path = write_png(tmp_path / "rgba.png", rgba)
    out = read_image(path)
    assert out.shape == (40, 50) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, grey)


def test_sixteen_bit_png_keeps_depth_and_values(tmp_path):
    arr = (np.arange(64 * 48, dtype=np.uint32).reshape(64, 48) * 21 % 65536).astype(np.uint16)
    data = encode_png(arr)
    back = decode_png(data)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, arr)
    (tmp_path / "a.png").write_bytes(data)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), arr)


def test_dicom_monochrome1_is_inverted_and_keeps_16_bits(tmp_path):
    pixels = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (8, 1))  # 8 x 64, increasing
    path = write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1", bits=12,
                       PatientSex="F", PatientAge="045Y", ViewPosition="AP", PatientID="p1")
    meta: dict = {}
    out = read_image(path, meta)
    assert out.dtype == np.uint16 and out.shape == (8, 64)
    assert out[0, 0] == 65535 and out[0, -1] == 0  # inverted: low stored values are bright
    assert np.all(np.diff(out[0].astype(int)) < 0)
    assert meta == {"patient_id": "p1", "view": "AP", "sex": "F", "age": 45.0}


def test_dicom_rescale_and_window_are_applied(tmp_path):
    pixels = np.tile(np.arange(0, 4000, 40, dtype=np.uint16), (4, 1))
    # Window 1000..3000 (stored values): everything below is black, above is white.
    path = write_dicom(tmp_path / "w.dcm", pixels, bits=12, window=(2000, 2000))
    out = read_image(path).astype(int)
    stored = pixels[0].astype(int)
    assert (out[0][stored < 990] == 0).all()
    assert (out[0][stored > 3010] == 65535).all()
    inside = (stored > 1100) & (stored < 2900)
    assert np.all(np.diff(out[0][inside]) > 0)


def test_eight_bit_dicom_is_kept_byte_for_byte(tmp_path):
    pixels = gradient(16, 16)
    out = read_image(write_dicom(tmp_path / "8.dcm", pixels, bits=8))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, pixels)


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "empty file"), (b"this is not an image", "undecodable"), ("truncated", "undecodable")],
)
def test_bad_files_raise_with_reason(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    if content == "truncated":
        write_png(path, gradient(64, 64))
        content = path.read_bytes()[:200]
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason):
        read_image(path)


def test_dicom_without_pixel_data(tmp_path):
    path = write_dicom(tmp_path / "nopix.dcm", None, PatientID="x")
    with pytest.raises(ImageReadError, match="no pixel data"):
        read_image(path)


def test_downscale_keeps_aspect_and_masks_stay_binary():
    img = gradient(300, 200)
    out = downscale(img, 150)
    assert out.shape == (150, 100)
    mask = np.zeros((300, 200), np.uint8)
    mask[50:250, 20:120] = 255
    small = downscale(mask, 150, nearest=True)
    assert small.shape == (150, 100) and set(np.unique(small)) == {0, 255}
    assert downscale(img, 1000) is img  # never enlarges
    deep = downscale((img.astype(np.uint16) * 257), 100)
    assert deep.dtype == np.uint16 and deep.shape == (100, 67)


def test_jpeg_l_mode_reads_as_is(tmp_path):
    arr = gradient(32, 32)
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=95)
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == (32, 32) and np.abs(out.astype(int) - arr).mean() < 8
