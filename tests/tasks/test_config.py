"""Configs are validated before anything starts, and errors name the field."""

from __future__ import annotations

import pytest

from cxrfl_ray.config import ConfigError, build_config, load_config


def test_bad_values_are_refused_naming_each_field():
    with pytest.raises(ConfigError) as err:
        build_config({"train": {"lr": -0.1, "batch_size": 0, "optimizer": "rmsprop"}})
    text = str(err.value)
    assert "train.lr: Input should be greater than 0 (got -0.1)" in text
    assert "train.batch_size: Input should be greater than or equal to 1 (got 0)" in text
    assert "train.optimizer: Input should be 'adam', 'adamw', 'sgd' or 'adagrad' (got 'rmsprop')" in text


def test_unknown_keys_and_task_loss_mismatch():
    with pytest.raises(ConfigError, match="trian: Extra inputs are not permitted"):
        build_config({"trian": {}})
    with pytest.raises(ConfigError, match="train.loss 'cross_entropy' does not fit task 'segmentation'"):
        build_config({"task": "segmentation", "train": {"loss": "cross_entropy"}})


def test_yaml_round_trip_and_overrides(tmp_path):
    cfg = build_config({"task": "segmentation"}, ["train.lr=0.01", "data.holdout_sites=[site3]", "model.name=unet-resnet18"])
    assert cfg.train.lr == 0.01 and cfg.data.holdout_sites == ["site3"] and cfg.loss_name == "dice_bce"
    path = cfg.save(tmp_path / "c.yaml")
    assert load_config(path) == cfg
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_normalize_and_the_normalization_in_effect():
    cases = [({}, "none"), ({"imagenet_norm": True}, "imagenet"), ({"normalize": "image"}, "image"),
             ({"normalize": "none"}, "none"), ({"normalize": "imagenet"}, "imagenet"),
             ({"imagenet_norm": True, "normalize": "imagenet"}, "imagenet")]
    for data, expected in cases:
        assert build_config({"data": data}).data.normalization == expected, data
    assert build_config({}, ["data.normalize=image"]).data.normalization == "image"
    for other in ("image", "none"):
        with pytest.raises(ConfigError, match=f"data.imagenet_norm is true but data.normalize is '{other}'"):
            build_config({"data": {"imagenet_norm": True, "normalize": other}})
    with pytest.raises(ConfigError, match=r"data.normalize: Input should be 'none', 'image' or 'imagenet' \(got 'minmax'\)"):
        build_config({"data": {"normalize": "minmax"}})


def test_augment_takes_true_false_paper_or_light():
    for value in (True, False, "paper", "light"):
        assert build_config({"data": {"augment": value}}).data.augment == value
    assert build_config({}, ["data.augment=light"]).data.augment == "light"
    with pytest.raises(ConfigError, match=r"data.augment.*'paper' or 'light' \(got 'heavy'\)"):
        build_config({"data": {"augment": "heavy"}})


def test_partition_clients_sites_needs_the_site_scheme_and_a_dataset():
    cfg = build_config({"partition": {"scheme": "site", "clients": "sites"}})
    assert cfg.partition.clients == "sites"
    with pytest.raises(ConfigError, match="partition.clients is 'sites': the count is known once the dataset is opened"):
        cfg.clients_per_round
    # An explicit cohort size needs no count; the client-count checks wait for the dataset.
    assert build_config({"partition": {"scheme": "site", "clients": "sites"},
                         "fl": {"clients_per_round": 9, "min_clients": 9}}).clients_per_round == 9
    with pytest.raises(ConfigError, match="partition.clients 'sites' needs partition.scheme 'site' \\(got 'iid'\\)"):
        build_config({"partition": {"clients": "sites"}})
    with pytest.raises(ConfigError, match="partition.clients must be at least 1 \\(got 0\\)"):
        build_config({"partition": {"clients": 0}})
    with pytest.raises(ConfigError, match="partition.clients.*got 'all'"):
        build_config({"partition": {"scheme": "site", "clients": "all"}})


