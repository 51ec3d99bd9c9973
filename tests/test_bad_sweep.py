"""Bad sweep and study specs: each is refused before Ray or Tune starts, with one line that names
the file and the key (issue 14, item 8 and the spec-typo battery). No Ray here: the Ray-level
checks (a trial that cannot fit, attempts, a failing trial) are in test_sweep.py."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cxrfl_ray.config import ConfigError
from cxrfl_ray.report import config_table
from cxrfl_ray.sweep import check_trials_fit, load_spec, metric_names, validate

SMOKE = Path(__file__).resolve().parents[1] / "tune_configs" / "smoke.yaml"


@pytest.fixture()
def write_spec(tmp_path, phantoms):
    """``write_spec(change, base=...)``: the smoke spec on small phantoms, with ``change`` applied
    to the spec and ``base`` merged into its base config; returns the file."""
    data_path = str(phantoms(n=120, size=48))

    def write(change: dict | None = None, base: dict | None = None, name: str = "bad.yaml") -> Path:
        data = yaml.safe_load(SMOKE.read_text())
        data["base"]["data"]["path"] = data_path
        data.update(change or {})
        for section, values in (base or {}).items():
            if isinstance(values, dict) and isinstance(data["base"].get(section), dict):
                data["base"][section].update(values)
            else:
                data["base"][section] = values
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path

    return write


def refused(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        validate(load_spec(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message  # one line, naming the file
    return message


# -- typos: unknown keys, kinds and metrics ---------------------------------------------------

@pytest.mark.parametrize("change, base, expected", [
    ({"nmae": "x"}, None, "invalid sweep spec {path}: nmae: Extra inputs are not permitted "
                          "(unknown key; did you mean name?)"),
    ({"scheduler": {"name": "asha", "grace_perod": 2}}, None,
     "invalid sweep spec {path}: scheduler.grace_perod: Extra inputs are not permitted "
     "(unknown key; did you mean scheduler.grace_period?)"),
    ({"space": {"train.lr": {"unifrom": [0.001, 0.1]}}}, None,
     "invalid sweep spec {path}: space.train.lr: give exactly one of grid, choice, uniform, loguniform, randint "
     "(got ['unifrom']; did you mean uniform?)"),
    ({"space": {"train.lrr": {"grid": [0.01]}}}, None,
     "sweep spec {path}: space.train.lrr: not a config key; did you mean train.lr?"),
    (None, {"train": {"lrr": 0.01}}, "sweep spec {path}: base.train.lrr: Extra inputs are not permitted "
                                      "(unknown key; did you mean base.train.lr?)"),
    (None, {"trian": {"lr": 0.01}}, "sweep spec {path}: base.trian: Extra inputs are not permitted "
                                     "(unknown key; did you mean base.train?)"),
    ({"metric": "central/val/jacard"}, None,
     "sweep spec {path}: metric 'central/val/jacard': segmentation trials report no 'jacard' (did you mean "
     "central/val/jaccard?); metrics: dice, examples, jaccard, jaccard_min, jaccard_pooled, loss"),
    ({"metric": "central/train/jaccard"}, None,
     "sweep spec {path}: metric 'central/train/jaccard': no view central/train in this data (did you mean "
     "central/val/jaccard?); views: central/val, central/test, site/site0, site/site1, site/site2, site/site3, "
     "round/server"),
])
def test_a_spec_typo_is_refused_naming_the_file_and_the_key(write_spec, change, base, expected):
    path = write_spec(change, base)
    assert refused(path) == expected.format(path=path)


def test_the_metrics_a_trial_reports_are_the_ones_validate_accepts():
    assert metric_names("segmentation", 1) == ["dice", "examples", "jaccard", "jaccard_min", "jaccard_pooled", "loss"]
    names = metric_names("classification", 3)
    assert {"accuracy", "auroc_macro", "f1_macro", "loss", "recall_2", "cm_2_2"} <= set(names)


def test_the_round_metrics_of_the_server_are_accepted(write_spec):
    validate(load_spec(write_spec({"metric": "round/server/train_loss", "mode": "min"})))


def test_a_duplicate_key_in_a_sweep_spec_is_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: dup\nbase:\n  train: {lr: 0.1}\n  train: {lr: 0.2}\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}.*duplicate key 'train'"):
        load_spec(path)


def test_a_spec_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- name: x\n")
    with pytest.raises(ConfigError, match=rf"^sweep spec {re.escape(str(path))}: expected a mapping at the top "
                                          r"level \(got list\)$"):
        load_spec(path)


def test_a_spec_typo_through_the_cli_is_one_error_line(write_spec, capsys):
    from cxrfl_ray.cli import main

    path = write_spec({"space": {"train.lr": {"unifrom": [0.001, 0.1]}}})
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cxrfl sweep: error: invalid sweep spec {path}: space.train.lr: give exactly one of grid, "
                   "choice, uniform, loguniform, randint (got ['unifrom']; did you mean uniform?)"]


# -- item 8: every draw type-checked, seed.x ---------------------------------------------------

def test_a_float_range_over_an_int_field_is_refused_before_the_sweep(write_spec):
    path = write_spec({"space": {"fl.rounds": {"uniform": [2, 4]}}})
    assert refused(path) == (f"sweep spec {path}: space.fl.rounds.uniform draws values such as 2.74, which "
                             "fl.rounds refuses (Input should be a valid integer); use randint or choice for "
                             "whole numbers")
    path = write_spec({"space": {"train.steps": {"loguniform": [1, 8]}}})
    assert "space.train.steps.loguniform draws values such as 2.828, which train.steps refuses" in refused(path)


def test_a_randint_whose_inner_values_its_field_refuses_is_refused(write_spec):
    path = write_spec({"space": {"data.channels": {"randint": [1, 4]}}})
    assert refused(path) == (f"sweep spec {path}: space.data.channels.randint draws values such as 2, which "
                             "data.channels refuses (Input should be 1 or 3); use choice with the allowed values")


def test_ranges_that_fit_their_fields_pass(write_spec):
    configs = validate(load_spec(write_spec({"space": {"fl.rounds": {"randint": [2, 4]},
                                                       "train.lr": {"loguniform": [0.0001, 0.1]}}})))
    assert sorted((c.fl.rounds, c.train.lr) for c in configs) == [(2, 0.0001), (2, 0.1), (3, 0.0001), (3, 0.1)]


def test_every_grid_value_is_validated_not_only_the_first(write_spec):
    path = write_spec({"space": {"fl.rounds": {"grid": [2, 3, 2.5]}}})
    assert refused(path) == (f"invalid config sweep spec {path} trial fl.rounds=2.5: fl.rounds: Input should be "
                             "a valid integer (got 2.5)")


def test_a_dotted_key_below_a_value_is_refused_naming_it(write_spec):
    path = write_spec({"space": {"seed.x": {"grid": [1]}}})
    assert refused(path) == f"sweep spec {path} trial seed.x=1: seed.x: seed is not a section (it is 0)"


# -- item 8: a trial that cannot fit the cluster --------------------------------------------

def test_a_trial_that_cannot_fit_the_nodes_says_what_to_lower(write_spec):
    path = write_spec({"client_slots": 2, "driver_cpus": 1, "space": {}}, {"fl": {"client_num_cpus": 1}})
    spec = load_spec(path)
    configs = validate(spec)
    check_trials_fit(spec, configs, [{"CPU": 3.0}])  # 1 + 2 x 1 CPUs fit
    with pytest.raises(ConfigError) as info:
        check_trials_fit(spec, configs, [{"CPU": 2.0}])
    assert str(info.value) == (
        f"sweep spec {path}: a trial's placement group needs 3 CPUs and 0 GPUs (driver_cpus 1, driver_gpus 0, "
        "plus 2 client slot(s) of fl.client_num_cpus 1, fl.client_num_gpus 0), but this Ray cluster (2 CPUs, "
        "0 GPUs on 1 node(s)) fits 1 client slot(s) beside the driver, and Tune would wait for it forever: "
        "lower client_slots, fl.client_num_cpus, driver_cpus")


def test_a_gpu_trial_on_a_cpu_cluster_names_the_gpu_settings(write_spec):
    spec = load_spec(write_spec({"client_slots": None, "space": {"fl.clients_per_round": {"grid": [1, 2]}}},
                                 {"fl": {"client_num_gpus": 0.5}}))
    configs = validate(spec)
    with pytest.raises(ConfigError, match=r"needs 1 CPUs and 0.5 GPUs .* fits 0 client slot\(s\) beside the "
                                          r"driver, .*: lower fl.clients_per_round \(or set client_slots\), "
                                          r"fl.client_num_gpus, driver_gpus$"):
        check_trials_fit(spec, configs, [{"CPU": 16.0}])
    check_trials_fit(spec, configs, [{"CPU": 2.0, "GPU": 1.0}])  # two clients of half a GPU
    with pytest.raises(ConfigError, match=r"fits 1 client slot\(s\)"):  # each bundle on one node
        check_trials_fit(spec, configs, [{"CPU": 2.0, "GPU": 0.5}, {"CPU": 2.0, "GPU": 0.4}])


# -- study specs --------------------------------------------------------------------------

STUDY = Path(__file__).resolve().parents[1] / "tune_configs" / "real_hospitals.yaml"


def test_a_study_spec_typo_is_one_line_naming_the_file(tmp_path):
    from cxrfl_ray.study_spec import load_study, validate as validate_study

    spec = tmp_path / "study.yaml"
    spec.write_text(STUDY.read_text())
    with pytest.raises(ConfigError) as info:
        load_study(spec, [f"sources=[{tmp_path}]", "cam.methd=gradcam"])
    assert str(info.value) == (f"invalid study spec {spec}: cam.methd: Extra inputs are not permitted "
                               "(unknown key; did you mean cam.method?)")
    loaded = load_study(spec, [f"sources=[{tmp_path}]", "segmentation.set={train.lrr: 0.1}"])
    with pytest.raises(ConfigError) as info:
        validate_study(loaded, tmp_path / "out")
    assert str(info.value) == (f"invalid config study spec {spec}: segmentation: train.lrr: Extra inputs are not "
                               "permitted (got 0.1)")


def test_a_duplicate_key_in_a_study_spec_is_refused(tmp_path):
    from cxrfl_ray.study_spec import load_study

    spec = tmp_path / "study.yaml"
    spec.write_text(f"name: s\nsources: [{tmp_path}]\nname: t\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(spec))}.*duplicate key 'name'"):
        load_study(spec)


# -- item 4: a failed trial is not a result ------------------------------------------------

def test_a_failed_trial_is_counted_as_failed_not_averaged_in():
    outcomes = pd.DataFrame({
        "trial": ["a", "b", "c"], "status": ["TERMINATED", "ERROR", "ERROR"],
        "param:train.lr": [0.1, 0.1, 1.0], "final": [0.8, 0.1, 0.2], "best": [0.8, 0.3, 0.2],
        "rounds_to_threshold": [2.0, None, None]})
    table = config_table(outcomes, ["param:train.lr"])
    assert table.to_dict("records") == [
        {"param:train.lr": 0.1, "seeds": 1, "failed": 1, "final": "0.8000", "best": "0.8000",
         "rounds_to_threshold": "2.0"},
        {"param:train.lr": 1.0, "seeds": 0, "failed": 1, "final": "", "best": "", "rounds_to_threshold": "failed"}]


def test_a_personal_metric_is_accepted_only_for_an_algorithm_with_personal_models(write_spec):
    """FedBN logs each site's own model as personal/SITE/...; a sweep may select by it. Other
    strategies log no personal scope, so Tune would fail every trial on its first result."""
    change = {"metric": "personal/site0/jaccard"}
    validate(load_spec(write_spec(change, base={"fl": {"strategy": {"name": "fedbn"}}}, name="fedbn.yaml")))
    assert "no view personal/site0 in this data" in refused(write_spec(change, name="fedavg.yaml"))
