"""Synthetic frontal chest radiographs ("phantoms") with exact lung masks.

Why: the real RSNA / lung-segmentation data are large and licensed, but tests,
smoke runs and benchmarks of the federated pipeline need images that look like
chest X-rays, carry the three RSNA labels, come with pixel-exact lung masks,
and differ between sites the way hospitals do (acquisition look and label mix).

Everything is drawn from ``seed``: per-image parameters come from the image's
own generator (``default_rng([seed, stream, index])``), so output is
byte-identical for the same arguments and independent of ``chunk``; the
geometry is evaluated vectorised over a chunk of images.  Anatomy lives in
normalised coordinates ``u`` (left-right, image left = patient right) and ``v``
(top-down), both roughly in [-1, 1]; a site's zoom/shift maps them to pixels.

Speed (2,000 images at 256 px in about 2.5 s on 2 cores): the lung mask is
exact at full resolution, the image is composed at half resolution from the
mask's 2x2 coverage and upsampled, and the next chunk renders in a second
thread while the caller consumes the current one.  Output is byte-identical
for the same arguments on the same platform and numpy build (float32
transcendental functions may differ in the last bit across CPUs/builds).
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Iterator

import numpy as np
from scipy.ndimage import gaussian_filter1d

LABEL_NAMES: tuple[str, ...] = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")

# Stream tags of the per-purpose generators, so site looks, image parameters
# and pixel noise never share random numbers.
_SITE_STREAM, _CORNER_STREAM, _IMAGE_STREAM, _NOISE_STREAM = 11, 12, 13, 14

# RSNA Pneumonia Detection label proportions (Normal, NLO/NN, Lung Opacity);
# sites scatter around them.
_RSNA_MIX = np.array([0.33, 0.44, 0.23])

_LUT_LEVELS = 4096  # quantisation of the tone look-up table
_RAW_LO, _RAW_HI = -0.03, 1.2  # raw intensity range the tone table covers
_N_BLOBS = 6  # opacity blobs drawn per image (3 clusters of 2), unused ones get 0
_F32 = np.float32


@dataclass(frozen=True)
class SiteLook:
    """One site's acquisition look and label mix.

    ``contrast`` stretches raw intensities around 0.3, ``gamma`` is the
    display exponent, ``noise`` the pixel-noise std as a fraction of full
    scale, ``blur`` a Gaussian sigma in pixels at 256 px (scaled with
    ``size``), ``zoom``/``shift`` place the anatomy in the field of view
    (normalised units), ``marker_corner`` is 0 top-left, 1 top-right,
    2 bottom-left, 3 bottom-right, ``label_mix`` the class proportions of the
    site (Normal, No Lung Opacity / Not Normal, Lung Opacity).
    """

    contrast: float
    gamma: float
    noise: float
    blur: float
    zoom: float
    shift: tuple[float, float]
    marker_corner: int
    label_mix: tuple[float, float, float]


@dataclass
class PhantomBatch:
    """A chunk of phantoms; all arrays share the leading batch axis."""

    images: np.ndarray  # (B, H, W) uint8
    masks: np.ndarray  # (B, H, W) uint8 with values {0, 255}
    labels: np.ndarray  # (B,) int64 in {0, 1, 2}
    sites: np.ndarray  # (B,) int64 site index
    index: np.ndarray  # (B,) int64 global image index 0..n-1


# --------------------------------------------------------------------------
# argument checks


def _check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` as int or raise a ValueError naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------
# sites


def site_looks(sites: int, seed: int) -> list[SiteLook]:
    """Draw each site's look; site ``s`` depends only on ``(seed, s)``.

    Why per-site generators: adding sites does not change existing ones.
    Corners rotate from a seeded offset so the first four sites differ.
    """
    sites = _check_int("sites", sites, 1)
    seed = _check_int("seed", seed, 0)
    offset = int(np.random.default_rng([seed, _CORNER_STREAM]).integers(4))
    looks = []
    for s in range(sites):
        rng = np.random.default_rng([seed, _SITE_STREAM, s])
        mix = np.maximum(rng.dirichlet(8.0 * _RSNA_MIX), 0.05)  # every class present
        mix = mix / mix.sum()
        looks.append(
            SiteLook(
                contrast=float(rng.uniform(0.75, 1.3)),
                gamma=float(rng.uniform(0.7, 1.45)),
                noise=float(rng.uniform(0.008, 0.05)),
                blur=float(rng.uniform(0.2, 1.8)),
                zoom=float(rng.uniform(0.88, 1.03)),
                shift=(float(rng.uniform(-0.05, 0.05)), float(rng.uniform(-0.05, 0.04))),
                marker_corner=(s + offset) % 4,
                label_mix=(float(mix[0]), float(mix[1]), float(mix[2])),
            )
        )
    return looks


# --------------------------------------------------------------------------
# per-image parameters

# (name, low, high): uniform draws in this order from each image's generator.
# Prefix r_/l_ = the image-left lung (patient right) / image-right lung.
_PARAMS: tuple[tuple[str, float, float], ...] = (
    ("zoom_j", 0.96, 1.04), ("shift_x", -0.03, 0.03), ("shift_y", -0.03, 0.03),
    ("exposure", -0.04, 0.04), ("tissue", 0.36, 0.44), ("lung_dark", 0.25, 0.32),
    ("body_a", 0.88, 0.98), ("body_b", 1.0, 1.15), ("body_v", 0.1, 0.22), ("body_sq", 0.3, 0.7),
    ("lung_v", -0.1, -0.03),
    ("r_qc", 0.38, 0.43), ("r_a", 0.26, 0.31), ("r_b", 0.5, 0.57), ("r_taper", 0.2, 0.4),
    ("r_sq", 0.2, 0.8), ("r_dome", 0.08, 0.15), ("r_qd", -0.06, 0.03), ("r_base", 0.88, 0.96),
    ("l_qc", 0.38, 0.43), ("l_a", 0.24, 0.29), ("l_b", 0.53, 0.6), ("l_taper", 0.2, 0.4),
    ("l_sq", 0.2, 0.8), ("l_dome", 0.06, 0.12), ("l_qd", -0.02, 0.06), ("l_base", 0.88, 0.96),
    ("med_q", 0.07, 0.1), ("med_slope", 0.01, 0.04),
    ("heart_u", 0.06, 0.11), ("heart_v", 0.32, 0.4), ("heart_a", 0.25, 0.3),
    ("heart_b", 0.34, 0.42), ("heart_skew", 0.15, 0.35), ("heart_int", 0.05, 0.09),
    ("cardio_a", 1.4, 1.6), ("cardio_b", 1.15, 1.25), ("cardio_u", 0.03, 0.06),
    ("abn_kind", 0.0, 1.0), ("eff_side", 0.0, 1.0), ("eff_h", 0.18, 0.3), ("eff_c", 0.8, 2.5),
    ("rib_sp", 0.15, 0.18), ("rib_ph", 0.0, 1.0), ("rib_al", -0.1, 0.1), ("rib_be", 0.5, 0.9),
    ("rib_w", 0.18, 0.32), ("rib_int", 0.07, 0.12), ("rib_lr", -0.25, 0.25),
    ("clav_v", -0.8, -0.72), ("clav_sl", 0.12, 0.26), ("clav_t", 0.028, 0.04),
    ("spine_int", 0.04, 0.08), ("med_int", 0.15, 0.22),
)
_LOW = np.array([p[1] for p in _PARAMS])
_HIGH = np.array([p[2] for p in _PARAMS])
# Opacity blobs: side, lateral pos, vertical pos, sigma_u, sigma_v, amplitude.
_BLOB_LOW = np.array([0.0, -0.85, -0.8, 0.08, 0.08, 0.3])
_BLOB_HIGH = np.array([1.0, 0.75, 0.9, 0.16, 0.18, 0.5])


def _draw_params(index: np.ndarray, sites: np.ndarray, looks: list[SiteLook], seed: int) -> dict:
    """Per-image scalars as (B, 1, 1) float32 arrays plus labels.

    Why: only these small draws loop over images; each uses the image's own
    generator, always drawing the same number of values so every stream stays
    aligned whatever the label, chunk or ``label_marker``.
    """
    rows, blobs, labels, n_clusters, marker_u = [], [], [], [], []
    for i, s in zip(index.tolist(), sites.tolist()):
        rng = np.random.default_rng([seed, _IMAGE_STREAM, i])
        cum = np.cumsum(looks[s].label_mix)
        labels.append(min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), 2))
        rows.append(rng.uniform(_LOW, _HIGH))
        blobs.append(rng.uniform(_BLOB_LOW, _BLOB_HIGH, size=(_N_BLOBS, len(_BLOB_LOW))))
        n_clusters.append(int(rng.integers(1, 4)))
        marker_u.append(rng.random())
    table = np.asarray(rows)
    p = {name: table[:, k].astype(_F32)[:, None, None] for k, (name, _, _) in enumerate(_PARAMS)}
    p["labels"] = np.asarray(labels, dtype=np.int64)
    p["blobs"] = np.asarray(blobs)  # (B, K, 6) float64
    p["n_clusters"] = np.asarray(n_clusters)
    p["marker_u"] = np.asarray(marker_u)
    return p


def _apply_abnormalities(p: dict) -> None:
    """Class 1 gets cardiomegaly (70 %), an effusion (45 %) or both (the
    remainder), expressed as parameter changes the geometry reads."""
    lab1 = (p["labels"] == 1)[:, None, None]
    kind = p["abn_kind"]
    cardio = lab1 & ((kind < 0.55) | (kind >= 0.85))
    effusion = lab1 & (kind >= 0.55)
    p["heart_a"] = np.where(cardio, p["heart_a"] * p["cardio_a"], p["heart_a"])
    p["heart_b"] = np.where(cardio, p["heart_b"] * p["cardio_b"], p["heart_b"])
    p["heart_u"] = np.where(cardio, p["heart_u"] + p["cardio_u"], p["heart_u"])
    p["eff_r"] = effusion & (p["eff_side"] < 0.5)
    p["eff_l"] = effusion & (p["eff_side"] >= 0.5)


# --------------------------------------------------------------------------
# anatomy (u: (B, 1, W) columns, v: (B, H, 1) rows; masks are (B, H, W)).
# Most terms are sums or products of a column and a row function, so a full
# (B, H, W) operation is needed only where two of them meet; localised parts
# are evaluated only inside the rows/columns any image of the chunk can reach
# (a window never changes a pixel's value, so chunking stays invisible).


def _span(hit: np.ndarray) -> slice:
    """Smallest index range covering every True in ``hit``."""
    idx = np.flatnonzero(hit)
    return slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0)


def _rows(v: np.ndarray, lo, hi) -> slice:
    """Rows where ``lo < v < hi`` for at least one image of the chunk."""
    return _span(np.any((v > lo) & (v < hi), axis=(0, 2)))


def _cols(u: np.ndarray, lo, hi) -> slice:
    """Columns where ``lo < u < hi`` for at least one image of the chunk."""
    return _span(np.any((u > lo) & (u < hi), axis=(0, 1)))


def _body(u: np.ndarray, v: np.ndarray, p: dict, size: int) -> np.ndarray:
    """Soft-tissue outline: a squircle (chest and shoulders) plus the neck,
    as a weight in [0, 1] with an edge about one coarse pixel wide (the
    image is composed at half resolution, a hard edge would look jagged)."""
    x2 = (u / p["body_a"]) ** 2
    y2 = ((v - p["body_v"]) / p["body_b"]) ** 2
    sq = p["body_sq"]
    r = ((1.0 - sq) * x2 + sq * x2 * x2) + ((1.0 - sq) * y2 + sq * y2 * y2)
    px = _F32(4.0 / size)  # a coarse pixel in anatomy units
    chest = np.clip((1.0 - r) * (1.0 / (2.5 * px)) + 0.5, 0.0, 1.0)  # |dr/du| ~ 2.5 at the edge
    neck_half = 0.22 + 0.25 * np.clip(v + 0.85, 0.0, None)
    neck = np.clip((neck_half - np.abs(u)) * (1.0 / px) + 0.5, 0.0, 1.0) * (v < 0.0)
    return np.maximum(chest, neck)


def _tissue(u: np.ndarray, p: dict) -> np.ndarray:
    """Soft-tissue intensity per column: the chest wall thins laterally."""
    x2 = (u / p["body_a"]) ** 2
    return p["tissue"] * (0.6 + 0.4 * np.sqrt(np.clip(1.0 - x2, 0.0, 1.0)))


def _heart_window(u: np.ndarray, v: np.ndarray, p: dict) -> tuple[slice, slice]:
    """Rows/columns that can hold the heart (down to the lowest possible
    dome, v < 0.75) in any image of the chunk."""
    hu, hv, hb = p["heart_u"], p["heart_v"], p["heart_b"]
    half_width = np.sqrt(p["heart_a"] ** 2 + (p["heart_skew"] * hb) ** 2)  # of the sheared ellipse
    return _rows(v, hv - hb, 0.75), _cols(u, hu - half_width, hu + half_width)


def _overlap(a: slice, b: slice) -> slice:
    """Intersection of two index ranges (may be empty)."""
    start = max(a.start, b.start)
    return slice(start, max(start, min(a.stop, b.stop)))


def _heart_top(u: np.ndarray, p: dict) -> np.ndarray:
    """Upper outline of the heart per column, (B, 1, W), +inf where no heart.

    The heart is a sheared ellipse right of centre in the image (patient's
    left), apex pointing down and out; everything below its upper outline
    counts as heart (callers cut it at the diaphragm), so it rests on the
    dome and never leaves slivers of lung beneath it.  Solves
    ((w - s*dv)/a)^2 + (dv/b)^2 = 1 for the smaller dv, with w = u - centre.
    """
    a, b, s = p["heart_a"], p["heart_b"], p["heart_skew"]
    w = u - p["heart_u"]
    quad = (s / a) ** 2 + 1.0 / (b * b)
    half_lin = w * s / (a * a)
    const = (w / a) ** 2 - 1.0
    disc = half_lin * half_lin - quad * const
    top = p["heart_v"] + (half_lin - np.sqrt(np.maximum(disc, 0.0))) / quad
    return np.where(disc > 0.0, top, np.inf)


def _dome(q: np.ndarray, p: dict, side: str) -> np.ndarray:
    """Diaphragm dome under one lung, (B, 1, W): highest mid-lung, lowest at
    the lateral costophrenic angle; an effusion lifts it laterally."""
    qc, a, b = p[side + "qc"], p[side + "a"], p[side + "b"]
    base = p["lung_v"] + b * p[side + "base"]
    t = (q - qc - p[side + "qd"]) / (1.1 * a)
    dome = base - p[side + "dome"] * np.clip(1.0 - t * t, 0.0, None)
    # effusion meniscus: fluid fills the costophrenic angle, rising laterally
    s = np.clip(q - qc + 0.5 * a, 0.0, None)
    men = base - 0.75 * p["eff_h"] - p["eff_c"] * s * s
    return np.where(p["eff_" + side[0]], np.minimum(dome, men), dome)


def _lung(u: np.ndarray, v: np.ndarray, p: dict, side: str) -> tuple[np.ndarray, tuple[slice, slice]]:
    """One lung field: a tapered super-ellipse (rounded apex, wide base),
    cut medially by the mediastinum, below by the diaphragm dome and by the
    heart.  The parameter ranges keep it well inside the body outline
    (body radius <= 0.9 on lung pixels over thousands of draws), so no body
    test is needed.

    ``side`` "r_" is the image-left lung (patient right).  Works in the
    lateral coordinate ``q`` (distance from the midline) so both lungs share
    the code.  |v - centre| < b and |q - qc| < a * (1 + taper) bound the
    super-ellipse, which gives the window.  Returns (mask block, window).
    """
    q = -u if side == "r_" else u
    qc, a, b, taper, sq = (p[side + k] for k in ("qc", "a", "b", "taper", "sq"))
    rs = _rows(v, p["lung_v"] - b, p["lung_v"] + b)
    cs = _cols(q, p["med_q"], qc + a * (1.0 + taper))
    qw, vw = q[:, :, cs], v[:, rs]
    dv = vw - p["lung_v"]
    inv_a = 1.0 / (a * (1.0 + taper * dv / b))  # narrow apex, wide base
    x2 = ((qw - qc) * inv_a) ** 2
    y2 = (dv / b) ** 2
    r = x2 * ((1.0 - sq) + sq * x2) + ((1.0 - sq) * y2 + sq * y2 * y2)  # ellipse .. squircle
    medial = p["med_q"] + p["med_slope"] * (vw + 1.0)
    lung = (r < 1.0) & (vw < _dome(qw, p, side)) & (qw > medial)
    hr, hc = _heart_window(u, v, p)
    hr, hc = _overlap(hr, rs), _overlap(hc, cs)
    heart = v[:, hr] > _heart_top(u[:, :, hc], p)
    lung[:, hr.start - rs.start:hr.stop - rs.start, hc.start - cs.start:hc.stop - cs.start] &= ~heart
    return lung, (rs, cs)


def _lungs(u: np.ndarray, v: np.ndarray, p: dict) -> np.ndarray:
    """Both lung fields as one boolean (B, H, W) mask."""
    lungs = np.zeros((u.shape[0], v.shape[1], u.shape[2]), bool)
    for side in ("r_", "l_"):
        block, (rs, cs) = _lung(u, v, p, side)
        lungs[:, rs, cs] |= block
    return lungs


def _ribs(u: np.ndarray, v: np.ndarray, p: dict) -> tuple[np.ndarray, slice]:
    """Posterior ribs: periodic curved bands that run laterally and bend
    down, fading at the spine, the chest wall and below the diaphragm.
    Returns (intensity on the rows it covers, those rows)."""
    rs = _rows(v, -0.95, 0.75)
    vw = v[:, rs]
    au = np.abs(u)
    lr = np.where(u < 0, p["rib_lr"], 0.0)  # the two sides slightly out of phase
    k = _F32(2 * np.pi) / p["rib_sp"]
    col_angle = (p["rib_al"] * au + p["rib_be"] * au * au) * k + (lr - p["rib_ph"]) * _F32(2 * np.pi)
    c0 = 1.0 - 2.0 * p["rib_w"]  # band width as a fraction of the period
    colw = np.clip((au - 0.06) / 0.1, 0.0, 1.0) * np.clip((p["body_a"] - 0.04 - au) / 0.08, 0.0, 1.0)
    roww = np.clip((vw + 0.95) / 0.1, 0.0, 1.0) * np.clip((0.75 - vw) / 0.2, 0.0, 1.0)
    band = np.cos(vw * k - col_angle)
    band -= c0
    np.maximum(band, 0.0, out=band)
    band *= colw * (p["rib_int"] / (1.0 - c0))
    band *= roww
    return band, rs


def _clavicles(u: np.ndarray, v: np.ndarray, p: dict) -> tuple[np.ndarray, slice]:
    """Clavicles: bright tubes from the sternum rising towards the shoulders.
    Returns (intensity on the rows they can reach, those rows)."""
    rs = _rows(v, p["clav_v"] - 0.6 * p["clav_sl"] - 0.06, p["clav_v"] + 0.12)
    au = np.abs(u)
    inv_t = 1.0 / p["clav_t"]
    centre = (p["clav_v"] - p["clav_sl"] * (au - 0.1) + 0.35 * (au - 0.35) ** 2) * inv_t
    colw = np.clip((au - 0.05) / 0.04, 0.0, 1.0) * np.clip((0.62 - au) / 0.05, 0.0, 1.0)
    d = v[:, rs] * inv_t - centre
    tube = np.maximum(1.0 - d * d, 0.0)
    tube *= colw * _F32(0.16)
    return tube, rs


def _mediastinum(img: np.ndarray, u: np.ndarray, v: np.ndarray, p: dict) -> None:
    """Add the central bright band (mediastinum), the faint spine with
    vertebral bodies and the dark trachea, each as an outer product on the
    columns it covers."""
    cs = _cols(u, -0.5, 0.5)
    uw = u[:, :, cs]
    rows = np.clip((v + 1.05) / 0.2, 0.0, 1.0) * np.clip((0.75 - v) / 0.35, 0.3, 1.0)
    img[:, :, cs] += np.exp(-((uw / 0.2) ** 4)) * p["med_int"] * rows
    cs = _cols(u, -0.065, 0.065)
    spine_col = np.clip(1.0 - (u[:, :, cs] / 0.065) ** 2, 0.0, 1.0) * p["spine_int"]
    img[:, :, cs] += spine_col * (0.65 + 0.35 * np.cos(_F32(2 * np.pi / 0.11) * v) ** 2)
    cs, rs = _cols(u, -0.035, 0.035), _rows(v, -2.0, -0.15)
    trachea_col = np.clip(1.0 - (u[:, :, cs] / 0.035) ** 2, 0.0, 1.0) * _F32(0.09)
    img[:, rs, cs] -= trachea_col * np.clip((-0.25 - v[:, rs]) / 0.1, 0.0, 1.0)


def _opacities(u: np.ndarray, v: np.ndarray, p: dict, sel: np.ndarray) -> np.ndarray:
    """Lung Opacity: clusters of soft anisotropic Gaussians centred in a lung
    (patchy consolidation), for the selected images only; separable per blob."""
    out = np.zeros((len(sel), v.shape[1], u.shape[2]), _F32)
    blobs = p["blobs"][sel]  # (S, K, 6)
    us, vs = u[sel, 0, :], v[sel, :, 0]
    for k in range(_N_BLOBS):
        lead = blobs[:, k - k % 2]  # blob pairs share side and rough place
        right = lead[:, 0] < 0.5  # image-left lung

        def pick(name: str) -> np.ndarray:
            return np.where(right, p["r_" + name][sel, 0, 0], p["l_" + name][sel, 0, 0])

        pos = lead[:, 1:3] + (k % 2) * 0.3 * blobs[:, k, 1:3]
        cu = np.where(right, -1.0, 1.0) * (pick("qc") + pos[:, 0] * 0.8 * pick("a"))
        cv = p["lung_v"][sel, 0, 0] + pos[:, 1] * 0.6 * pick("b")
        amp = np.where(k // 2 < p["n_clusters"][sel], blobs[:, k, 5], 0.0)
        gu = np.exp(-0.5 * ((us - cu[:, None]) / blobs[:, k, 3:4]) ** 2).astype(_F32)
        gv = np.exp(-0.5 * ((vs - cv[:, None]) / blobs[:, k, 4:5]) ** 2) * amp[:, None]
        out += gv.astype(_F32)[:, :, None] * gu[:, None, :]
    return np.minimum(out, _F32(0.3))


# --------------------------------------------------------------------------
# acquisition and markers

_GLYPHS = (  # 5x3 letter-like burned-in markers ("L", "R", "P", "A", "H")
    ("#..", "#..", "#..", "#..", "###"),
    ("##.", "#.#", "##.", "#.#", "#.#"),
    ("##.", "#.#", "##.", "#..", "#.."),
    (".#.", "#.#", "###", "#.#", "#.#"),
    ("#.#", "#.#", "###", "#.#", "#.#"),
)


def _corner_marker(size: int, site: int, corner: int) -> tuple[slice, slice, np.ndarray]:
    """Site's burned-in marker: a letter in a small frame in its corner.
    Returns (rows, cols, boolean glyph block)."""
    cell = max(1, size // 64)
    glyph = np.array([[c == "#" for c in row] for row in _GLYPHS[site % len(_GLYPHS)]])
    glyph = np.kron(glyph, np.ones((cell, cell), bool))
    block = np.ones((glyph.shape[0] + 4 * cell, glyph.shape[1] + 4 * cell), bool)
    block[cell:-cell, cell:-cell] = False
    block[2 * cell:-2 * cell, 2 * cell:-2 * cell] = glyph
    margin = max(1, size // 40)
    h, w = block.shape
    r0 = margin if corner in (0, 1) else size - margin - h
    c0 = margin if corner in (0, 2) else size - margin - w
    return slice(r0, r0 + h), slice(c0, c0 + w), block


def _label_marker(size: int) -> tuple[slice, slice]:
    """Spurious class-2 shortcut: a small bright square at a fixed spot
    low on the image right (abdomen), away from the corner markers."""
    side = max(2, size // 40)
    r0, c0 = int(0.88 * size), int(0.64 * size)
    return slice(r0, r0 + side), slice(c0, c0 + side)


def _tone_lut(look: SiteLook) -> np.ndarray:
    """Site contrast and gamma as one table over raw intensities
    [_RAW_LO, _RAW_HI] -> display 0..255; a table is far cheaper than a
    per-pixel power.  Includes +0.5 for rounding and minus the noise mean."""
    raw = np.linspace(_RAW_LO, _RAW_HI, _LUT_LEVELS)
    x = np.clip((raw - 0.3) * look.contrast + 0.3, 0.0, 1.0)
    return (255.0 * x ** look.gamma + 0.5 - 127.5 * _noise_scale(look)).astype(_F32)


def _noise_scale(look: SiteLook) -> float:
    """Display units per noise byte: the site's noise std (a fraction of
    full scale) over the std of a uniform byte."""
    return 255.0 * look.noise / 73.9


def _noise(index: np.ndarray, size: int, seed: int, scale: float) -> np.ndarray:
    """Pixel noise: uniform bytes times ``scale`` (mean 127.5 * scale, taken
    out in the tone table), one generator per image so chunking cannot
    change it.  Bytes are ~8x cheaper than normals and look the same."""
    raw = np.frombuffer(b"".join(
        np.random.default_rng([seed, _NOISE_STREAM, i]).bytes(size * size) for i in index.tolist()
    ), np.uint8).reshape(len(index), size, size)
    noise = raw.astype(_F32)
    noise *= _F32(scale)
    return noise


def _upsample2(x: np.ndarray, axis: int) -> np.ndarray:
    """Double ``x`` along ``axis`` by linear interpolation: fine pixels 2k
    and 2k+1 sit a quarter coarse pixel either side of coarse pixel k; edges
    are clamped."""
    def part(start, stop):
        return (slice(None),) * axis + (slice(start, stop),)

    q = x * _F32(0.25)
    even = x - q  # 0.75 x
    odd = even.copy()
    even[part(1, None)] += q[part(None, -1)]
    even[part(0, 1)] += q[part(0, 1)]
    odd[part(None, -1)] += q[part(1, None)]
    odd[part(-1, None)] += q[part(-1, None)]
    shape = list(x.shape)
    shape[axis] *= 2
    return np.stack([even, odd], axis=axis + 1).reshape(shape)


def _acquire(img: np.ndarray, index: np.ndarray, sites: np.ndarray, p: dict,
             looks: list[SiteLook], size: int, seed: int) -> np.ndarray:
    """Half-resolution raw image -> uint8 (B, size, size): site blur,
    exposure, contrast and gamma on the coarse grid, then upsampling (which
    adds about the base blur any radiograph has), per-image noise and the
    site's corner marker at full resolution."""
    out = np.empty((len(index), size, size), np.uint8)
    lut_scale = _F32((_LUT_LEVELS - 1) / (_RAW_HI - _RAW_LO))
    for s in np.unique(sites).tolist():
        look = looks[s]
        sel = np.flatnonzero(sites == s)
        sigma = look.blur * size / 512.0  # in coarse pixels (two fine ones)
        x = gaussian_filter1d(img[sel], sigma, axis=2, mode="nearest", truncate=2.5)
        x = gaussian_filter1d(x, sigma, axis=1, mode="nearest", truncate=2.5)
        x += p["exposure"][sel] - _F32(_RAW_LO)
        x *= lut_scale
        np.clip(x, 0.0, _F32(_LUT_LEVELS - 1), out=x)
        y = _tone_lut(look)[x.astype(np.int32)]  # int32 indices: the cheapest cast
        y = _upsample2(_upsample2(y, 2), 1)[:, :size, :size]
        y += _noise(index[sel], size, seed, _noise_scale(look))
        np.clip(y, 0.0, 255.0, out=y)
        out[sel] = y  # truncation; the table added 0.5
        rs, cs, glyph = _corner_marker(size, s, look.marker_corner)
        out[sel, rs, cs] = np.where(glyph, np.uint8(245), out[sel, rs, cs])
    return out


