"""Bad input to the data layer (issue 14): each case asserts the exact outcome, the row skipped
or flagged with its reason, the good rows all kept, or one error line naming the file.

Cases that already have tests elsewhere: truncated/garbage/empty images and DICOMs without pixels
(test_ingest.py::test_bad_inputs_are_skipped_with_reasons_and_good_rows_land,
test_imageio.py::test_bad_files_raise_with_reason), 16-bit PNG coding
(test_imageio.py::test_sixteen_bit_png_keeps_depth_and_values), a missing CSV/folder/column
(test_ingest.py::test_missing_folder_csv_or_column_stops_at_once), labels outside the label set
and masks of the wrong size (test_bad_inputs_... above), --resize-masks
(test_ingest.py::test_folders_layout_with_class_images_and_masks).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cxrfl_ray.cli import main as cxrfl
from cxrfl_ray.data.imageio import decode_png
from cxrfl_ray.data.ingest import LAYOUTS, IngestError, IngestOptions, ingest
from cxrfl_ray.data.ingest.pipeline import Candidate, assign_ids, make_id
from cxrfl_ray.data.store import DatasetError, open_dataset
from cxrfl_ray.tasks.segmentation import summarise
from tests.conftest import gradient, write_dicom, write_png

OPTS = IngestOptions(progress=False, workers=2)


def lungs(h: int = 20, w: int = 20) -> np.ndarray:
    """True inside two lung-shaped blocks, False around them."""
    mask = np.zeros((h, w), bool)
    mask[h // 4: 3 * h // 4, w // 8: 3 * w // 8] = True
    mask[h // 4: 3 * h // 4, 5 * w // 8: 7 * w // 8] = True
    return mask


def write_csv(path: Path, header: list[str], rows: list[list], encoding: str = "utf-8",
              newline: str = "\n") -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator=newline)
    w.writerow(header)
    w.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue().encode(encoding))
    return path


def manifest(root: Path, images: dict[str, np.ndarray], rows: list[list],
             header=("filename", "label", "mask_file"), masks: dict[str, np.ndarray] | None = None,
             encoding: str = "utf-8", newline: str = "\n") -> Path:
    for name, pixels in images.items():
        write_png(root / "images" / name, pixels)
    for name, pixels in (masks or {}).items():
        write_png(root / "masks" / name, pixels)
    write_csv(root / "labels.csv", list(header), rows, encoding=encoding, newline=newline)
    return root


def run(root: Path, out: Path, source: str = "m", **opts) -> dict:
    options = IngestOptions(progress=False, workers=2, **opts)
    return ingest(LAYOUTS["manifest"](root, source=source), out, name=source, source=source, options=options)


def rows_by_id(path: Path) -> dict:
    ds = open_dataset(path)
    return {r["id"]: r for r in ds.take(np.arange(ds.num_rows)).to_pylist()}


def reasons(card: dict) -> dict[str, str]:
    return {Path(s["path"]).name: s["reason"] for s in card["skipped"]}


def h10(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


# -- item 2: masks ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, positive", [(np.uint8, 1), (np.uint8, 255), (np.uint8, 77),
                                             (np.uint16, 1), (np.uint16, 65535)])
def test_two_valued_masks_of_any_positive_value_and_depth_are_lungs(tmp_path, dtype, positive):
    image = (gradient(20, 20).astype(np.uint16) * 257) if dtype == np.uint16 else gradient(20, 20)
    mask = lungs().astype(dtype) * dtype(positive)
    root = manifest(tmp_path / "src", {"a.png": image}, [["a.png", "x", "a.png"]], masks={"a.png": mask})
    card = run(root, tmp_path / "ds")
    row = rows_by_id(tmp_path / "ds")["m:a"]
    assert card["num_masks"] == 1 and card["flagged"] == [] and card["skipped"] == []
    np.testing.assert_array_equal(decode_png(row["mask"]), lungs().astype(np.uint8) * 255)
    assert row["bit_depth"] == (16 if dtype == np.uint16 else 8)
    np.testing.assert_array_equal(decode_png(row["image"]), image)  # 16-bit PNG kept exactly


def test_masks_that_cannot_be_lungs_are_dropped_flagged_and_their_images_kept(tmp_path, capsys):
    soft = lungs().astype(np.uint8) * 255
    soft[4, 2:6] = [64, 128, 192, 230]  # anti-aliased edge
    labelled = lungs().astype(np.uint8)
    labelled[:, 10:] *= 2  # label-coded: 1 left lung, 2 right lung
    background = np.where(lungs(), 255, 1).astype(np.uint8)  # nonzero background
    masks = {"good.png": lungs().astype(np.uint8), "soft.png": soft, "labelled.png": labelled,
             "background.png": background, "empty.png": np.zeros((20, 20), np.uint8),
             "full.png": np.full((20, 20), 1, np.uint8)}
    images = {name: gradient(20, 20, seed=i) for i, name in enumerate(masks)}
    root = manifest(tmp_path / "src", images, [[n, "x", n] for n in masks], masks=masks)
    out = tmp_path / "ds"
    card = run(root, out)
    rows = rows_by_id(out)
    assert sorted(rows) == sorted(f"m:{Path(n).stem}" for n in masks)  # every image kept
    assert [k for k, r in rows.items() if r["mask"] is not None] == ["m:good"]
    assert card["num_masks"] == 1 and card["num_skipped"] == 0 and card["num_flagged"] == 5
    why = {f["id"]: f["reason"] for f in card["flagged"]}
    tail = "a lung mask has 0 and one positive value (soft, anti-aliased or label-coded masks are not guessed at): mask dropped, image kept"
    assert why == {
        "m:soft": f"mask soft.png has 6 distinct values (0, 64, 128, 192, 230, ...); {tail}",
        "m:labelled": f"mask labelled.png has 3 distinct values (0, 1, 2); {tail}",
        "m:background": f"mask background.png has 2 distinct values (1, 255); {tail}",
        "m:empty": "mask empty.png is empty (no lung pixels): mask dropped, image kept",
        "m:full": "mask full.png covers the whole image (no background): mask dropped, image kept",
    }
    assert {f["id"]: Path(f["path"]) for f in card["flagged"]}["m:soft"] == root / "masks" / "soft.png"
    # A JPEG mask has many levels around its edges: dropped too, with a hint.
    write_png(root / "masks" / "lossy.jpg", lungs().astype(np.uint8) * 255)
    write_png(root / "images" / "lossy.png", gradient(20, 20))
    write_csv(root / "labels.csv", ["filename", "label", "mask_file"], [["lossy.png", "x", "lossy.jpg"]])
    (flag,) = run(root, tmp_path / "jpeg")["flagged"]
    assert flag["id"] == "m:lossy" and flag["reason"].startswith("mask lossy.jpg has ")
    assert flag["reason"].endswith(" (JPEG blurs a mask's edges: store masks as PNG): mask dropped, image kept")
    assert json.loads((out / "dataset.json").read_text())["flagged"] == card["flagged"]

    assert cxrfl(["card", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "dataset 'm': 6 images, 1 masks, 0 skipped" in shown
    assert "  5 flagged (kept; see the card's 'flagged'):" in shown
    assert f"  flagged m:empty ({root / 'masks' / 'empty.png'}): {why['m:empty']}" in shown.splitlines()


def test_left_and_right_masks_merge_and_an_empty_pair_is_flagged(tmp_path):
    root = tmp_path / "mont"
    left, right = lungs().copy(), lungs().copy()
    left[:, 10:], right[:, :10] = False, False
    for name, l, r in (("a.png", left.astype(np.uint8), right.astype(np.uint8)),  # 0/1 parts
                       ("b.png", np.zeros((20, 20), np.uint8), np.zeros((20, 20), np.uint8))):
        write_png(root / "CXR_png" / name, gradient(20, 20, seed=len(name)))
        write_png(root / "ManualMask" / "leftMask" / name, l)
        write_png(root / "ManualMask" / "rightMask" / name, r)
    card = ingest(LAYOUTS["lungseg"](root, source="mont"), tmp_path / "ds", name="mont", source="mont", options=OPTS)
    rows = rows_by_id(tmp_path / "ds")
    np.testing.assert_array_equal(decode_png(rows["mont:a"]["mask"]), lungs().astype(np.uint8) * 255)
    assert rows["mont:b"]["mask"] is None and card["num_masks"] == 1
    assert [(f["id"], f["reason"]) for f in card["flagged"]] == [
        ("mont:b", "mask b.png + b.png is empty (no lung pixels): mask dropped, image kept")]


def test_a_zero_one_mask_of_another_size_is_resized_with_resize_masks_and_skipped_without(tmp_path):
    small = np.zeros((10, 10), np.uint8)
    small[2:8, 1:4] = 1
    root = manifest(tmp_path / "src", {"a.png": gradient(20, 20), "b.png": gradient(20, 20, seed=1)},
                    [["a.png", "x", "a.png"], ["b.png", "x", ""]], masks={"a.png": small})
    card = run(root, tmp_path / "no")
    assert sorted(rows_by_id(tmp_path / "no")) == ["m:b"]
    assert reasons(card) == {"a.png": "mask a.png is 10x10 but the image is 20x20 (use --resize-masks to resize masks)"}
    card = run(root, tmp_path / "yes", resize_masks=True)
    expected = np.kron(small, np.ones((2, 2), np.uint8)) * 255  # nearest: each pixel becomes 2x2
    np.testing.assert_array_equal(decode_png(rows_by_id(tmp_path / "yes")["m:a"]["mask"]), expected)
    assert card["num_rows"] == 2 and card["num_masks"] == 1 and card["skipped"] == []


def test_an_empty_prediction_on_an_empty_mask_is_not_a_perfect_score():
    loss = np.array([0.1, 0.2, 0.3])
    # image 0: 80 of 100 lung pixels right; image 1: nothing in mask or prediction; image 2: a
    # prediction where the mask is empty (all false positives).
    out = {"loss": loss, "tp": np.array([80.0, 0, 0]), "fp": np.array([10.0, 0, 5]), "fn": np.array([10.0, 0, 0])}
    m = summarise(out)
    assert m["jaccard"] == pytest.approx((0.8 + 0.0) / 2)  # image 1 has nothing to score: left out
    assert m["dice"] == pytest.approx((160 / 180 + 0.0) / 2)
    assert m["jaccard_min"] == 0.0 and m["jaccard_pooled"] == pytest.approx(80 / 105) and m["examples"] == 3
    nothing = summarise({"loss": loss[:2], "tp": np.zeros(2), "fp": np.zeros(2), "fn": np.zeros(2)})
    assert (nothing["jaccard"], nothing["dice"], nothing["jaccard_min"]) == (0.0, 0.0, 0.0)


# -- item 10: constant images ----------------------------------------------------------------

def test_a_constant_image_is_kept_and_flagged(tmp_path):
    root = manifest(tmp_path / "src", {"black.png": np.zeros((20, 20), np.uint8),
                                       "white.png": np.full((20, 20), 255, np.uint8), "ok.png": gradient(20, 20)},
                    [["black.png", "x", ""], ["white.png", "x", ""], ["ok.png", "x", ""]])
    card = run(root, tmp_path / "ds")
    assert sorted(rows_by_id(tmp_path / "ds")) == ["m:black", "m:ok", "m:white"]
    assert [(f["id"], Path(f["path"]).name, f["reason"]) for f in card["flagged"]] == [
        ("m:black", "black.png", "image is constant (every pixel is 0): blank or a failed export"),
        ("m:white", "white.png", "image is constant (every pixel is 255): blank or a failed export")]


# -- item 3: ids -----------------------------------------------------------------------------

def test_distinct_files_never_share_an_id_and_only_the_same_file_twice_is_a_duplicate(tmp_path):
    names = ["with space.png", "with_space.png", "x.png", "x.jpg", "正常.png", "肺炎.png", "plain-1.png"]
    images = {n: gradient(16, 16, seed=i) for i, n in enumerate(names)}
    rows = [[n, "x", ""] for n in names] + [["x.png", "x", ""], ["images/plain-1.png", "x", ""]]
    root = manifest(tmp_path / "src", images, rows)
    card = run(root, tmp_path / "ds")
    got = {Path(r["original_path"]).name: k for k, r in rows_by_id(tmp_path / "ds").items()}
    assert got == {
        "with space.png": f"m:with_space~{h10('with space.png')}",  # normalised: hashed
        "with_space.png": "m:with_space",  # an ordinary name keeps its id
        "x.png": "m:x.png", "x.jpg": "m:x.jpg",  # colliding stems keep their extension
        "正常.png": "m:正常", "肺炎.png": "m:肺炎",  # Unicode letters are kept
        "plain-1.png": "m:plain-1",
    }
    assert sorted(card["skipped"], key=lambda s: s["reason"]) == [
        {"path": str(root / "images" / "x.png"), "reason": "duplicate id 'm:x.png' (the file is listed twice)"},
        {"path": str(root / "images" / "plain-1.png"),
         "reason": "duplicate: the same file as row 'm:plain-1' (listed twice)"},
    ]
    stored = rows_by_id(tmp_path / "ds")
    for name, row_id in got.items():  # each id holds its own file's pixels (x.jpg: lossy JPEG)
        pixels = decode_png(stored[row_id]["image"]).astype(int)
        assert np.abs(pixels - images[name]).mean() < (8 if name.endswith(".jpg") else 1e-9), name


def test_folders_layout_keeps_non_latin_class_and_file_names_apart(tmp_path):
    root = tmp_path / "db"
    for cls in ("正常", "肺炎"):
        for i, name in enumerate(("图像.png", "图像.jpg", "a b.png")):
            write_png(root / cls / name, gradient(16, 16, seed=i))
    card = ingest(LAYOUTS["folders"](root, source="db"), tmp_path / "ds", name="db", source="db", options=OPTS)
    assert card["num_rows"] == 6 and card["skipped"] == []
    assert sorted(rows_by_id(tmp_path / "ds")) == sorted(
        [f"db:{c}/图像.png" for c in ("正常", "肺炎")] + [f"db:{c}/图像.jpg" for c in ("正常", "肺炎")]
        + [f"db:{c}/a_b~{h10(c + '/a b.png')}" for c in ("正常", "肺炎")])


def test_rsna_patient_ids_with_dots_stay_apart(tmp_path):
    root = tmp_path / "rsna"
    for i, pid in enumerate(("1.2.840.1", "1.2.840.2", "plain")):
        write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", gradient(16, 16, seed=i), bits=8)
    write_csv(root / "stage_2_detailed_class_info.csv", ["patientId", "class"],
              [["1.2.840.1", "Normal"], ["1.2.840.2", "Lung Opacity"], ["plain", "Normal"]])
    write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"],
              [["1.2.840.1", "", "", "", "", 0], ["1.2.840.2", 1, 2, 3, 4, 1], ["plain", "", "", "", "", 0]])
    card = ingest(LAYOUTS["rsna"](root), tmp_path / "ds", name="rsna", source="rsna",
                  options=IngestOptions(progress=False, label_names=["Normal", "No Lung Opacity / Not Normal", "Lung Opacity"]))
    rows = rows_by_id(tmp_path / "ds")
    assert card["skipped"] == [] and sorted(rows) == ["rsna:1.2.840.1", "rsna:1.2.840.2", "rsna:plain"]
    assert rows["rsna:1.2.840.2"]["label"] == 2 and rows["rsna:1.2.840.2"]["patient_id"] == "1.2.840.2"


_LEGACY = re.compile(r"[^A-Za-z0-9._/\-]+")


def legacy_id(source: str, relative: str) -> str:
    """The id every dataset made before issue 14 has (kept for ordinary names)."""
    rel = Path(relative)
    stem = rel.with_suffix("").as_posix() if rel.suffix else rel.as_posix()
    return f"{source}:{_LEGACY.sub('_', stem)}"


def ids_of(paths: list[str], source: str = "s") -> dict[str, str]:
    cands = [Candidate(id=make_id(source, p), image_path=Path(p), relative=p) for p in paths]
    assign_ids(cands, source)
    return {p: c.id for p, c in zip(paths, cands)}


SEGMENT = st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), min_size=1, max_size=8)
PATH = st.builds(lambda parts, ext: "/".join(parts) + ext, st.lists(SEGMENT, min_size=1, max_size=3),
                 st.sampled_from(["", ".png", ".jpg", ".PNG", ".dcm", ".tar.gz", "."]))


@settings(max_examples=300, deadline=None)
@given(st.lists(PATH, min_size=1, max_size=12, unique_by=lambda p: Path(p).as_posix()), st.randoms())
def test_distinct_relative_paths_always_get_distinct_stable_ids(paths, rnd):
    ids = ids_of(paths)
    assert len(set(ids.values())) == len(paths)
    shuffled = list(paths)
    rnd.shuffle(shuffled)
    assert ids_of(shuffled) == ids  # the same set of paths gives the same ids, in any order


ORDINARY = st.text(st.sampled_from("abcXYZ019_-."), min_size=1, max_size=6).filter(lambda s: s.strip(".") == s)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.builds(lambda d, n, e: f"{d}{n}{e}", st.sampled_from(["", "images/", "a/b/"]), ORDINARY,
                          st.sampled_from([".png", ".jpg", ".dcm"])), min_size=1, max_size=10))
def test_ordinary_names_with_unique_stems_keep_their_old_ids(paths):
    by_stem = {}
    for p in paths:
        by_stem.setdefault(legacy_id("s", p), set()).add(p)
    unique = [p for p in paths if len(by_stem[legacy_id("s", p)]) == 1]
    ids = ids_of(paths)
    assert {p: ids[p] for p in unique} == {p: legacy_id("s", p) for p in unique}


def test_real_sample_ids_are_unchanged(samples):
    for folder in sorted(p for p in samples.iterdir() if (p / "labels.csv").is_file()):
        with open(folder / "labels.csv", newline="") as fh:
            names = [r["filename"] for r in csv.DictReader(fh)]
        assert ids_of(names, folder.name) == {n: legacy_id(folder.name, n) for n in names}, folder.name


# -- item 9: files that are not what they claim ----------------------------------------------

@pytest.mark.parametrize("text, message", [
    ('{"name": "x", ', "dataset.json: not valid JSON (Expecting property name enclosed in double quotes: "
                      "line 1 column 15 (char 14)); re-create the dataset"),
    ("[1, 2]", "dataset.json: holds a JSON list, not a dataset card (an object)"),
    ("DROP", "dataset.json: 'shards' missing; re-create the dataset"),
    ("SHARDS", "dataset.json: 'shards' 'part-00000.parquet' is not a list of shard file names; re-create the dataset"),
])
def test_a_broken_dataset_json_is_one_error_naming_it(small_dataset, capsys, text, message):
    card_path = small_dataset / "dataset.json"
    card = json.loads(card_path.read_text())
    if text == "DROP":
        del card["shards"]
        text = json.dumps(card)
    elif text == "SHARDS":
        card["shards"] = "part-00000.parquet"
        text = json.dumps(card)
    card_path.write_text(text)
    with pytest.raises(DatasetError) as err:
        open_dataset(small_dataset)
    assert str(err.value) == f"{small_dataset}/{message}"
    assert cxrfl(["card", str(small_dataset)]) == 2
    assert capsys.readouterr().err == f"cxrfl card: error: {small_dataset}/{message}\n"


def test_a_truncated_or_missing_parquet_shard_is_one_error_naming_it(small_dataset, capsys):
    shard = small_dataset / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(DatasetError, match=re.escape(f"{shard}: not a readable Parquet shard (truncated or corrupt: ")):
        open_dataset(small_dataset)
    assert cxrfl(["card", str(small_dataset)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cxrfl card: error: {shard}: not a readable Parquet shard") and err.count("\n") == 1
    shard.unlink()
    with pytest.raises(DatasetError) as missing:
        open_dataset(small_dataset)
    assert str(missing.value) == f"{shard}: shard listed in dataset.json is missing"


def test_a_corrupt_page_inside_a_shard_names_the_shard(small_dataset):
    import pyarrow.parquet as pq

    shard = small_dataset / "part-00000.parquet"
    meta = pq.ParquetFile(shard).metadata
    col = next(meta.row_group(0).column(i) for i in range(meta.num_columns)
               if meta.row_group(0).column(i).path_in_schema == "id")  # zstd-compressed
    data = bytearray(shard.read_bytes())
    start = col.data_page_offset + 20
    data[start:start + 40] = b"\xff" * 40
    shard.write_bytes(bytes(data))
    ds = open_dataset(small_dataset)  # the footer is intact
    with pytest.raises(DatasetError, match=re.escape(f"{shard}: cannot read row group 0 (corrupt shard: ")):
        ds.take([0], ["id"])


def test_a_cp1252_csv_is_read_and_noted_in_the_card(tmp_path, capsys):
    root = manifest(tmp_path / "hospital", {"niño.png": gradient(16, 16), "b.png": gradient(16, 16, seed=1)},
                    [["niño.png", "neumonía", "", "José"], ["b.png", "normal", "", "Zoë"]],
                    header=("filename", "label", "mask_file", "patient_id"), encoding="cp1252")
    assert cxrfl(["ingest", "manifest", str(root), "--out", str(tmp_path / "ds"), "--quiet"]) == 0
    rows = rows_by_id(tmp_path / "ds")
    assert {k: (r["label_name"], r["patient_id"]) for k, r in rows.items()} == {
        "hospital:niño": ("neumonía", "José"), "hospital:b": ("normal", "Zoë")}
    card = open_dataset(tmp_path / "ds").card
    assert card["label_names"] == ["neumonía", "normal"]
    assert card["notes"] == [{"path": str(root / "labels.csv"), "note": "not UTF-8: decoded as cp1252"}]
    assert f"  note {root / 'labels.csv'}: not UTF-8: decoded as cp1252" in capsys.readouterr().out.splitlines()


def test_a_latin1_only_byte_falls_back_to_latin1(tmp_path):
    # 0x81 is undefined in cp1252: such a file is ISO Latin-1 (0x81 is a C1 control there).
    root = manifest(tmp_path / "src", {"a.png": gradient(16, 16)}, [["a.png", "café", ""]])
    (root / "labels.csv").write_bytes(b"filename,label,view\na.png,caf\xe9,P\x81A\n")
    card = run(root, tmp_path / "ds")
    assert rows_by_id(tmp_path / "ds")["m:a"]["label_name"] == "café"
    assert card["notes"] == [{"path": str(root / "labels.csv"), "note": "not UTF-8: decoded as latin-1"}]


@pytest.mark.parametrize("encoding, newline", [("utf-8-sig", "\r\n"), ("utf-16", "\r\n"), ("utf-8", "\r\n")])
def test_bom_crlf_and_utf16_csvs_keep_every_row(tmp_path, encoding, newline):
    images = {f"{i}.png": gradient(16, 16, seed=i) for i in range(3)}
    root = manifest(tmp_path / "src", images, [[n, "é" if i else "x", ""] for i, n in enumerate(images)],
                    encoding=encoding, newline=newline)
    card = run(root, tmp_path / "ds")
    rows = rows_by_id(tmp_path / "ds")
    assert {k: r["label_name"] for k, r in rows.items()} == {"m:0": "x", "m:1": "é", "m:2": "é"}
    assert card["notes"] == ([{"path": str(root / "labels.csv"), "note": "not UTF-8: decoded as utf-16"}]
                             if encoding == "utf-16" else [])


def test_a_binary_labels_file_is_one_error_naming_it(tmp_path, capsys):
    root = manifest(tmp_path / "src", {"a.png": gradient(16, 16)}, [["a.png", "x", ""]])
    (root / "labels.csv").write_bytes(b"PK\x03\x04\x14\x00\x00\x00\x08\x00 spreadsheet")
    message = (f"{root / 'labels.csv'}: not a text CSV (it holds NUL bytes: a spreadsheet or another binary "
               f"file?); save it as CSV, UTF-8")
    with pytest.raises(IngestError) as err:
        LAYOUTS["manifest"](root, source="m")
    assert str(err.value) == message
    assert cxrfl(["ingest", "manifest", str(root), "--out", str(tmp_path / "ds"), "--quiet"]) == 2
    assert capsys.readouterr().err == f"cxrfl ingest: error: {message}\n"


def test_a_missing_column_is_one_cli_error_naming_the_csv(tmp_path, capsys):
    root = manifest(tmp_path / "src", {"a.png": gradient(16, 16)}, [["a.png", "x"]], header=("file_name", "label"))
    assert cxrfl(["ingest", "manifest", str(root), "--out", str(tmp_path / "ds"), "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"cxrfl ingest: error: {root / 'labels.csv'}: required column 'filename' not found (columns are "
        f"['file_name', 'label']); map it with --column filename=NAME\n")
    assert not (tmp_path / "ds").exists()


# -- item 5: the path of a missing file ------------------------------------------------------

def test_a_missing_file_with_a_folder_prefix_is_listed_at_its_own_path(tmp_path):
    root = manifest(tmp_path / "src", {"a.png": gradient(16, 16), "b.png": gradient(16, 16, seed=1)},
                    [["images/gone.png", "x", ""], ["a.png", "x", "masks/gone.png"], ["b.png", "x", ""],
                     ["sub/none.png", "x", ""]])
    (root / "masks").mkdir()
    card = run(root, tmp_path / "ds")
    assert sorted(rows_by_id(tmp_path / "ds")) == ["m:b"]
    assert card["skipped"] == [
        {"path": str(root / "images" / "gone.png"), "reason": "file listed in the CSV is missing"},
        {"path": str(root / "masks" / "gone.png"), "reason": "mask listed in the CSV for a.png is missing"},
        {"path": str(root / "images" / "sub" / "none.png"), "reason": "file listed in the CSV is missing"},
    ]


# -- the battery: images that are not radiographs --------------------------------------------

def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_tiny_images_and_decompression_bombs_are_skipped_and_good_rows_all_kept(tmp_path):
    root = manifest(tmp_path / "src", {"one.png": np.full((1, 1), 9, np.uint8), "line.png": gradient(1, 30),
                                       **{f"good{i}.png": gradient(20, 20, seed=i) for i in range(3)}},
                    [["one.png", "x", ""], ["line.png", "x", ""], ["bomb.png", "x", ""],
                     *[[f"good{i}.png", "x", ""] for i in range(3)]])
    (root / "images" / "bomb.png").write_bytes(_png_header_only(20000, 20000))
    card = run(root, tmp_path / "ds")
    assert sorted(rows_by_id(tmp_path / "ds")) == ["m:good0", "m:good1", "m:good2"]
    why = reasons(card)
    assert why["one.png"] == "image is 1x1 pixels: too small to be a radiograph"
    assert why["line.png"] == "image is 30x1 pixels: too small to be a radiograph"
    assert why["bomb.png"] == (
        "undecodable image (DecompressionBombError: Image size (400000000 pixels) exceeds limit of "
        "178956970 pixels, could be decompression bomb DOS attack.)")
    assert card["num_skipped"] == 3 and card["flagged"] == []
