"""Bad input at the command line: each case is one ``cxrfl CMD: error: ...`` line naming the
path, field or value, and nothing written (no data, no run folder, no output folder, no Ray).
Driven in-process through ``cxrfl_ray.cli.main``; nothing here starts Ray."""

from __future__ import annotations

import pytest
import torch
import yaml

from cxrfl_ray.cli import builtin_data, main as cxrfl
from cxrfl_ray.config import build_config
from cxrfl_ray.data.imageio import read_image
from cxrfl_ray.tasks.checkpoint import save_checkpoint
from cxrfl_ray.tasks.models import create_model
from tests.conftest import free_port, gradient, write_png


def error_line(capsys) -> str:
    """The one line a failed command prints on stderr."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.rstrip("\n")


# -- data.path: a user's path is never filled with phantoms -----------------------------------

def test_a_typo_data_path_is_an_error_and_nothing_is_written_there(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    typo = tmp_path / "typo"
    assert cxrfl(["simulate", "--set", f"data.path={typo}", "--quiet"]) == 2
    assert error_line(capsys) == f"cxrfl simulate: error: data.path: {typo} does not exist"
    assert not typo.exists() and not (tmp_path / "runs").exists()
    # The built-in default's own text, when the user sets it, is the user's path too.
    assert cxrfl(["simulate", "--preset", "default-classification", "--set", "data.path=runs/default/phantoms-128"]) == 2
    assert error_line(capsys) == "cxrfl simulate: error: data.path: runs/default/phantoms-128 does not exist"
    assert cxrfl(["simulate", "--preset", "default-segmentation", "--set", f"data={{path: {typo}, size: 64}}"]) == 2
    assert error_line(capsys) == f"cxrfl simulate: error: data.path: {typo} does not exist"
    # A config file's path, and cxrfl train, are checked the same way.
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"path": str(typo)}}))
    assert cxrfl(["simulate", str(cfg)]) == 2
    assert error_line(capsys) == f"cxrfl simulate: error: data.path: {typo} does not exist"
    assert cxrfl(["train", "--set", f"data.path={typo}", "--set", f"out_dir={tmp_path / 'out'}"]) == 2
    assert error_line(capsys) == f"cxrfl train: error: data.path: {typo} does not exist"
    assert cxrfl(["train", str(cfg), "--preset", "default-classification"]) == 2
    assert error_line(capsys) == "cxrfl train: error: give a config file or --preset, not both"
    assert not typo.exists() and not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_only_an_untouched_preset_default_path_reads_the_builtin_phantoms():
    assert builtin_data("default-segmentation", [])
    assert builtin_data("default-classification", ["fl.rounds=2", "data.size=32"])
    assert not builtin_data("default-segmentation", ["data.path=runs/default/phantoms-128"])
    assert not builtin_data("default-segmentation", ["data={path: x}"])
    assert not builtin_data("default-segmentation", ["data=7"])
    assert not builtin_data("paper-segmentation", [])  # a real dataset's path


# -- --set and config files --------------------------------------------------------------------

def test_bad_overrides_and_config_files_are_one_line_naming_the_value(tmp_path, capsys):
    assert cxrfl(["simulate", "--set", "data.path=[unclosed"]) == 2
    assert error_line(capsys) == (
        "cxrfl simulate: error: override data.path=[unclosed: the value is not valid YAML (expected ',' or ']', "
        "but got '<stream end>'); quote it for a plain string, e.g. data.path='\"[unclosed\"'")
    assert cxrfl(["simulate", "--preset", "default-segmentation", "--set", "trian.lr=0.1"]) == 2
    assert error_line(capsys) == ("cxrfl simulate: error: invalid config preset default-segmentation: "
                                  "trian: Extra inputs are not permitted from --set trian.lr=0.1")
    assert cxrfl(["train", "--set", "fl.rounds=true"]) == 2
    assert error_line(capsys) == ("cxrfl train: error: invalid config (defaults): fl.rounds: Input should be "
                                  "a valid integer (got True) from --set fl.rounds=true")
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  lr: 0.01\nfl:\n  rounds: 3\ntrain:\n  lr: 0.1\n")
    assert cxrfl(["simulate", str(dup), "--print-config"]) == 2
    assert error_line(capsys) == (f"cxrfl simulate: error: {dup}, line 5: not valid YAML: "
                                  "duplicate key 'train' (first on line 1)")


def test_an_empty_config_file_runs_the_defaults_with_a_warning(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert cxrfl(["simulate", str(empty), "--print-config"]) == 0
    out = capsys.readouterr()
    assert out.err == f"cxrfl: warning: {empty} is empty: running the built-in defaults\n"
    assert yaml.safe_load(out.out) == build_config({}).model_dump(mode="json")


# -- --resume misuse -------------------------------------------------------------------------

def test_resume_refuses_set_config_and_folders_that_are_not_runs(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("fl: {rounds: 9}\n")
    assert cxrfl(["simulate", "--resume", str(run), "--set", "fl.rounds=9"]) == 2
    assert error_line(capsys) == (f"cxrfl simulate: error: --resume {run} continues with that run's own "
                                  "config.yaml; --set cannot be given with it (start a new run instead)")
    assert cxrfl(["simulate", str(cfg), "--resume", str(run), "--set", "train.lr=0.1"]) == 2
    assert error_line(capsys) == (f"cxrfl simulate: error: --resume {run} continues with that run's own "
                                  "config.yaml; a CONFIG file and --set cannot be given with it (start a new run instead)")
    assert cxrfl(["simulate", "--preset", "default-segmentation", "--resume", str(run)]) == 2
    assert "--preset cannot be given with it" in error_line(capsys)
    assert cxrfl(["simulate", "--resume", str(tmp_path / "nowhere")]) == 2
    assert error_line(capsys) == f"cxrfl simulate: error: --resume {tmp_path / 'nowhere'}: no such run folder"
    assert cxrfl(["simulate", "--resume", str(run)]) == 2  # a folder, but not a run
    assert error_line(capsys) == (f"cxrfl simulate: error: --resume {run}: no saved round state "
                                  "(state.safetensors) in that folder")
    assert sorted(p.name for p in run.iterdir()) == []


# -- an unreachable cluster ------------------------------------------------------------------

def test_submit_and_status_to_an_address_where_nothing_listens(capsys):
    address = f"http://127.0.0.1:{free_port()}"
    hint = "; is the dashboard address right (e.g. http://HEAD:8265) and the cluster up?"
    assert cxrfl(["submit", "--address", address, "--", "sweep", "tune_configs/smoke.yaml"]) == 2
    assert error_line(capsys) == (f"cxrfl submit: error: no Ray cluster answers at {address} "
                                  f"([Errno 111] Connection refused){hint}")
    assert cxrfl(["status", "--address", address, "cxrfl-0123"]) == 2
    assert error_line(capsys) == (f"cxrfl status: error: no Ray cluster answers at {address} "
                                  f"([Errno 111] Connection refused){hint}")
    assert cxrfl(["stop", "--address", address, "cxrfl-0123"]) == 2
    assert error_line(capsys).startswith(f"cxrfl stop: error: no Ray cluster answers at {address} ")


# -- checkpoints -----------------------------------------------------------------------------

@pytest.fixture()
def bad_checkpoints(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    pickled = tmp_path / "model.pth"
    torch.save(create_model("tiny-conv-seg", "segmentation", 1, 1).state_dict(), pickled)
    truncated = tmp_path / "truncated.safetensors"
    cfg = build_config({"task": "segmentation", "model": {"name": "tiny-conv-seg"}})
    good = save_checkpoint(tmp_path / "good.safetensors", create_model("tiny-conv-seg", "segmentation", 1, 1), cfg, 1, [])
    truncated.write_bytes(good.read_bytes()[:-40])
    cls = build_config({"model": {"name": "tiny-conv"}})
    good_cls = save_checkpoint(tmp_path / "cls.safetensors", create_model("tiny-conv", "classification", 1, 3), cls, 3,
                               ["a", "b", "c"])
    return {"corrupt": corrupt, "pickle": pickled, "truncated": truncated, "good_cls": good_cls}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from cxrfl_ray.data.writer import DatasetWriter
    from tests.conftest import make_rows

    path = tmp_path_factory.mktemp("data") / "d"
    with DatasetWriter(path, name="d", label_names=["a", "b", "c"]) as w:
        for r in make_rows(10):
            w.add(r)
    return path


@pytest.mark.parametrize("kind", ["corrupt", "pickle", "truncated"])
def test_a_bad_checkpoint_is_one_line_naming_the_file(bad_checkpoints, tiny_dataset, kind, tmp_path, capsys):
    ckpt = bad_checkpoints[kind]
    commands = {  # every command that takes a checkpoint
        "predict": ["predict", str(ckpt), str(tiny_dataset), "--out", str(tmp_path / "pred")],
        "mask": ["mask", str(ckpt), str(tiny_dataset), "--out", str(tmp_path / "masked")],
        "cam": ["cam", str(ckpt), str(tiny_dataset), "--out", str(tmp_path / "cam")],
        "cam --compare": ["cam", str(bad_checkpoints["good_cls"]), str(tiny_dataset), "--compare", str(ckpt),
                          "--out", str(tmp_path / "cam2")],
    }
    for name, argv in commands.items():
        assert cxrfl(argv) == 2, name
        line = error_line(capsys)
        command = name.split()[0]
        assert line.startswith(f"cxrfl {command}: error: {ckpt} is not a safetensors checkpoint ("), line
    assert not (tmp_path / "pred").exists()


# -- predict ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory):
    """An untrained segmentation model: the names of the outputs, not their pixels, are tested."""
    cfg = build_config({"task": "segmentation", "model": {"name": "tiny-conv-seg"}, "data": {"size": 32}})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("seg") / "seg.safetensors"
    return save_checkpoint(path, create_model("tiny-conv-seg", "segmentation", 1, 1), cfg, 1, [])


def test_predict_gives_every_input_its_own_mask_file(seg_checkpoint, tmp_path, capsys):
    import csv

    images = tmp_path / "in"
    shapes = {"x.png": (30, 40), "x.jpg": (50, 20), "sub/b.png": (24, 24), "sub__b.png": (36, 28), "y.png": (20, 20)}
    for i, (name, shape) in enumerate(shapes.items()):
        write_png(images / name, gradient(*shape, seed=i))
    out = tmp_path / "out"
    assert cxrfl(["predict", str(seg_checkpoint), str(images), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"5 images -> {out.resolve()} (0 skipped)")
    files = sorted(p.name for p in out.glob("*_mask.png"))
    assert len(files) == 5
    with open(out / "masks.csv") as fh:
        table = {r["image"]: r["mask"] for r in csv.DictReader(fh)}
    assert sorted(table) == sorted(shapes) and sorted(table.values()) == files
    for name, mask in table.items():  # each file is its own input's mask (at the input's size)
        assert read_image(out / mask).shape == shapes[name]
    assert table["x.jpg"] == "x_mask.png" and table["sub/b.png"] == "sub__b_mask.png"  # sorted first
    assert table["x.png"].startswith("x-") and table["sub__b.png"].startswith("sub__b-")
    # The same inputs give the same names.
    again = tmp_path / "again"
    assert cxrfl(["predict", str(seg_checkpoint), str(images), "--out", str(again)]) == 0
    assert sorted(p.name for p in again.glob("*_mask.png")) == files


def test_predict_a_missing_input_names_it_and_makes_no_output_folder(seg_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert cxrfl(["predict", str(seg_checkpoint), str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert error_line(capsys) == f"cxrfl predict: error: input not found: {tmp_path / 'nope'}"
    assert not out.exists()