# --------------------------------------------------------------------------
# rendering


def _coords(grid: np.ndarray, looks: list[SiteLook], sites: np.ndarray, p: dict) -> tuple[np.ndarray, np.ndarray]:
    """Anatomy coordinates of pixel centres ``grid``: u (B, 1, W), v (B, H, 1)."""
    zoom = np.array([looks[s].zoom for s in sites], _F32)[:, None, None] * p["zoom_j"]
    sx = np.array([looks[s].shift[0] for s in sites], _F32)[:, None, None] + p["shift_x"]
    sy = np.array([looks[s].shift[1] for s in sites], _F32)[:, None, None] + p["shift_y"]
    return (grid[None, None, :] - sx) / zoom, (grid[None, :, None] - sy) / zoom


def _coverage(lungs: np.ndarray) -> np.ndarray:
    """Fraction of each 2x2 block of the exact mask that is lung: the
    anti-aliased lung field the half-resolution image is drawn with."""
    m = lungs.view(np.uint8)
    cover = m[:, 0::2, 0::2] + m[:, 1::2, 0::2]
    cover += m[:, 0::2, 1::2]
    cover += m[:, 1::2, 1::2]
    return cover * _F32(0.25)


def _compose(u: np.ndarray, v: np.ndarray, p: dict, cover: np.ndarray, size: int) -> np.ndarray:
    """Raw (pre-acquisition) intensities on the coarse grid: tissue,
    mediastinum, heart, abdomen, bones, dark lungs and opacities."""
    body = _body(u, v, p, size)
    img = body * _tissue(u, p)
    _mediastinum(img, u, v, p)
    dome = np.where(u < 0, _dome(-u, p, "r_"), _dome(u, p, "l_"))
    below = v > dome
    img += below * _F32(0.04)  # abdomen/liver below the domes
    hr, hc = _heart_window(u, v, p)
    heart = (v[:, hr] > _heart_top(u[:, :, hc], p)) & ~below[:, hr, hc]  # heart sits on the diaphragm
    img[:, hr, hc] += heart * p["heart_int"]
    ribs, rr = _ribs(u, v, p)
    ribs *= _F32(0.5)  # half everywhere, the other half over the lungs
    img[:, rr] += ribs
    clav, cr = _clavicles(u, v, p)
    img[:, cr] += clav
    hilum = np.exp(-(((np.abs(u) - 0.2) / 0.14) ** 2)) * (_F32(0.35) * np.exp(-(((v - p["lung_v"]) / 0.3) ** 2)))
    dark = p["lung_dark"] - p["lung_dark"] * hilum  # air: dark, vessels near the hila
    dark[:, rr] -= ribs
    dark *= cover
    img -= dark
    opaque = np.flatnonzero(p["labels"] == 2)
    if len(opaque):
        img[opaque] += _opacities(u, v, p, opaque) * cover[opaque]
    img *= body  # background 0 (_RAW_LO keeps it above black after exposure)
    return img


