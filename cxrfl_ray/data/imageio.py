"""Decoding of source images (PNG, JPEG, DICOM) to grayscale arrays, and lossless PNG coding.

Every reader returns a 2-D ``uint8`` or ``uint16`` array: RGB/RGBA copies of grayscale
pictures become one channel, DICOM gets its modality/VOI LUTs and MONOCHROME1 inversion.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from cxrfl_ray.data.fields import parse_age

DICOM_SUFFIXES = {".dcm", ".dicom"}


class ImageReadError(ValueError):
    """A source file that cannot be turned into an image (the message says why)."""


def _is_dicom(path: Path, head: bytes) -> bool:
    return path.suffix.lower() in DICOM_SUFFIXES or head[128:132] == b"DICM"


def read_image(path: str | Path, meta: dict | None = None) -> np.ndarray:
    """Read any supported image file as a 2-D grayscale array, or raise ImageReadError.

    If ``meta`` is given, header fields a DICOM carries (patient_id, view, sex, age) are put in it.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageReadError(f"cannot read file: {exc.strerror or exc}") from exc
    if not data:
        raise ImageReadError("empty file")
    if _is_dicom(path, data[:132]):
        return _read_dicom(data, meta)
    return decode_image_bytes(data)


def decode_image_bytes(data: bytes) -> np.ndarray:
    """Decode PNG/JPEG/... bytes with Pillow to a 2-D uint8/uint16 array."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return pil_to_gray(img)
    except ImageReadError:
        raise
    except Exception as exc:  # Pillow raises many types for bad files
        raise ImageReadError(f"undecodable image ({type(exc).__name__}: {exc})") from exc


def pil_to_gray(img: Image.Image) -> np.ndarray:
    """One grayscale channel from any Pillow mode; 16-bit modes keep their depth."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(img, dtype=np.uint16)
    if img.mode in ("I", "F"):
        arr = np.asarray(img)
        if arr.min() >= 0 and arr.max() <= 65535:
            return arr.astype(np.uint16)
        return _rescale(arr.astype(np.float64), 16)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels of an alpha copy carry no X-ray: composite over black.
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    if img.mode == "1":
        img = img.convert("L")
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.uint8)


def _rescale(arr: np.ndarray, bits: int) -> np.ndarray:
    """Linear min-max map of a float array onto the full range of an unsigned integer type."""
    lo, hi = float(arr.min()), float(arr.max())
    maxval = (1 << bits) - 1
    if hi <= lo:
        out = np.zeros(arr.shape, dtype=np.float64)
    else:
        out = (arr - lo) * (maxval / (hi - lo))
    dtype = np.uint8 if bits == 8 else np.uint16
    return np.clip(np.rint(out), 0, maxval).astype(dtype)


def _read_dicom(data: bytes, meta: dict | None = None) -> np.ndarray:
    """Decode a DICOM: compressed transfer syntaxes, rescale + VOI LUT, MONOCHROME1 inverted."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:
        raise ImageReadError(f"invalid DICOM ({type(exc).__name__}: {exc})") from exc
    if meta is not None:
        meta.update(_dicom_meta(ds))
    if "PixelData" not in ds:
        raise ImageReadError("DICOM has no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise ImageReadError(
            f"cannot decode DICOM pixel data (transfer syntax {syntax}): {exc}"
        ) from exc
    if arr.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        raise ImageReadError(f"multi-frame DICOM ({arr.shape[0]} frames) is not a radiograph")
    if arr.ndim == 3:  # colour DICOM (rare for CXR): luminance
        arr = np.asarray(Image.fromarray(arr.astype(np.uint8)).convert("L"))
    bits = 8 if int(getattr(ds, "BitsStored", 8)) <= 8 else 16
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    has_lut = any(k in ds for k in ("RescaleSlope", "RescaleIntercept", "ModalityLUTSequence"))
    has_voi = any(k in ds for k in ("WindowCenter", "VOILUTSequence"))
    if bits == 8 and not has_lut and not has_voi and arr.dtype == np.uint8:
        out = arr  # keep the stored 8-bit values byte for byte
    else:
        values = apply_voi_lut(apply_modality_lut(arr, ds), ds)
        out = _rescale(np.asarray(values, dtype=np.float64), bits)
    if photometric == "MONOCHROME1":
        out = (np.iinfo(out.dtype).max - out).astype(out.dtype)
    return np.ascontiguousarray(out)


def _dicom_meta(ds) -> dict:
    """Patient and acquisition fields from a DICOM header (absent ones omitted)."""
    out = {}
    for key, tag in (("patient_id", "PatientID"), ("view", "ViewPosition"), ("sex", "PatientSex")):
        value = str(getattr(ds, tag, "") or "").strip()
        if value:
            out[key] = value
    age = parse_age(getattr(ds, "PatientAge", None))
    if age is not None:
        out["age"] = age
    return out


def encode_png(arr: np.ndarray) -> bytes:
    """Lossless grayscale PNG (8- or 16-bit, as the array is)."""
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale array, got shape {arr.shape}")
    if arr.dtype == np.uint16:
        img = Image.fromarray(np.ascontiguousarray(arr, dtype="<u2"))
    elif arr.dtype == np.uint8:
        img = Image.fromarray(np.ascontiguousarray(arr))
    else:
        raise ValueError(f"expected uint8 or uint16 pixels, got {arr.dtype}")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Decode PNG bytes written by encode_png back to the exact array."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode.startswith("I"):
            return np.asarray(img, dtype=np.uint16)
        return np.asarray(img.convert("L") if img.mode != "L" else img, dtype=np.uint8)


def downscale(arr: np.ndarray, max_size: int, nearest: bool = False) -> np.ndarray:
    """Shrink so the longer side is at most ``max_size`` (aspect kept); never enlarges."""
    h, w = arr.shape
    scale = max_size / max(h, w)
    if scale >= 1:
        return arr
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.LANCZOS
    if arr.dtype == np.uint16:
        img = Image.fromarray(arr.astype(np.int32))
        out = np.asarray(img.resize(size, resample=resample))
        return np.clip(out, 0, 65535).astype(np.uint16)
    return np.asarray(Image.fromarray(arr).resize(size, resample=resample), dtype=np.uint8)
