"""Partition plans: patients stay whole, seeds decide everything, skews are real."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from cxrfl_ray.cli import main as cxrfl
from cxrfl_ray.data.partition import PartitionError, Plan, plan_partition
from cxrfl_ray.data.store import open_dataset


def metadata(n: int, *, sites=("A", "B", "C", "D"), images_per_patient=1, labels=None, seed=0) -> pa.Table:
    rng = np.random.default_rng(seed)
    patients = np.arange(n) // images_per_patient
    labels = rng.integers(0, 3, patients.max() + 1)[patients] if labels is None else np.asarray(labels)
    return pa.table({
        "id": [f"r{i}" for i in range(n)],
        "site": [sites[p % len(sites)] for p in patients],
        "patient_id": [f"P{p}" for p in patients],
        "split": ["train"] * n,
        "label": pa.array(labels, pa.int16()),
    })


def check_plan(plan: Plan, meta: pa.Table) -> None:
    """Clients are disjoint, cover the pool, and never split a patient."""
    all_rows = np.concatenate(plan.clients)
    assert all_rows.size == np.unique(all_rows).size
    patients = np.asarray(meta.column("patient_id").to_pylist())
    owner: dict[str, int] = {}
    for cid, rows in enumerate(plan.clients):
        assert rows.size > 0
        for p in np.unique(patients[rows]):
            assert owner.setdefault(p, cid) == cid, f"patient {p} in clients {owner[p]} and {cid}"


@pytest.mark.parametrize("scheme, args", [("iid", {}), ("dirichlet", {"alpha": 0.3}),
                                          ("quantity", {"power": 1.5}), ("site", {})])
def test_schemes_keep_patients_whole_and_are_seeded(scheme, args):
    meta = metadata(900, images_per_patient=3)
    plan = plan_partition(meta, scheme, 8, seed=1, **args)
    check_plan(plan, meta)
    assert sum(c.size for c in plan.clients) == 900
    again = plan_partition(meta, scheme, 8, seed=1, **args)
    assert all(np.array_equal(a, b) for a, b in zip(plan.clients, again.clients))
    other = plan_partition(meta, scheme, 8, seed=2, **args)
    assert not all(np.array_equal(a, b) for a, b in zip(plan.clients, other.clients))


def test_iid_is_round_robin_over_labels():
    labels = np.repeat([0, 1, 2], [30, 60, 90])
    plan = plan_partition(metadata(180, labels=labels), "iid", 3, seed=0)
    counts = np.array([np.bincount(labels[c], minlength=3) for c in plan.clients])
    np.testing.assert_array_equal(counts, [[10, 20, 30]] * 3)


def label_skew(plan: Plan, labels: np.ndarray) -> float:
    """Mean over clients of the largest label share (1/3 = balanced, 1 = one label)."""
    return float(np.mean([np.bincount(labels[c], minlength=3).max() / c.size for c in plan.clients]))


def test_dirichlet_small_alpha_skews_labels_more():
    meta = metadata(3000)
    labels = meta.column("label").to_numpy()
    skew = {a: label_skew(plan_partition(meta, "dirichlet", 10, seed=0, alpha=a), labels) for a in (0.1, 1.0, 100.0)}
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[0.1] > 0.75 and skew[100.0] < 0.45


def test_dirichlet_min_size_is_met_even_with_many_clients():
    plan = plan_partition(metadata(2000), "dirichlet", 400, seed=0, alpha=0.1, min_size=2)
    assert min(c.size for c in plan.clients) >= 2


def test_quantity_power_law_sizes():
    meta = metadata(5000)
    flat = plan_partition(meta, "quantity", 20, seed=0, power=0.0)
    skewed = plan_partition(meta, "quantity", 20, seed=0, power=1.5)
    assert {c.size for c in flat.clients} == {250}
    sizes = sorted(c.size for c in skewed.clients)
    assert sizes[-1] / sizes[0] > 50 and sum(sizes) == 5000


def test_site_scheme_gives_pure_site_clients():
    meta = metadata(400)
    sites = np.asarray(meta.column("site").to_pylist())
    plan = plan_partition(meta, "site", 4, seed=0)
    assert [set(sites[c]) for c in plan.clients] == [{"A"}, {"B"}, {"C"}, {"D"}]
    split = plan_partition(meta, "site", 10, seed=0)
    assert all(len(set(sites[c])) == 1 for c in split.clients)
    assert sorted(sum(1 for c in split.clients if sites[c[0]] == s) for s in "ABCD") == [2, 2, 3, 3]


def test_holdout_sites_and_eval_splits_stay_out_of_training(small_dataset):
    ds = open_dataset(small_dataset)
    plan = plan_partition(ds, "iid", 3, seed=0, holdout_sites=["B"])
    meta = ds.metadata
    sites = np.asarray(meta.column("site").to_pylist())
    splits = np.asarray(meta.column("split").to_pylist())
    trained = np.concatenate(plan.clients)
    assert set(sites[trained]) == {"A"} and set(splits[trained]) == {"train"}
    np.testing.assert_array_equal(plan.holdout["B"], np.flatnonzero(sites == "B"))
    np.testing.assert_array_equal(plan.central["test"], np.flatnonzero((splits == "test") & (sites == "A")))
    assert set(plan.central) == {"val", "test"}


@pytest.mark.parametrize("kwargs, message", [
    ({"scheme": "iid", "num_clients": 500}, r"more clients \(500\) than patients \(300\)"),
    ({"scheme": "dirichlet", "num_clients": 3, "alpha": 0.0}, "alpha must be > 0"),
    ({"scheme": "iid", "num_clients": 3, "holdout_sites": ["Z"]}, r"unknown holdout site\(s\) \['Z'\]"),
    ({"scheme": "banana", "num_clients": 3}, "unknown scheme 'banana'"),
    ({"scheme": "site", "num_clients": 2}, "at least one client per site"),
    ({"scheme": "iid", "num_clients": 0}, "clients must be >= 1"),
])
def test_invalid_requests_fail_clearly(kwargs, message):
    with pytest.raises(PartitionError, match=message):
        plan_partition(metadata(600, images_per_patient=2), **kwargs)


def test_plan_file_round_trip_and_cli(small_dataset, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert cxrfl(["partition", str(small_dataset), "--scheme", "dirichlet", "--alpha", "0.5",
                  "--clients", "4", "--seed", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "client" in printed and "4 clients; rows per client" in printed
    loaded = Plan.load(out)
    direct = plan_partition(open_dataset(small_dataset), "dirichlet", 4, seed=3, alpha=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.clients, direct.clients))
    assert loaded.dataset["num_rows"] == 120 and loaded.params["alpha"] == 0.5
    assert cxrfl(["partition", str(small_dataset), "--clients", "999"]) == 2
    assert "more clients (999)" in capsys.readouterr().err


def test_real_federation_roles_plan_site_and_server_rows(small_dataset, tmp_path):
    """A site's dataset is its one client (all usable training rows); the server plans no clients
    and keeps only the evaluation rows, also when it holds no training rows at all."""
    from cxrfl_ray.config import build_config
    from cxrfl_ray.data.writer import DatasetWriter
    from cxrfl_ray.experiment import prepare
    from tests.conftest import make_rows

    cfg = build_config({"task": "segmentation", "data": {"path": str(small_dataset), "size": 32},
                        "model": {"name": "tiny-conv-seg"}, "partition": {"clients": 3}})
    splits = np.asarray(open_dataset(small_dataset).metadata.column("split").to_pylist())
    site = prepare(cfg, role="site")
    assert len(site.plan.clients) == 1
    np.testing.assert_array_equal(site.plan.clients[0], np.flatnonzero(splits == "train"))
    server = prepare(cfg, role="server")
    assert server.plan.clients == []
    simulation = prepare(cfg)
    assert server.views.keys() == simulation.views.keys()
    for key, rows in simulation.views.items():
        np.testing.assert_array_equal(server.views[key], rows)

    eval_only = tmp_path / "eval-only"
    with DatasetWriter(eval_only, name="eval", label_names=["a", "b", "c"]) as w:
        for row in make_rows(10, split_cycle=("val", "test")):
            w.add(row)
    server = prepare(build_config({**cfg.model_dump(mode="json"), "data": {"path": str(eval_only), "size": 32}}),
                     role="server")
    assert sorted(k for k in server.views if k[0] == "central") == [("central", "test"), ("central", "val")]
    with pytest.raises(Exception, match="site dataset .*no training rows"):
        prepare(server.cfg, role="site")
