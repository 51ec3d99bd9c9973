"""Ingestion of real-image layouts: every good row lands, every bad one is listed with why."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cxrfl_ray.cli import main as cxrfl
from cxrfl_ray.data.imageio import decode_png
from cxrfl_ray.data.ingest import LAYOUTS, IngestError, IngestOptions, ingest
from cxrfl_ray.data.ingest import pipeline
from cxrfl_ray.data.store import open_dataset
from tests.conftest import gradient, write_dicom, write_png

OPTS = IngestOptions(progress=False, workers=2)


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def lungs(h: int, w: int) -> np.ndarray:
    """A 0/255 mask with lungs and background (an all-255 mask is flagged, not kept)."""
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: 3 * h // 4, w // 8: w // 2] = 255
    return mask


def rows_by_id(path: Path) -> dict:
    ds = open_dataset(path)
    table = ds.take(np.arange(ds.num_rows))
    return {r["id"]: r for r in table.to_pylist()}


@pytest.fixture()
def messy_manifest(tmp_path):
    """A manifest folder with 3 good images and one of every kind of bad input."""
    root = tmp_path / "src"
    images, masks = root / "images", root / "masks"
    for i in range(3):
        write_png(images / f"good{i}.png", gradient(40, 30, seed=i))
    write_png(masks / "good0_mask.png", (gradient(40, 30) > 128).astype(np.uint8) * 255)
    write_png(masks / "small_mask.png", np.zeros((20, 15), np.uint8))
    write_png(images / "wrongmask.png", gradient(40, 30, seed=9))
    (images / "empty.png").write_bytes(b"")
    (images / "garbage.png").write_bytes(b"not a picture at all")
    write_png(images / "trunc.png", gradient(64, 64))
    (images / "trunc.png").write_bytes((images / "trunc.png").read_bytes()[:150])
    write_dicom(images / "nopix.dcm", None, PatientID="q")
    write_png(images / "badlabel.png", gradient(40, 30, seed=7))
    write_csv(root / "labels.csv", ["filename", "label", "mask_file", "pid"], [
        ["good0.png", "normal", "good0_mask.png", "p0"],
        ["good1.png", "pneumonia", "", "p1"],
        ["good2.png", "unknown", "", "p1"],
        ["good1.png", "pneumonia", "", "p1"],  # duplicate id
        ["wrongmask.png", "normal", "small_mask.png", "p3"],
        ["empty.png", "normal", "", "p4"],
        ["garbage.png", "normal", "", "p5"],
        ["trunc.png", "normal", "", "p6"],
        ["nopix.dcm", "normal", "", "p7"],
        ["badlabel.png", "covid", "", "p8"],
        ["missing.png", "normal", "", "p9"],
    ])
    return root


def test_bad_inputs_are_skipped_with_reasons_and_good_rows_land(messy_manifest, tmp_path):
    out = tmp_path / "ds"
    entries = LAYOUTS["manifest"](messy_manifest, source="m", columns={"patient_id": "pid"})
    card = ingest(entries, out, name="m", source="m",
                  options=IngestOptions(label_names=["normal", "pneumonia"], progress=False))
    rows = rows_by_id(out)
    assert sorted(rows) == ["m:good0", "m:good1", "m:good2"]
    assert rows["m:good0"]["label"] == 0 and rows["m:good1"]["label"] == 1
    assert rows["m:good2"]["label"] == -1  # "unknown" means unlabelled
    assert rows["m:good1"]["patient_id"] == "p1"
    assert rows["m:good0"]["mask"] is not None and rows["m:good1"]["mask"] is None
    np.testing.assert_array_equal(decode_png(rows["m:good1"]["image"]), gradient(40, 30, seed=1))

    reasons = {Path(s["path"]).name: s["reason"] for s in card["skipped"]}
    assert "duplicate id 'm:good1'" in reasons["good1.png"]
    assert "mask small_mask.png is 15x20 but the image is 30x40" in reasons["wrongmask.png"]
    assert reasons["empty.png"] == "empty file"
    assert "undecodable" in reasons["garbage.png"]
    assert "undecodable" in reasons["trunc.png"]
    assert reasons["nopix.dcm"] == "DICOM has no pixel data"
    assert "label 'covid' is not in the label set" in reasons["badlabel.png"]
    assert reasons["missing.png"] == "file listed in the CSV is missing"
    assert card["num_skipped"] == 8 and card["num_rows"] == 3

    saved = json.loads((out / "dataset.json").read_text())
    assert saved["num_skipped"] == 8 and saved["counts"]["label"] == {"none": 1, "normal": 1, "pneumonia": 1}
    with open(out / "skipped.csv") as fh:
        listed = list(csv.DictReader(fh))
    assert {Path(r["path"]).name for r in listed} == set(reasons)


def test_strict_fails_and_leaves_the_previous_dataset(messy_manifest, tmp_path):
    out = tmp_path / "ds"
    entries = LAYOUTS["manifest"](messy_manifest, source="m")
    ingest(entries, out, name="first", source="m", options=OPTS)
    strict = IngestOptions(strict=True, progress=False)
    with pytest.raises(IngestError, match="--strict"):
        ingest(entries, out, name="second", source="m", options=strict)
    assert open_dataset(out).card["name"] == "first"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_crash_midway_never_leaves_a_half_dataset(messy_manifest, tmp_path, monkeypatch):
    out = tmp_path / "ds"
    entries = LAYOUTS["manifest"](messy_manifest, source="m")
    ingest(entries, out, name="first", source="m", options=OPTS)
    calls = {"n": 0}
    real = pipeline._make_row

    def crash_on_second(*args, **kwargs):  # fault injection: the process dies mid-ingest
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_make_row", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        ingest(entries, out, name="second", source="m", options=IngestOptions(progress=False, workers=1))
    assert open_dataset(out).card["name"] == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "src"]


def test_rerun_replaces_output_atomically(messy_manifest, tmp_path):
    out = tmp_path / "ds"
    entries = LAYOUTS["manifest"](messy_manifest, source="m")
    ingest(entries, out, name="one", source="m", options=OPTS)
    ingest(entries[:1], out, name="two", source="m", options=OPTS)
    assert open_dataset(out).card["name"] == "two" and open_dataset(out).num_rows == 1


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda r: r.rename(r.parent / "gone"), "source folder not found"),
        (lambda r: (r / "labels.csv").unlink(), "label CSV not found"),
        (lambda r: write_csv(r / "labels.csv", ["file_name", "label"], [["a.png", "x"]]), "required column 'filename'"),
    ],
)
def test_missing_folder_csv_or_column_stops_at_once(messy_manifest, setup, message):
    setup(messy_manifest)
    with pytest.raises(IngestError, match=message):
        LAYOUTS["manifest"](messy_manifest, source="m")


def test_column_mapping_names_unknown_columns(messy_manifest):
    with pytest.raises(IngestError, match="column 'patient' .*not found"):
        LAYOUTS["manifest"](messy_manifest, source="m", columns={"patient_id": "patient"})


def test_max_size_downscales_images_masks_and_boxes(tmp_path):
    root = tmp_path / "rsna"
    imgs = root / "stage_2_train_images"
    write_dicom(imgs / "a.dcm", gradient(200, 100).astype(np.uint16) * 16, bits=12, PatientSex="M")
    write_dicom(imgs / "b.dcm", gradient(100, 100), bits=8)
    write_dicom(imgs / "c.dcm", gradient(100, 100), bits=8)
    write_csv(root / "stage_2_detailed_class_info.csv", ["patientId", "class"], [
        ["a", "Lung Opacity"], ["a", "Lung Opacity"], ["b", "Normal"],
        ["c", "No Lung Opacity / Not Normal"], ["d", "Normal"],
    ])
    write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], [
        ["a", 10, 20, 30, 40, 1], ["a", 50, 60, 20, 20, 1], ["b", "", "", "", "", 0], ["c", "", "", "", "", 0],
    ])
    out = tmp_path / "ds"
    assert cxrfl(["ingest", "rsna", str(root), "--out", str(out), "--max-size", "50", "--quiet"]) == 0
    rows = rows_by_id(out)
    a = rows["rsna:a"]
    assert (a["height"], a["width"], a["bit_depth"]) == (50, 25, 16)
    assert decode_png(a["image"]).shape == (50, 25)
    assert a["label"] == 2 and a["label_name"] == "Lung Opacity" and a["sex"] == "M"
    assert a["boxes"] == [{"x": 2.5, "y": 5.0, "width": 7.5, "height": 10.0},
                          {"x": 12.5, "y": 15.0, "width": 5.0, "height": 5.0}]
    assert rows["rsna:b"]["label"] == 0 and rows["rsna:c"]["label"] == 1
    assert rows["rsna:b"]["boxes"] == []
    card = open_dataset(out).card
    assert card["label_names"] == ["Normal", "No Lung Opacity / Not Normal", "Lung Opacity"]
    assert [Path(s["path"]).name for s in card["skipped"]] == ["d.dcm"]


def test_lungseg_pairs_by_stem_and_merges_left_right(tmp_path):
    root = tmp_path / "seg"
    for stem, suffix in (("1", "-mask"), ("2", "_mask"), ("3", "")):
        write_png(root / "images" / f"{stem}.png", gradient(20, 20, seed=int(stem)))
        write_png(root / "masks" / f"{stem}{suffix}.png", lungs(20, 20))
    write_png(root / "images" / "4.png", gradient(20, 20))  # no mask
    write_png(root / "masks" / "9_mask.png", np.zeros((20, 20), np.uint8))  # no image
    entries = LAYOUTS["lungseg"](root, source="s")
    card = ingest(entries, tmp_path / "ds", name="s", source="s", options=OPTS)
    assert card["num_rows"] == 3 and card["num_masks"] == 3
    assert {Path(s["path"]).name: s["reason"] for s in card["skipped"]} == {
        "4.png": "no mask with the same stem", "9_mask.png": "mask without a matching image"}

    mont = tmp_path / "mont"
    left = np.zeros((20, 30), np.uint8); left[5:15, 2:12] = 255
    right = np.zeros((20, 30), np.uint8); right[5:15, 18:28] = 255
    write_png(mont / "CXR_png" / "MCU_0001_0.png", gradient(20, 30))
    write_png(mont / "ManualMask" / "leftMask" / "MCU_0001_0.png", left)
    write_png(mont / "ManualMask" / "rightMask" / "MCU_0001_0.png", right)
    ingest(LAYOUTS["lungseg"](mont, source="mont"), tmp_path / "ds2", name="mont", source="mont", options=OPTS)
    row = next(iter(rows_by_id(tmp_path / "ds2").values()))
    np.testing.assert_array_equal(decode_png(row["mask"]), np.maximum(left, right))


def test_lungseg_cxrfl_layout_reads_class_and_train_flag(tmp_path):
    root = tmp_path / "cxrfl"
    for i in range(4):
        write_png(root / "images" / f"{i}.jpeg", gradient(16, 16, seed=i))
        write_png(root / "masks" / f"{i}.png", lungs(16, 16))
    write_csv(root / "labels.csv", ["filename", "class", "train"],
              [["0.jpeg", "normal", 1], ["1.jpeg", "covid", 1], ["2.jpeg", "normal", 0], ["3.jpeg", "covid", 0]])
    ingest(LAYOUTS["lungseg"](root, source="c"), tmp_path / "ds", name="c", source="c", options=OPTS)
    rows = rows_by_id(tmp_path / "ds")
    assert {k: (r["split"], r["label_name"]) for k, r in rows.items()} == {
        "c:0": ("train", "normal"), "c:1": ("train", "covid"), "c:2": ("test", "normal"), "c:3": ("test", "covid")}


def test_folders_layout_with_class_images_and_masks(tmp_path):
    root = tmp_path / "covid-db"
    for cls in ("COVID", "Normal"):
        for i in range(2):
            write_png(root / cls / "images" / f"{cls}-{i}.png", gradient(24, 24, seed=i))
            write_png(root / cls / "masks" / f"{cls}-{i}.png", lungs(12, 12))
    card = ingest(LAYOUTS["folders"](root, source="db"), tmp_path / "ds", name="db", source="db",
                  options=IngestOptions(progress=False, resize_masks=True))
    assert card["label_names"] == ["COVID", "Normal"] and card["num_rows"] == 4 and card["num_masks"] == 4
    row = rows_by_id(tmp_path / "ds")["db:Normal/Normal-1"]
    assert row["label"] == 1 and decode_png(row["mask"]).shape == (24, 24)


def test_parquet_shards_store_pixels_uncompressed_and_metadata_compressed(messy_manifest, tmp_path):
    ingest(LAYOUTS["manifest"](messy_manifest, source="m"), tmp_path / "ds", name="m", source="m", options=OPTS)
    meta = pq.ParquetFile(tmp_path / "ds" / "part-00000.parquet").metadata
    cols = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i).compression
            for i in range(meta.num_columns)}
    assert cols["image"] == "UNCOMPRESSED" and cols["label_name"] == "ZSTD"


# -- the real samples beside the repo ---------------------------------------------------------

def test_every_sample_folder_ingests(samples, tmp_path):
    for folder in sorted(p for p in samples.iterdir() if p.is_dir()):
        with open(folder / "labels.csv", newline="") as fh:
            expected = sum(1 for _ in csv.DictReader(fh))
        out = tmp_path / folder.name
        assert cxrfl(["ingest", "manifest", str(folder), "--out", str(out), "--quiet"]) == 0
        ds = open_dataset(out)
        assert ds.num_rows == expected, folder.name
        assert ds.card["num_skipped"] == 0, ds.card["skipped"]
        images = ds.take(np.arange(ds.num_rows), ["image", "height", "width", "original_path", "mask"]).to_pylist()
        for row in images:
            pixels = decode_png(row["image"])
            assert pixels.ndim == 2 and pixels.shape == (row["height"], row["width"])
        if folder.name == "imlab_lungseg_demo":
            assert ds.card["num_masks"] == 4
            for row in images:
                assert set(np.unique(decode_png(row["mask"]))) == {0, 255}
        if folder.name == "siim_pneumothorax_dicom":
            assert (images[0]["height"], images[0]["width"]) == (1024, 1024)
            assert decode_png(images[0]["image"]).std() > 10  # real picture, not blank
        if folder.name == "covid_actualmed":
            from PIL import Image

            modes = {Path(r["original_path"]).name: Image.open(r["original_path"]).mode for r in images}
            assert "RGBA" in modes.values()  # the sample holds an RGBA copy; it became 2-D above


def test_sample_lungseg_layout_pairs_dash_mask(samples, tmp_path):
    root = samples / "imlab_lungseg_demo"
    card = ingest(LAYOUTS["lungseg"](root, source="imlab"), tmp_path / "ds", name="imlab", source="imlab", options=OPTS)
    assert card["num_rows"] == 4 and card["num_masks"] == 4 and card["num_skipped"] == 0


def test_sample_patient_ids_keep_patients_in_one_split(samples, tmp_path):
    out = tmp_path / "cf"
    cxrfl(["ingest", "manifest", str(samples / "covid_figure1"), "--out", str(out), "--quiet",
           "--column", "patient_id=patientid"])
    meta = open_dataset(out).metadata.to_pylist()
    by_patient: dict[str, set] = {}
    for r in meta:
        by_patient.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_patient.values())
    with open(samples / "covid_figure1" / "labels.csv", newline="") as fh:
        expected = {r["patientid"] for r in csv.DictReader(fh)}
    assert set(by_patient) == expected


def test_images_of_one_patient_share_a_split(tmp_path):
    root = tmp_path / "src"
    rows = []
    for i in range(60):
        write_png(root / "images" / f"{i}.png", gradient(8, 8, seed=i))
        rows.append([f"{i}.png", "x", f"P{i // 3}"])
    write_csv(root / "labels.csv", ["filename", "label", "patient_id"], rows)
    ingest(LAYOUTS["manifest"](root, source="s"), tmp_path / "ds", name="s", source="s",
           options=IngestOptions(progress=False, val_frac=0.3, test_frac=0.3, seed=3))
    meta = open_dataset(tmp_path / "ds").metadata.to_pylist()
    splits: dict[str, set] = {}
    for r in meta:
        splits.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values()) and len(splits) == 20
    assert {next(iter(s)) for s in splits.values()} == {"train", "val", "test"}


# -- several source folders, CSV paths relative to the CSV ----------------------------------

def hospital(root: Path, rows: list[list], header=("filename", "label")) -> Path:
    """A manifest folder: ``images/<filename>`` for every row, and labels.csv."""
    for i, row in enumerate(rows):
        write_png(root / "images" / row[0], gradient(16, 16, seed=len(root.name) * 10 + i))
    write_csv(root / "labels.csv", list(header), rows)
    return root


def test_several_source_folders_ingest_into_one_dataset_each_a_source(tmp_path):
    north = hospital(tmp_path / "north", [["0.png", "normal", "ward1"], ["1.png", "tb", "ward2"],
                                          ["2.png", "normal", ""]], header=("filename", "label", "site"))
    south = hospital(tmp_path / "in" / "south", [["0.png", "tb"], ["1.png", "normal"]])  # same names, no site column
    out = tmp_path / "ds"
    assert cxrfl(["ingest", "manifest", str(north), str(south), "--out", str(out), "--quiet"]) == 0
    rows = rows_by_id(out)
    assert sorted(rows) == ["north:0", "north:1", "north:2", "south:0", "south:1"]  # ids unique across folders
    assert {k: (r["source"], r["site"]) for k, r in rows.items()} == {
        "north:0": ("north", "ward1"), "north:1": ("north", "ward2"),
        "north:2": ("north", "north"),  # a blank site in the CSV falls back to the folder
        "south:0": ("south", "south"), "south:1": ("south", "south")}
    np.testing.assert_array_equal(decode_png(rows["south:1"]["image"]), gradient(16, 16, seed=5 * 10 + 1))
    assert rows["south:0"]["label_name"] == "tb" and rows["north:0"]["label_name"] == "normal"
    card = open_dataset(out).card
    assert card["name"] == "north+south" and card["num_rows"] == 5
    assert [s["path"] for s in card["sources"]] == [str(north.resolve()), str(south.resolve())]
    assert card["counts"]["site"] == {"north": 1, "south": 2, "ward1": 1, "ward2": 1}

    # One folder keeps the old behaviour: the folder (or --name) is the source of every row.
    assert cxrfl(["ingest", "manifest", str(south), "--out", str(tmp_path / "one"), "--quiet", "--name", "s"]) == 0
    assert {(k, r["source"], r["site"]) for k, r in rows_by_id(tmp_path / "one").items()} == {
        ("s:0", "s", "s"), ("s:1", "s", "s")}


def test_several_source_folders_need_distinct_names_and_no_single_source_options(tmp_path, capsys):
    a = hospital(tmp_path / "a" / "site", [["0.png", "x"]])
    b = hospital(tmp_path / "b" / "site", [["0.png", "x"]])
    assert cxrfl(["ingest", "manifest", str(a), str(b), "--out", str(tmp_path / "ds"), "--quiet"]) == 2
    assert "source folders must have distinct names (they name sites and ids): ['site', 'site']" in capsys.readouterr().err
    other = hospital(tmp_path / "other", [["0.png", "x"]])
    assert cxrfl(["ingest", "manifest", str(a), str(other), "--out", str(tmp_path / "ds"), "--quiet",
                  "--csv", str(a / "labels.csv")]) == 2
    assert "name one source's files; give one source folder with them" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


def test_csv_paths_relative_to_the_csv_folder_are_found_and_missing_ones_listed(tmp_path):
    root = tmp_path / "src"
    mask = np.zeros((20, 20), np.uint8)
    mask[4:16, 2:9] = 255
    write_png(root / "images" / "a.png", gradient(20, 20, seed=1))
    write_png(root / "masks" / "a.png", mask)
    write_png(root / "images" / "b.png", gradient(20, 20, seed=2))
    write_png(root / "images" / "c.png", gradient(20, 20, seed=3))
    write_csv(root / "labels.csv", ["filename", "label", "mask_file"], [
        ["images/a.png", "x", "masks/a.png"],  # both prefixed with their folder, relative to the CSV
        ["b.png", "x", ""],  # relative to images/, as before
        ["images/gone.png", "x", ""],
        ["c.png", "x", "masks/gone.png"],
    ])
    entries = LAYOUTS["manifest"](root, source="m")
    card = ingest(entries, tmp_path / "ds", name="m", source="m", options=OPTS)
    rows = rows_by_id(tmp_path / "ds")
    assert sorted(rows) == ["m:b", "m:images/a"]
    a = rows["m:images/a"]
    assert Path(a["original_path"]) == root / "images" / "a.png"
    np.testing.assert_array_equal(decode_png(a["image"]), gradient(20, 20, seed=1))
    np.testing.assert_array_equal(decode_png(a["mask"]), mask)
    assert rows["m:b"]["mask"] is None
    skipped = {s["reason"]: Path(s["path"]) for s in card["skipped"]}
    assert card["num_skipped"] == 2 and card["num_rows"] == 2
    gone = skipped["file listed in the CSV is missing"]
    assert gone.name == "gone.png" and gone.parent.name == "images" and root in gone.parents
    assert skipped["mask listed in the CSV for c.png is missing"].name == "gone.png"
    with open(tmp_path / "ds" / "skipped.csv") as fh:
        assert sorted(Path(r["path"]).name for r in csv.DictReader(fh)) == ["gone.png", "gone.png"]
