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