def _render(index: np.ndarray, looks: list[SiteLook], size: int, seed: int, label_marker: float) -> PhantomBatch:
    """Render one chunk, vectorised over (B, H, W).

    The exact lung mask is computed at full resolution; the image is
    composed at half resolution (a quarter of the work) with the mask's 2x2
    coverage as anti-aliased lung field, then upsampled during acquisition,
    which costs about the base blur any radiograph has anyway.
    """
    sites = (index % len(looks)).astype(np.int64)
    p = _draw_params(index, sites, looks, seed)
    _apply_abnormalities(p)
    half = (size + 1) // 2
    fine = ((np.arange(2 * half, dtype=_F32) * 2 + 1) / size - 1).astype(_F32)  # odd size: 1 px spare
    lungs = _lungs(*_coords(fine, looks, sites, p), p)
    coarse = (fine[0::2] + fine[1::2]) * _F32(0.5)
    img = _compose(*_coords(coarse, looks, sites, p), p, _coverage(lungs), size)
    lungs = lungs[:, :size, :size]

    images = _acquire(img, index, sites, p, looks, size, seed)
    marked = np.flatnonzero((p["labels"] == 2) & (p["marker_u"] < label_marker))
    if len(marked):
        rs, cs = _label_marker(size)
        images[marked, rs, cs] = np.where(lungs[marked, rs, cs], images[marked, rs, cs], np.uint8(255))
    return PhantomBatch(
        images=images,
        masks=lungs.view(np.uint8) * np.uint8(255),
        labels=p["labels"],
        sites=sites,
        index=index.astype(np.int64),
    )


