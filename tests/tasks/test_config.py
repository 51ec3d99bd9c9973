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


def test_counts_are_strict_a_boolean_or_a_float_is_refused_naming_the_field():
    for key, value, message in (
        ("fl.rounds", "true", "fl.rounds: Input should be a valid integer (got True)"),
        ("fl.rounds", "2.0", "fl.rounds: Input should be a valid integer (got 2.0)"),
        ("train.steps", "'3'", "train.steps: Input should be a valid integer (got '3')"),
        ("seed", "false", "seed: Input should be a valid integer (got False)"),
        ("partition.clients", "true", "partition.clients: Input should be a whole number or 'sites' (got True)"),
        ("partition.clients", "2.0", "partition.clients: Input should be a whole number or 'sites' (got 2.0)"),
        ("data.channels", "true", "data.channels: Input should be a number, not a boolean (got True)"),
        ("fl.fraction", "true", "fl.fraction: Input should be a number, not a boolean (got True)"),
    ):
        with pytest.raises(ConfigError) as err:
            build_config({}, [f"{key}={value}"])
        assert str(err.value) == f"invalid config (dict): {message} from --set {key}={value}"
    # Other numbers still take ints, and the strings PyYAML makes of exponents without a dot.
    cfg = build_config({}, ["train.lr=1e-3", "fl.fraction=1", "fl.client_num_cpus=2"])
    assert (cfg.train.lr, cfg.fl.fraction, cfg.fl.client_num_cpus) == (0.001, 1.0, 2.0)


def test_every_preset_validates_under_the_strict_counts():
    from cxrfl_ray.presets import PRESETS

    for name, preset in PRESETS.items():  # the shipped sweep and study specs: tests/test_sweep.py
        assert build_config(preset, source=name).name == name


def test_exponents_without_a_dot_are_numbers_as_in_yaml_1_2(tmp_path):
    from cxrfl_ray.config import load_yaml

    # PyYAML (YAML 1.1) reads 1e-3 as the string "1e-3": a strategy option would get text.
    data = load_yaml(_write(tmp_path / "n.yaml", "a: 1e-3\nb: -2E+2\nc: 1.5e-1\nd: 12\ne: 1e\nf: e5\n"))
    assert data == {"a": 0.001, "b": -200.0, "c": 0.15, "d": 12, "e": "1e", "f": "e5"}
    assert build_config({}, ["fl.strategy.options.eta=1e-9"]).fl.strategy.options == {"eta": 1e-9}
    cfg = load_config(_write(tmp_path / "c.yaml", "fl:\n  strategy: {name: fedadam, options: {eta: 1e-2}}\n"))
    assert cfg.fl.strategy.options == {"eta": 0.01}
    # ... and a string that looks like one is written quoted, so it reads back a string.
    sites = build_config({"data": {"holdout_sites": ["1e5", "0E0"]}})
    assert "- '1e5'" in sites.to_yaml() and load_config(sites.save(tmp_path / "s.yaml")) == sites


def test_override_values_that_are_not_yaml_name_the_override():
    with pytest.raises(ConfigError) as err:
        build_config({}, ["data.path=[unclosed"])
    assert str(err.value) == ("override data.path=[unclosed: the value is not valid YAML (expected ',' or ']', "
                              "but got '<stream end>'); quote it for a plain string, e.g. data.path='\"[unclosed\"'")
    assert build_config({}, ['data.path="[unclosed"']).data.path == "[unclosed"
    with pytest.raises(ConfigError) as err:
        build_config({}, ["trian.lr=0.1"])
    assert str(err.value) == "invalid config (dict): trian: Extra inputs are not permitted from --set trian.lr=0.1"
    with pytest.raises(ConfigError) as err:
        build_config({}, ["train.lrr=3"])
    assert str(err.value) == "invalid config (dict): train.lrr: Extra inputs are not permitted (got 3) from --set train.lrr=3"
    with pytest.raises(ConfigError, match=r"override 'fl..rounds': a key part is empty"):
        build_config({}, ["fl..rounds=3"])


def test_an_empty_config_file_runs_the_defaults_with_a_warning(tmp_path, capsys):
    path = _write(tmp_path / "empty.yaml", "# everything commented out\n# fl:\n#   rounds: 9\n")
    assert load_config(path) == build_config({})
    assert capsys.readouterr().err == f"cxrfl: warning: {path} is empty: running the built-in defaults\n"
    assert load_config(_write(tmp_path / "braces.yaml", "{}\n")) == build_config({})  # said explicitly
    assert capsys.readouterr().err == ""


# -- properties -------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_floats = st.floats(min_value=1e-9, max_value=1e9, allow_nan=False, allow_infinity=False)
_counts = st.integers(min_value=1, max_value=2**40)
# What a user can type: any printable text (no control characters or line separators, which a
# shell argument would not carry either).
_text = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=30)
OVERRIDABLE = {  # dotted key -> values it takes (default task: classification, main metric accuracy)
    "name": _text, "seed": st.integers(min_value=-2**40, max_value=2**40), "out_dir": _text,
    "data.path": _text, "data.size": st.integers(min_value=16, max_value=4096),
    "data.cache_mb": st.integers(min_value=0, max_value=2**30), "train.lr": _floats,
    "train.weight_decay": _floats, "train.batch_size": _counts, "train.epochs": _counts,
    "train.steps": _counts, "fl.rounds": _counts, "fl.round_timeout": _floats,
    "fl.fraction": st.floats(min_value=0, max_value=1, exclude_min=True),
    "fl.min_replies": _counts, "fl.thresholds.accuracy": st.floats(min_value=0, max_value=1),
    "fl.strategy.options.eta": _floats, "fl.ray_init.num_cpus": _counts, "tracking.project": _text,
}


