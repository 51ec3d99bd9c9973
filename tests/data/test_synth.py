"""Tests for the synthetic chest X-ray phantoms (cxrfl_ray.data.synth)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cxrfl_ray.data.synth import (
    LABEL_NAMES,
    PhantomBatch,
    SiteLook,
    generate_phantoms,
    site_looks,
)


def _collect(**kwargs) -> dict[str, np.ndarray]:
    """Concatenate every batch of one generate_phantoms call."""
    batches = list(generate_phantoms(**kwargs))
    assert all(isinstance(b, PhantomBatch) for b in batches)
    return {
        field: np.concatenate([getattr(b, field) for b in batches])
        for field in ("images", "masks", "labels", "sites", "index")
    }


@pytest.fixture(scope="module")
def big() -> dict[str, np.ndarray]:
    """2000 small phantoms over 4 sites: enough for per-site statistics."""
    data = _collect(n=2000, sites=4, size=64, seed=0)
    data["lung"] = data["masks"] > 0
    img = data["images"].astype(np.float64)
    data["inside"] = (img * data["lung"]).sum((1, 2)) / data["lung"].sum((1, 2))
    data["fraction"] = data["lung"].mean((1, 2))
    return data


def test_label_names():
    assert LABEL_NAMES == ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")


def test_shapes_dtypes_and_order():
    batches = list(generate_phantoms(n=23, sites=3, size=48, seed=1, chunk=10))
    assert [len(b.images) for b in batches] == [10, 10, 3]
    data = _collect(n=23, sites=3, size=48, seed=1, chunk=10)
    assert data["images"].shape == (23, 48, 48) and data["images"].dtype == np.uint8
    assert data["masks"].shape == (23, 48, 48) and data["masks"].dtype == np.uint8
    for field in ("labels", "sites", "index"):
        assert data[field].shape == (23,) and data[field].dtype == np.int64
    np.testing.assert_array_equal(data["index"], np.arange(23))
    np.testing.assert_array_equal(data["sites"], np.arange(23) % 3)
    assert set(np.unique(data["labels"])) <= {0, 1, 2}


@pytest.mark.parametrize("size", [32, 33, 101])
def test_small_and_odd_sizes(size):
    data = _collect(n=6, sites=2, size=size, seed=3)
    assert data["images"].shape == (6, size, size)
    assert data["masks"].shape == (6, size, size)
    assert set(np.unique(data["masks"])) == {0, 255}


def test_deterministic_and_chunk_independent():
    a = _collect(n=40, sites=3, size=64, seed=7, chunk=64)
    b = _collect(n=40, sites=3, size=64, seed=7, chunk=64)
    c = _collect(n=40, sites=3, size=64, seed=7, chunk=7)
    for field in a:
        np.testing.assert_array_equal(a[field], b[field])
        np.testing.assert_array_equal(a[field], c[field])


def test_prefix_is_stable():
    """Image i does not depend on n: a shorter run is a prefix of a longer one."""
    short = _collect(n=9, sites=3, size=64, seed=4)
    long = _collect(n=30, sites=3, size=64, seed=4, chunk=8)
    for field in short:
        np.testing.assert_array_equal(short[field], long[field][:9])


def test_different_seed_gives_different_images():
    a = _collect(n=8, size=64, seed=0)
    b = _collect(n=8, size=64, seed=1)
    assert not np.array_equal(a["masks"], b["masks"])
    # every single image differs, not just some
    assert all(not np.array_equal(x, y) for x, y in zip(a["images"], b["images"]))


def test_masks_binary_and_plausible(big):
    assert set(np.unique(big["masks"])) == {0, 255}
    assert big["fraction"].min() > 0.10 and big["fraction"].max() < 0.60
    components = np.array([ndimage.label(m)[1] for m in big["lung"]])
    assert np.mean(components == 2) > 0.95


def test_lungs_are_dark_and_left_right(big):
    """Lungs are darker than the rest of the body, and there is one on each
    side of the image centre."""
    lung, img = big["lung"], big["images"].astype(np.float64)
    size = img.shape[-1]
    centre = img[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4]
    centre_lung = lung[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4]
    outside = (centre * ~centre_lung).sum((1, 2)) / (~centre_lung).sum((1, 2))
    assert np.mean(big["inside"] < outside) > 0.95
    left = lung[:, :, : size // 2].sum((1, 2))
    right = lung[:, :, size // 2:].sum((1, 2))
    assert (left > 0).all() and (right > 0).all()
    # the heart takes room from the image-right lung (patient's left)
    assert np.mean(right < left) > 0.65 and right.mean() < 0.95 * left.mean()


def test_lung_opacity_is_inside_the_lungs(big):
    """Class 2 brightens the lung fields and (almost) nothing outside them."""
    size = big["images"].shape[-1]
    band = np.zeros((size, size), bool)  # rows/cols of the chest, markers excluded
    band[size // 8: 7 * size // 8, size // 8: 7 * size // 8] = True
    rest = ~big["lung"] & band
    outside = (big["images"] * rest).sum((1, 2)) / rest.sum((1, 2))
    for s in range(4):
        at = big["sites"] == s
        normal, opacity = (at & (big["labels"] == 0)), (at & (big["labels"] == 2))
        gain_in = big["inside"][opacity].mean() - big["inside"][normal].mean()
        gain_out = outside[opacity].mean() - outside[normal].mean()
        assert gain_in > 4.0, (s, gain_in)
        assert abs(gain_out) < 0.25 * gain_in, (s, gain_in, gain_out)


def test_not_normal_differs_outside_not_inside(big):
    """Class 1 (cardiomegaly / effusion) keeps lung brightness but shrinks the
    visible lung field, unlike class 2 which brightens the lungs."""
    for s in range(4):
        at = big["sites"] == s
        inside = [big["inside"][at & (big["labels"] == c)].mean() for c in range(3)]
        frac = [big["fraction"][at & (big["labels"] == c)].mean() for c in range(3)]
        assert abs(inside[1] - inside[0]) < 0.4 * (inside[2] - inside[0]), (s, inside)
        assert frac[1] < frac[0] - 0.008, (s, frac)
        assert abs(frac[2] - frac[0]) < 0.008, (s, frac)


def test_site_label_mixes_differ(big):
    counts = np.array([np.bincount(big["labels"][big["sites"] == s], minlength=3) for s in range(4)])
    assert counts.sum() == 2000 and (counts.sum(1) == 500).all()
    props = counts / counts.sum(1, keepdims=True)
    assert (props > 0).all()
    assert np.abs(props - props.mean(0)).max() > 0.05
    looks = site_looks(4, seed=0)
    for s, look in enumerate(looks):  # empirical mix follows the drawn mix
        np.testing.assert_allclose(props[s], look.label_mix, atol=0.08)


def test_site_looks_differ(big):
    looks = site_looks(4, seed=0)
    assert len(looks) == 4 and all(isinstance(x, SiteLook) for x in looks)
    assert all(abs(sum(x.label_mix) - 1.0) < 1e-9 for x in looks)
    for field in ("contrast", "gamma", "noise", "blur", "zoom"):
        assert len({getattr(x, field) for x in looks}) == 4, field
    assert len({x.marker_corner for x in looks}) == 4  # first four sites use all corners
    means = [big["images"][big["sites"] == s].mean() for s in range(4)]
    assert max(means) - min(means) > 10.0, means
    assert site_looks(4, seed=0) == looks  # deterministic
    assert site_looks(6, seed=0)[:4] == looks  # adding sites keeps existing ones
    assert site_looks(4, seed=1) != looks


def test_corner_marker_in_site_corner(big):
    size = big["images"].shape[-1]
    k = size // 4
    corners = {0: (slice(0, k), slice(0, k)), 1: (slice(0, k), slice(size - k, size)),
               2: (slice(size - k, size), slice(0, k)), 3: (slice(size - k, size), slice(size - k, size))}
    for s, look in enumerate(site_looks(4, seed=0)):
        imgs = big["images"][big["sites"] == s]
        for corner, (rs, cs) in corners.items():
            marker_pixels = (imgs[:, rs, cs] == 245).sum((1, 2))
            if corner == look.marker_corner:
                assert (marker_pixels >= 10).all()
            else:
                assert (marker_pixels < 10).all()


def test_label_marker_only_on_lung_opacity_outside_lungs():
    plain = _collect(n=120, sites=4, size=64, seed=5)
    marked = _collect(n=120, sites=4, size=64, seed=5, label_marker=1.0)
    np.testing.assert_array_equal(plain["masks"], marked["masks"])
    np.testing.assert_array_equal(plain["labels"], marked["labels"])
    changed = plain["images"] != marked["images"]
    opacity = plain["labels"] == 2
    assert opacity.sum() > 10
    assert not changed[~opacity].any()
    assert changed[opacity].any(axis=(1, 2)).all()
    assert not (changed & (plain["masks"] > 0)).any()
    # the marker sits at the same place in every marked image
    where = changed[opacity].any(axis=0)
    assert changed[opacity].all(axis=0)[where].mean() > 0.9
    assert (marked["images"][opacity][:, where] == 255).mean() > 0.9


def test_label_marker_probability():
    plain = _collect(n=200, sites=2, size=48, seed=2)
    half = _collect(n=200, sites=2, size=48, seed=2, label_marker=0.5)
    opacity = plain["labels"] == 2
    changed = (plain["images"] != half["images"]).any(axis=(1, 2))
    assert not changed[~opacity].any()
    assert 0.2 < changed[opacity].mean() < 0.8


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"n": 0}, "n"),
        ({"n": 5, "sites": 0}, "sites"),
        ({"n": 5, "size": 31}, "size"),
        ({"n": 5, "label_marker": 1.5}, "label_marker"),
        ({"n": 5, "label_marker": -0.1}, "label_marker"),
        ({"n": 5, "label_marker": float("nan")}, "label_marker"),
        ({"n": 5, "seed": -1}, "seed"),
        ({"n": 5, "chunk": 0}, "chunk"),
        ({"n": 2.5}, "n"),
    ],
)
def test_invalid_arguments(kwargs, name):
    # raised at call time, before iterating
    with pytest.raises(ValueError, match=rf"^{name} must"):
        generate_phantoms(**kwargs)


def test_site_looks_invalid():
    with pytest.raises(ValueError, match=r"^sites must"):
        site_looks(0, seed=0)


# -- the dataset the `cxrfl synth` command writes -------------------------------------------

def test_synth_command_writes_a_reproducible_dataset(tmp_path):
    from cxrfl_ray.cli import main as cxrfl
    from cxrfl_ray.data.imageio import decode_png
    from cxrfl_ray.data.store import open_dataset

    for name in ("a", "b"):
        assert cxrfl(["synth", "--out", str(tmp_path / name), "--n", "48", "--sites", "3",
                      "--size", "64", "--seed", "5", "--quiet"]) == 0
    a, b = open_dataset(tmp_path / "a"), open_dataset(tmp_path / "b")
    assert a.card["num_rows"] == 48 and a.card["num_masks"] == 48
    assert a.card["counts"]["site"] == {"site0": 16, "site1": 16, "site2": 16}
    assert a.card["label_names"] == list(LABEL_NAMES)
    cols = ["id", "image", "mask", "label", "split", "site"]
    ta, tb = a.take(range(48), cols), b.take(range(48), cols)
    assert ta.equals(tb)
    batch = next(generate_phantoms(48, sites=3, size=64, seed=5))
    np.testing.assert_array_equal(decode_png(ta.column("image")[7].as_py()), batch.images[7])
    np.testing.assert_array_equal(decode_png(ta.column("mask")[7].as_py()), batch.masks[7])
    assert ta.column("label").to_pylist() == batch.labels.tolist()
    assert set(ta.column("split").to_pylist()) == {"train", "val", "test"}