def generate_phantoms(n: int, sites: int = 4, size: int = 256, seed: int = 0,
                      chunk: int = 64, label_marker: float = 0.0) -> Iterator[PhantomBatch]:
    """Yield ``n`` phantoms in chunks of at most ``chunk`` images, in index order.

    Image ``i`` belongs to site ``i % sites`` and its pixels depend only on
    ``(i, sites, size, seed, label_marker)``.  ``label_marker`` is the
    probability that a Lung Opacity image gets an extra bright square burned
    in outside the lungs at a fixed place (a spurious shortcut for
    interpretability tests).  Arguments are checked before the first chunk.
    """
    n = _check_int("n", n, 1)
    sites = _check_int("sites", sites, 1)
    size = _check_int("size", size, 32)
    seed = _check_int("seed", seed, 0)
    chunk = _check_int("chunk", chunk, 1)
    try:
        label_marker = float(label_marker)
    except (TypeError, ValueError):
        raise ValueError(f"label_marker must be a number in [0, 1], got {label_marker!r}") from None
    if not 0.0 <= label_marker <= 1.0:
        raise ValueError(f"label_marker must be in [0, 1], got {label_marker!r}")
    looks = site_looks(sites, seed)

    def render(start: int) -> PhantomBatch:
        index = np.arange(start, min(n, start + chunk), dtype=np.int64)
        return _render(index, looks, size, seed, label_marker)

    return _prefetch(render, range(0, n, chunk))