def test_partition_clients_sites_becomes_the_number_of_training_sites(phantoms):
    import numpy as np

    from cxrfl_ray.experiment import prepare

    data = phantoms(n=60, size=32, sites=3)
    base = {"data": {"path": str(data), "size": 32}, "partition": {"scheme": "site", "clients": "sites"},
            "fl": {"fraction": 1.0}}
    prep = prepare(build_config(base))
    assert prep.cfg.partition.clients == 3 and len(prep.plan.clients) == 3
    assert prep.cfg.clients_per_round == 3
    sites = np.asarray(prep.dataset.metadata.column("site").to_pylist())
    assert sorted(set(sites[c]).pop() for c in prep.plan.clients) == ["site0", "site1", "site2"]
    assert all(len(set(sites[c])) == 1 for c in prep.plan.clients)  # one client per site
    held = prepare(build_config(base, ["data.holdout_sites=[site1]"]))
    assert held.cfg.partition.clients == 2 and len(held.plan.clients) == 2
    assert {set(sites[c]).pop() for c in held.plan.clients} == {"site0", "site2"}
    # The resolved count is checked like a written one, as a ConfigError.
    with pytest.raises(ConfigError, match="fl.clients_per_round 4 is more than partition.clients 3"):
        prepare(build_config(base, ["fl.clients_per_round=4"]))
    with pytest.raises(ConfigError, match="has no training site"):
        prepare(build_config(base, ["data.holdout_sites=[site0,site1,site2]"]))


def test_partition_clients_sites_counts_only_sites_with_training_rows(tmp_path):
    from cxrfl_ray.data.writer import DatasetWriter
    from cxrfl_ray.experiment import prepare
    from tests.conftest import make_rows

    rows = make_rows(30, sites=("A", "B", "C"))
    for r in rows:
        if r["site"] == "C":
            r["split"] = "test"  # an external test site: evaluated, never a client
    with DatasetWriter(tmp_path / "d", name="d", label_names=["a", "b", "c"]) as w:
        for r in rows:
            w.add(r)
    base = {"data": {"path": str(tmp_path / "d")}, "partition": {"scheme": "site", "clients": "sites"}}
    prep = prepare(build_config(base))
    assert prep.cfg.partition.clients == 2 and len(prep.plan.clients) == 2
    sites = prep.dataset.metadata.column("site").to_pylist()
    assert sorted(tuple({sites[i] for i in c}) for c in prep.plan.clients) == [("A",), ("B",)]  # one per site
    assert ("site", "C") in prep.views  # still evaluated
    both = prepare(build_config(base, ["data.train_splits=[train,test]"]))
    assert both.cfg.partition.clients == 3


def test_overrides_leave_the_callers_dict_alone():
    from cxrfl_ray.presets import PRESETS

    base = {"train": {"lr": 0.1}, "data": {"holdout_sites": ["a"]}}
    assert build_config(base, ["train.lr=0.5", "data.holdout_sites=[b]"]).train.lr == 0.5
    assert base == {"train": {"lr": 0.1}, "data": {"holdout_sites": ["a"]}}
    rounds = PRESETS["default-classification"]["fl"]["rounds"]
    assert build_config(PRESETS["default-classification"], [f"fl.rounds={rounds + 7}"]).fl.rounds == rounds + 7
    assert PRESETS["default-classification"]["fl"]["rounds"] == rounds  # a preset is not changed by --set


def test_load_yaml_refuses_duplicate_keys_naming_key_line_and_file(tmp_path):
    from cxrfl_ray.config import load_yaml

    path = tmp_path / "dup.yaml"
    path.write_text("fl:\n  rounds: 3\ntrain:\n  lr: 0.1\nfl:\n  rounds: 5\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert str(err.value) == f"{path}, line 5: not valid YAML: duplicate key 'fl' (first on line 1)"
    with pytest.raises(ConfigError, match=r"line 1: not valid YAML: duplicate key 'lr' \(first on line 1\)"):
        load_config(_write(tmp_path / "flow.yaml", "train: {lr: 0.1, lr: 0.2}\n"))
    # A "<<" merge may be overridden: that is YAML's own rule, not a duplicate.
    merged = load_yaml(_write(tmp_path / "merge.yaml", "base: &b {a: 1, b: 2}\nx:\n  <<: *b\n  a: 3\n"))
    assert merged["x"] == {"a": 3, "b": 2}
    with pytest.raises(ConfigError, match=f"file not found: {tmp_path / 'missing.yaml'}"):
        load_yaml(tmp_path / "missing.yaml")


def _write(path, text):
    path.write_text(text)
    return path
