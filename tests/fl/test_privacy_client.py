"""Client-level DP (DP-FedAvg) on the round seam: the clipping, the noise and the adaptive clip at
the function level on hand-built replies (no Ray), epsilon against dp-accounting called directly,
the strategies it refuses, then the engine: z = 0 with a large clip is the plain run bit for bit,
and a killed DP run resumes to the same metrics and epsilon."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from flwr.app import Array, ArrayRecord
from safetensors.torch import load_file

from cxrfl_ray.config import ConfigError, build_config
from cxrfl_ray.fl.algorithms import make_algorithm
from cxrfl_ray.fl.privacy import make_privacy
from cxrfl_ray.fl.privacy.accounting import epsilon, noise_for_epsilon
from cxrfl_ray.fl.privacy.client_level import update_noise_multiplier
from cxrfl_ray.fl.rounds import ServerHooks
from cxrfl_ray.fl.strategies import make_strategy
from tests.fl.messages import stopped_after_round_1, train_reply


def _cfg(strategy: str = "fedavg", **privacy):
    return build_config({"task": "classification", "model": {"name": "tiny-conv"}, "partition": {"clients": 10},
                         "train": {"optimizer": "sgd", "momentum": 0.0},  # what SCAFFOLD needs, to reach its DP check
                         "fl": {"clients_per_round": 4, "rounds": 5, "strategy": {"name": strategy}},
                         "privacy": {"mode": "client", "noise_multiplier": 1.0, "clip_norm": 1.0, **privacy}})


def _record(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in weights.items()})


def _aggregate(cfg, glob: dict[str, np.ndarray], updates: list[dict[str, np.ndarray]], server_round: int = 1,
               privacy=None):
    """One round of ``cfg``'s DP aggregation of clients at ``glob + update``; the replies the strategy
    saw and the new global weights."""
    privacy = privacy or make_privacy(cfg, cfg.partition.clients, cfg.clients_per_round)
    strategy = make_strategy(cfg.fl.strategy.name, {}, num_clients=cfg.partition.clients,
                             per_round=cfg.clients_per_round, seed=0, client_eval=False)
    replies = [train_reply(cid, {"arrays": _record({k: glob[k] + u[k] for k in glob})},
                           **{"num-examples": 10 * (cid + 1), "train_loss": 0.5, "steps": 2})
               for cid, u in enumerate(updates)]
    seen = []

    def aggregate(rs):
        seen.extend(rs)
        return make_algorithm(cfg).aggregate(strategy, server_round, _record(glob), rs)

    arrays, _ = privacy.aggregate(server_round, _record(glob), replies, aggregate)
    return seen, {k: v.numpy() for k, v in arrays.items()}, privacy


def _norm(weights: dict, glob: dict) -> float:
    return math.sqrt(sum(float(((weights[k].numpy().astype(np.float64) - glob[k]) ** 2).sum()) for k in glob))


def test_every_update_is_clipped_to_the_norm_and_weighted_equally():
    rng = np.random.default_rng(0)
    glob = {"a": rng.normal(size=(30, 4)), "b": rng.normal(size=7)}
    scales = [0.1, 0.5, 3.0, 40.0]  # two under the clip of 1.0, two over
    updates = [{k: s * v / math.sqrt(sum((x ** 2).sum() for x in u.values())) for k, v in u.items()}
               for s, u in zip(scales, [{k: rng.normal(size=v.shape) for k, v in glob.items()} for _ in scales])]
    cfg = _cfg(noise_multiplier=0.0)
    # Each update alone: the new global moves by exactly the clipped update (norm min(|u|, C)).
    for s, u in zip(scales, updates):
        _, alone, _ = _aggregate(cfg, glob, [u])
        assert _norm({k: torch.from_numpy(v) for k, v in alone.items()}, glob) == pytest.approx(min(s, 1.0), rel=1e-5)
    seen, new, privacy = _aggregate(cfg, glob, updates)
    assert len(seen) == 1 and seen[0].content["metrics"]["num-examples"] == 1  # the clipped mean, as one reply
    assert privacy.last["clipped_share"] == 0.5
    # The average of the clipped updates, unweighted (the clients hold 10, 20, 30, 40 examples).
    clipped = [{k: u[k] * min(1.0, 1.0 / s) for k in u} for s, u in zip(scales, updates)]
    for k in glob:
        np.testing.assert_allclose(new[k], glob[k] + sum(c[k] for c in clipped) / 4, rtol=1e-5, atol=1e-6)
    # Nothing clipped, no noise: the replies go to the strategy as they are, weighted equally.
    small = [{k: v * 0.1 for k, v in u.items()} for u in updates[:2]]
    seen, _, _ = _aggregate(_cfg(noise_multiplier=0.0, clip_norm=100.0), glob, small)
    assert len(seen) == 2 and [r.content["metrics"]["num-examples"] for r in seen] == [1, 1]


def test_noise_on_the_average_has_std_z_c_over_k_and_comes_from_the_seed_and_round():
    glob = {"w": np.zeros(40_000)}
    updates = [{"w": np.zeros(40_000)}] * 4  # no update: the new global is the noise alone
    cfg = _cfg(noise_multiplier=2.0, clip_norm=0.5)
    _, new, _ = _aggregate(cfg, glob, updates)
    assert np.std(new["w"]) == pytest.approx(2.0 * 0.5 / 4, rel=0.02)
    assert abs(np.mean(new["w"])) < 4 * 0.25 / math.sqrt(40_000)
    _, again, _ = _aggregate(cfg, glob, updates)
    _, other_round, _ = _aggregate(cfg, glob, updates, server_round=2)
    assert np.array_equal(again["w"], new["w"]) and not np.allclose(other_round["w"], new["w"])


def test_adaptive_clip_moves_to_the_target_quantile_of_the_update_norms():
    glob = {"w": np.zeros(8)}
    norms = np.arange(1.0, 11.0)  # 10 clients with update norms 1..10; the median is 5.5
    updates = [{"w": np.r_[n, np.zeros(7)]} for n in norms]
    cfg = _cfg(noise_multiplier=1.0, clip_norm=0.2, adaptive_clip={"target_quantile": 0.5, "clip_lr": 0.3})
    privacy = make_privacy(cfg, 10, 10)
    clips = []
    for r in range(1, 61):
        _aggregate(cfg, glob, updates, server_round=r, privacy=privacy)
        clips.append(privacy.clip_norm)
    assert clips[0] > 0.2 and 3.5 < np.median(clips[-20:]) < 8.0
    state = privacy.state()
    fresh = make_privacy(cfg, 10, 10)
    fresh.restore(state)
    assert fresh.clip_norm == privacy.clip_norm and fresh.steps == 60


def test_adaptive_clipping_splits_the_noise_as_andrew_et_al():
    assert update_noise_multiplier(1.0, None) == 1.0
    assert update_noise_multiplier(1.0, 1.0) == pytest.approx((1 - 0.25) ** -0.5)
    assert update_noise_multiplier(2.0, 2.0) == pytest.approx(4 / math.sqrt(3))  # the default's 15% more noise
    with pytest.raises(ValueError, match=r"count_stddev 0.4 is too small for noise_multiplier 1: it needs count_stddev > 0.5"):
        make_privacy(_cfg(adaptive_clip={"count_stddev": 0.4}), 10, 4)
    # The default (max(cohort / 20, z)) fits every z, also z = 2 with a cohort of 4.
    assert make_privacy(_cfg(noise_multiplier=2.0, adaptive_clip={}), 10, 4).count_stddev == 2.0


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_equals_dp_accounting_called_directly(accountant):
    import dp_accounting
    from dp_accounting import pld, rdp

    q, z, steps, delta = 0.4, 1.3, 7, 1e-5
    acc = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps))
    assert epsilon(q, z, steps, delta, accountant) == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
    privacy = make_privacy(_cfg(noise_multiplier=z, accountant=accountant), 10, 4)
    privacy.steps = steps
    assert privacy.account(7, [])["federation"]["epsilon"] == pytest.approx(epsilon(0.4, z, steps, delta, accountant))
    assert epsilon(q, 0.0, 3, delta) == math.inf and epsilon(q, z, 0, delta) == 0.0


def test_a_target_epsilon_is_solved_for_the_planned_rounds_or_refused_with_the_smallest_reachable():
    privacy = make_privacy(_cfg(noise_multiplier=None, target_epsilon=3.0), 10, 4)
    z = privacy.noise_multiplier
    assert z == pytest.approx(noise_for_epsilon(3.0, 0.4, 5, 1e-5))
    assert 2.9 < epsilon(0.4, z, 5, 1e-5) <= 3.0
    with pytest.raises(ConfigError, match=r"privacy.target_epsilon 1e-06 cannot be met over fl.rounds 5 \(cohort 4 of "
                                          r"10 clients\): the smallest reachable epsilon .* is [0-9.]+"):
        try:
            ServerHooks.check(_cfg(noise_multiplier=None, target_epsilon=1e-6), 10)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan", "qfedavg",
                                      "scaffold", "fednova"])
def test_strategies_that_do_not_average_refuse_client_level_dp(strategy):
    from cxrfl_ray.config import StrategyName
    from typing import get_args

    if strategy not in get_args(StrategyName):
        pytest.skip(f"{strategy} is not a strategy here")
    with pytest.raises(ValueError, match=rf"privacy.mode 'client' needs a strategy that averages .*fl.strategy.name "
                                         rf"'{strategy}' does not"):
        ServerHooks.check(_cfg(strategy), 10)


def test_privacy_fields_are_checked_with_the_config():
    with pytest.raises(ConfigError, match="give exactly one of privacy.noise_multiplier and privacy.target_epsilon"):
        build_config({"privacy": {"mode": "client"}})
    with pytest.raises(ConfigError, match="privacy.noise_multiplier is set but privacy.mode is 'none'"):
        build_config({"privacy": {"noise_multiplier": 1.0}})
    with pytest.raises(ConfigError, match="privacy.adaptive_clip is for privacy.mode 'client'"):
        build_config({"privacy": {"mode": "sample", "noise_multiplier": 1.0, "adaptive_clip": {}},
                      "model": {"norm": "group"}})


# -- on the engine ------------------------------------------------------------------------------

def run_config(dataset, tmp_path, name: str, wandb: str = "disabled", **privacy):
    return build_config({
        "name": name, "out_dir": str(tmp_path), "seed": 0, "task": "classification",
        "data": {"path": str(dataset), "size": 32}, "model": {"name": "tiny-conv"}, "partition": {"clients": 3},
        "train": {"optimizer": "sgd", "momentum": 0.0, "lr": 0.05, "steps": 2, "batch_size": 8},
        "fl": {"rounds": 3, "clients_per_round": 2, "round_timeout": 120},
        "privacy": privacy or {"mode": "none"}, "tracking": {"wandb": wandb}})


def _rows(run, scopes=None):
    return [(r["round"], r["scope"], r["id"], r["metric"], r["value"]) for r in pq.read_table(run / "metrics.parquet").to_pylist()
            if not r["metric"].endswith("_seconds") and (scopes is None or r["scope"] in scopes)]


def _weights(run):
    return load_file(str(run / "last.safetensors"))


@pytest.mark.timeout(400)
def test_zero_noise_and_a_large_clip_is_the_plain_run_bit_for_bit_and_a_killed_dp_run_resumes_exactly(
        phantoms, tmp_path, ray_session):
    from cxrfl_ray.experiment import prepare
    from cxrfl_ray.fl.engine import run_federated

    data = phantoms(n=72, size=32)  # 48 training rows: 16 per client
    plain_cfg = run_config(data, tmp_path, "plain")
    sizes = {c.size for c in prepare(plain_cfg).plan.clients}
    assert len(sizes) == 1, f"the bit-for-bit check needs equal clients (DP weights them equally): {sizes}"
    plain = run_federated(plain_cfg, quiet=True)
    zero = run_federated(run_config(data, tmp_path, "zero", mode="client", noise_multiplier=0.0, clip_norm=1e6), quiet=True)
    plain_w, zero_w = _weights(plain), _weights(zero)
    assert plain_w.keys() == zero_w.keys() and all(torch.equal(plain_w[k], zero_w[k]) for k in plain_w)
    scopes = {"central", "site", "round", "client"}
    zero_rows = [r for r in _rows(zero, scopes) if r[3] != "epsilon"]
    assert zero_rows == _rows(plain, scopes)
    assert json.loads((zero / "summary.json").read_text())["privacy"]["epsilon"] is None  # no noise: no guarantee

    dp = run_config(data, tmp_path, "dp", wandb="offline", mode="client", noise_multiplier=1.0, clip_norm=0.05,
                    adaptive_clip={})
    reference = run_federated(dp, quiet=True)
    (history,) = next((reference / "wandb").glob("offline-run-*")).glob("run-*.wandb")
    assert b"privacy/federation/epsilon" in history.read_bytes() and b"privacy/epsilon" in history.read_bytes()
    privacy = [r for r in _rows(reference) if r[1] == "privacy"]
    eps = {rnd: v for rnd, _, _, m, v in privacy if m == "epsilon"}
    assert list(eps) == [1, 2, 3] and eps[1] < eps[2] < eps[3]
    assert eps[3] == pytest.approx(epsilon(2 / 3, 1.0, 3, 1e-5))
    assert not all(torch.equal(_weights(reference)[k], plain_w[k]) for k in plain_w)
    stopped = stopped_after_round_1(dp, tmp_path / "stopped")
    run_federated(resume=stopped, quiet=True)
    assert _rows(stopped) == _rows(reference)
    resumed, ref = _weights(stopped), _weights(reference)
    assert all(torch.equal(resumed[k], ref[k]) for k in ref)
    summary = json.loads((stopped / "summary.json").read_text())["privacy"]
    assert summary == json.loads((reference / "summary.json").read_text())["privacy"]
    assert summary["mode"] == "client" and summary["epsilon"] == pytest.approx(eps[3]) and summary["rounds_accounted"] == 3


def test_secure_noise_comes_from_the_os_not_the_seed():
    glob = {"w": np.zeros(1000)}
    cfg = _cfg(noise_multiplier=1.0, secure_noise=True)
    (_, a, _), (_, b, _) = (_aggregate(cfg, glob, [{"w": np.zeros(1000)}] * 4) for _ in range(2))
    assert not np.allclose(a["w"], b["w"]) and np.std(a["w"]) == pytest.approx(0.25, rel=0.15)
    with pytest.raises(ConfigError, match="privacy.secure_noise is set but privacy.mode is 'none'"):
        build_config({"privacy": {"secure_noise": True}})


def test_client_level_dp_refuses_batchnorm_unless_it_stays_local():
    """Noise on BatchNorm's running variance makes it negative (a NaN model, seen on the default
    classification preset); FedBN keeps BatchNorm on the clients, so it may."""
    cfg = lambda strategy: build_config({"model": {"name": "resnet18"}, "partition": {"clients": 10},  # noqa: E731
                                         "fl": {"clients_per_round": 4, "strategy": {"name": strategy}},
                                         "privacy": {"mode": "client", "noise_multiplier": 1.0}})
    with pytest.raises(ValueError, match=r"privacy.mode 'client' noises every averaged tensor, BatchNorm's running "
                                         r"variance too.*set model.norm: group, or fl.strategy.name: fedbn"):
        ServerHooks.check(cfg("fedavg"), 10)
    ServerHooks.check(cfg("fedbn"), 10)