def _workers() -> int:
    """Render threads: two when two CPUs are available (more gains little,
    the caller's own work needs a core too)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(2, cpus))


def _prefetch(render, starts: range) -> Iterator[PhantomBatch]:
    """Yield ``render(start)`` in order while the next chunk renders in a
    second thread.  Why: numpy/scipy release the GIL, so two cores nearly
    halve the time; chunks are independent, so threads cannot change pixels."""
    workers = min(_workers(), len(starts))
    if workers <= 1:
        for start in starts:
            yield render(start)
        return
    todo = iter(starts)
    with ThreadPoolExecutor(workers, thread_name_prefix="phantoms") as pool:
        pending = deque(pool.submit(render, s) for s in islice(todo, workers))
        try:
            while pending:
                batch = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(render, nxt))
                yield batch
        finally:  # consumer stopped early: drop queued work
            for future in pending:
                future.cancel()


def write_synthetic_dataset(out, n: int = 2000, sites: int = 4, size: int = 256, seed: int = 0,
                            label_marker: float = 0.0, val_frac: float = 0.1, test_frac: float = 0.2,
                            progress: bool = True) -> dict:
    """Write ``generate_phantoms(...)`` as a dataset folder (same schema as ingested data).

    Each phantom is its own patient; its split is the seeded patient hash every dataset uses,
    and its sex and age come from its own generator, so the same arguments give the same bytes.
    Returns the dataset card.
    """
    from cxrfl_ray.data.imageio import encode_png
    from cxrfl_ray.data.splits import patient_split
    from cxrfl_ray.data.writer import DatasetWriter
    from tqdm import tqdm

    args = {"n": n, "sites": sites, "size": size, "seed": seed, "label_marker": label_marker}
    batches = generate_phantoms(n, sites=sites, size=size, seed=seed, label_marker=label_marker)
    looks = site_looks(sites, seed)
    sources = [{"generator": "cxrfl synth", **args}]
    extra = {"synthetic": {**args, "site_label_mix": {f"site{k}": list(lk.label_mix) for k, lk in enumerate(looks)}}}
    with ThreadPoolExecutor(_workers()) as pool, \
            DatasetWriter(out, name=f"phantoms-{n}-s{seed}", label_names=LABEL_NAMES, sources=sources,
                          extra=extra) as writer, \
            tqdm(total=n, desc="synth", unit="img", disable=not progress, leave=False) as bar:
        for batch in batches:
            pngs = list(pool.map(encode_png, [*batch.images, *batch.masks]))
            for k, i in enumerate(batch.index.tolist()):
                rng = np.random.default_rng([seed, 99, i])
                pid = f"synth-{i:06d}"
                writer.add({
                    "id": f"synth:{i:06d}", "source": "synthetic", "site": f"site{int(batch.sites[k])}",
                    "patient_id": pid, "split": patient_split(pid, seed, val_frac, test_frac),
                    "label": int(batch.labels[k]), "label_name": LABEL_NAMES[int(batch.labels[k])],
                    "image": pngs[k], "height": size, "width": size, "bit_depth": 8,
                    "mask": pngs[len(batch.index) + k], "view": "PA",
                    "sex": "F" if rng.random() < 0.5 else "M", "age": float(rng.integers(18, 90)),
                    "original_path": None, "boxes": None,
                })
            bar.update(len(batch.index))
        return writer.card()