def _dotted(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(OVERRIDABLE)).flatmap(lambda k: st.tuples(st.just(k), OVERRIDABLE[k])))
def test_a_set_override_sets_exactly_that_value(item):
    import json

    key, value = item
    typed = json.dumps(value, ensure_ascii=False)  # what a user types: a number as is, a string quoted
    cfg = build_config({}, [f"{key}={typed}"])
    got = _dotted(cfg, key)
    assert got == value and type(got) is type(value), (typed, got)
    untouched = build_config({}).model_dump()
    dumped = cfg.model_dump()
    top, *rest = key.split(".")
    untouched.pop(top), dumped.pop(top)
    assert dumped == untouched  # and nothing else


_MODELS = {"classification": ["tiny-conv", "resnet18"], "segmentation": ["tiny-conv-seg", "unet-resnet18"]}
_LOSSES = {"classification": [None, "cross_entropy"], "segmentation": [None, "dice_bce", "dice", "bce"]}
_METRIC = {"classification": "accuracy", "segmentation": "jaccard"}


@st.composite
def experiment_configs(draw):
    """Valid configs over most fields (cross-field rules respected)."""
    task = draw(st.sampled_from(["classification", "segmentation"]))
    clients = draw(st.integers(min_value=1, max_value=64))
    scheme = draw(st.sampled_from(["iid", "dirichlet", "quantity", "site"]))
    data = {
        "path": draw(_text), "size": draw(st.integers(min_value=16, max_value=4096)),
        "channels": draw(st.sampled_from([1, 3])), "normalize": draw(st.sampled_from([None, "none", "image", "imagenet"])),
        "augment": draw(st.sampled_from([True, False, "paper", "light"])),
        "train_splits": draw(st.lists(_text, max_size=3)), "holdout_sites": draw(st.lists(_text, max_size=3)),
        "num_workers": draw(st.integers(min_value=0, max_value=16)),
        "cache_mb": draw(st.integers(min_value=0, max_value=2**20)),
    }
    partition = {"scheme": scheme, "clients": "sites" if scheme == "site" and draw(st.booleans()) else clients,
                 "alpha": draw(_floats), "power": draw(st.floats(min_value=0, max_value=10)),
                 "min_size": draw(st.integers(min_value=0, max_value=10))}
    train = {"optimizer": draw(st.sampled_from(["adam", "adamw", "sgd", "adagrad"])), "lr": draw(_floats),
             "momentum": draw(st.floats(min_value=0, max_value=1, exclude_max=True)),
             "batch_size": draw(_counts), "epochs": draw(_counts), "steps": draw(st.none() | _counts),
             "lr_schedule": draw(st.sampled_from(["constant", "cosine"])),
             "loss": draw(st.sampled_from(_LOSSES[task])), "num_threads": draw(st.none() | _counts)}
    if task == "classification":
        train["class_weights"] = draw(st.none() | st.lists(_floats, max_size=4))
    per_round = draw(st.none() | st.integers(min_value=1, max_value=clients))
    fl = {"rounds": draw(_counts), "fraction": draw(st.floats(min_value=0, max_value=1, exclude_min=True)),
          "min_clients": draw(st.integers(min_value=1, max_value=clients)), "clients_per_round": per_round,
          "strategy": {"name": draw(st.sampled_from(["fedavg", "fedadam", "krum"])),
                       "options": draw(st.dictionaries(st.sampled_from(["eta", "tau", "flag", "mode"]),
                                                       _floats | st.integers() | st.booleans() | _text, max_size=3))},
          "client_num_cpus": draw(_floats), "client_num_gpus": draw(st.floats(min_value=0, max_value=8)),
          "round_timeout": draw(_floats), "client_eval": draw(st.booleans()),
          "thresholds": draw(st.dictionaries(st.just(_METRIC[task]), st.floats(min_value=0, max_value=1))),
          "min_replies": draw(_counts), "max_failed_rounds": draw(_counts)}
    return build_config({
        "name": draw(_text), "task": task, "seed": draw(st.integers(min_value=-2**40, max_value=2**40)),
        "out_dir": draw(_text), "data": data, "partition": partition,
        "model": {"name": draw(st.sampled_from(_MODELS[task])), "norm": draw(st.sampled_from(["batch", "group"]))},
        "train": train, "fl": fl,
        "faults": {"client_failure_rate": draw(st.floats(min_value=0, max_value=1, exclude_max=True))},
        "tracking": {"wandb": draw(st.sampled_from(["offline", "online", "disabled"])), "group": draw(st.none() | _text)},
    })


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(experiment_configs())
def test_a_config_round_trips_through_its_yaml_file(tmp_path, cfg):
    path = cfg.save(tmp_path / "config.yaml")
    assert load_config(path) == cfg
