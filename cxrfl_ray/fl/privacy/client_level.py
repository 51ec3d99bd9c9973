"""Client-level DP (DP-FedAvg, McMahan et al. 2018), on the server: each client's update (its
weights minus the round's global weights) is clipped to L2 norm C, the clipped updates are
averaged with equal weights, and Gaussian noise of std z * C / K is added to their average
(K: the updates averaged). Optionally the clip adapts (Andrew et al. 2021).

The noise reaches the average through the strategy's own aggregation: the same noise vector is
added to every clipped reply and the replies are weighted equally, so their mean is the clipped
mean plus the noise, and FedAvgM / FedAdam / FedYogi / FedAdagrad take their server step from the
noisy average, as in McMahan et al. Flower's ``DifferentialPrivacyServerSide*Clipping`` wrappers are
not used: they draw unseeded noise, weight by example counts, and return nothing when any client
failed; here the noise comes from (seed, round), failures are counted and the round goes on.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from cxrfl_ray.config import ExperimentConfig
from cxrfl_ray.fl.privacy.accounting import APPROXIMATION, epsilon, noise_for_epsilon
from cxrfl_ray.fl.privacy.base import Aggregate, NoPrivacy

# Strategies whose aggregate is a (weighted) mean of the replies, so clipping bounds each client's
# share and the noise on the mean covers it. Robust ones (median, trimmed mean, Krum, ...) are not
# means: the Gaussian mechanism's sensitivity does not hold for them.
AVERAGING = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "fedbn")
NOISE_TAG = 0x5D9  # keeps the noise stream apart from the other seeded draws of a round


def update_norms(globals_: dict[str, np.ndarray], replies: list[dict[str, np.ndarray]]) -> np.ndarray:
    """L2 norm of each reply's update over its float tensors (float64 sums)."""
    norms = []
    for reply in replies:
        total = 0.0
        for k, w in reply.items():
            if np.issubdtype(w.dtype, np.floating):
                d = w.astype(np.float64) - globals_[k]
                total += float(np.dot(d.ravel(), d.ravel()))
        norms.append(math.sqrt(total))
    return np.asarray(norms)


def update_noise_multiplier(z: float, count_stddev: float | None) -> float:
    """With adaptive clipping part of the privacy budget goes to the noised count: the update's
    noise multiplier is (z^-2 - (2 sigma_b)^-2)^(-1/2) (Andrew et al. 2021, Thm 1), so the pair
    is as private as one Gaussian mechanism with multiplier z."""
    if count_stddev is None or z == 0:
        return z
    rest = z ** -2 - (2 * count_stddev) ** -2
    if rest <= 0:
        raise ValueError(f"privacy.adaptive_clip.count_stddev {count_stddev:g} is too small for noise_multiplier "
                         f"{z:g}: it needs count_stddev > {z / 2:g} (z / 2)")
    return rest ** -0.5


def _private(glob: np.ndarray, weights: np.ndarray, scale: float, noise: np.ndarray | None) -> np.ndarray:
    """One tensor of a reply: the global plus the clipped update, plus the round's noise."""
    if not np.issubdtype(weights.dtype, np.floating):
        return np.ascontiguousarray(weights)
    out = glob + (weights - glob) * weights.dtype.type(scale) if scale < 1.0 else weights.copy()
    if noise is not None:
        out += noise
    return np.ascontiguousarray(out)


def default_count_stddev(per_round: int, z: float) -> float:
    """Andrew et al.'s cohort / 20, but at least z: with a cross-silo cohort of a few sites
    cohort / 20 is below the z / 2 the noise split needs; z costs the update 15% more noise
    (its multiplier 2 z / sqrt(3))."""
    return max(per_round / 20, z)


class ClientLevelDP(NoPrivacy):
    """``privacy.mode: client``."""

    mode = "client"

    def __init__(self, cfg: ExperimentConfig, num_clients: int, per_round: int) -> None:
        super().__init__(cfg, num_clients, per_round)
        p = cfg.privacy
        self.sampling_rate = min(1.0, per_round / num_clients)
        self.noise_multiplier = (p.noise_multiplier if p.noise_multiplier is not None else noise_for_epsilon(
            p.target_epsilon, self.sampling_rate, cfg.fl.rounds, p.delta, p.accountant,
            what=f"fl.rounds {cfg.fl.rounds} (cohort {per_round} of {num_clients} clients)"))
        a = p.adaptive_clip
        self.count_stddev = None if a is None else (a.count_stddev if a.count_stddev is not None
                                                    else default_count_stddev(per_round, self.noise_multiplier))
        self.update_multiplier = update_noise_multiplier(self.noise_multiplier, self.count_stddev)
        self.clip_norm = float(p.clip_norm)  # the next round's clip (adaptive: learned)
        self.steps = 0  # rounds that released a noised average
        self.last: dict[str, float] = {}

    @classmethod
    def check(cls, cfg: ExperimentConfig, num_clients: int, per_round: int) -> None:
        name = cfg.fl.strategy.name
        if name not in AVERAGING:
            raise ValueError(f"privacy.mode 'client' needs a strategy that averages the updates "
                             f"({', '.join(AVERAGING)}); fl.strategy.name {name!r} does not, so clipping and "
                             f"noise would not bound what one client changes")
        cls(cfg, num_clients, per_round)  # target_epsilon solvable, adaptive noise split possible

    def aggregate(self, server_round: int, arrays: ArrayRecord, replies: list[Message], aggregate: Aggregate):
        from cxrfl_ray.fl.client import _npy_view, tensors_record

        glob = {k: _npy_view(v) for k, v in arrays.items()}
        weights = [{k: _npy_view(v) for k, v in r.content["arrays"].items()} for r in replies]
        norms = update_norms(glob, weights)
        clip, k = self.clip_norm, len(replies)
        std = self.update_multiplier * clip / k
        rng = np.random.default_rng([self.cfg.seed, NOISE_TAG, server_round])
        keys = sorted(k_ for k_, w in weights[0].items() if np.issubdtype(w.dtype, np.floating))
        noise = {key: rng.normal(0.0, std, size=weights[0][key].shape).astype(weights[0][key].dtype)
                 for key in keys} if std > 0 else {}
        private = []
        for reply, w, norm in zip(replies, weights, norms):
            scale = clip / norm if norm > clip else 1.0
            content = RecordDict(dict(reply.content))
            if scale < 1.0 or noise:  # untouched otherwise: z = 0 with a large clip is the plain run, bit for bit
                content["arrays"] = tensors_record({key: torch.from_numpy(_private(glob[key], v, scale, noise.get(key)))
                                                    for key, v in w.items()})
            metrics = MetricRecord(dict(reply.content["metrics"]))
            metrics["num-examples"] = 1  # equal weights: the sensitivity of the mean is C / K
            content["metrics"] = metrics
            twin = copy.copy(reply)  # the reply itself keeps its own record (client metrics are logged from it)
            twin.content = content
            private.append(twin)
        result = aggregate(private)
        unclipped = int((norms <= clip).sum())
        self.last = {"clip_norm": clip, "clipped_share": 1 - unclipped / k, "update_norm_median": float(np.median(norms)),
                     "noise_std": std}
        if self.count_stddev is not None:
            a = self.cfg.privacy.adaptive_clip
            noisy = (unclipped + rng.normal(0.0, self.count_stddev)) / k
            self.clip_norm = clip * math.exp(-a.clip_lr * (noisy - a.target_quantile))
        self.steps += 1
        return result

    def account(self, server_round: int, replies: list[Message]) -> dict[str, dict[str, float]]:
        p = self.cfg.privacy
        eps = epsilon(self.sampling_rate, self.noise_multiplier, self.steps, p.delta, p.accountant)
        return {"federation": {"epsilon": eps, "delta": p.delta, "noise_multiplier": self.noise_multiplier,
                               "steps": self.steps, **self.last}}

    def summary(self) -> dict[str, Any]:
        p = self.cfg.privacy
        eps = epsilon(self.sampling_rate, self.noise_multiplier, self.steps, p.delta, p.accountant)
        return {"mode": self.mode, "epsilon": eps, "delta": p.delta, "accountant": p.accountant,
                "noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm,
                "adaptive_clip": p.adaptive_clip is not None, "rounds_accounted": self.steps,
                "sampling": {"unit": "client", "rate": self.sampling_rate, "drawn": "fixed-size cohort"},
                "approximation": APPROXIMATION}

    def state(self) -> dict[str, np.ndarray]:
        return {"clip_norm": np.asarray([self.clip_norm], np.float64), "steps": np.asarray([self.steps], np.int64)}

    def restore(self, tensors: dict[str, np.ndarray]) -> None:
        self.clip_norm, self.steps = float(tensors["clip_norm"][0]), int(tensors["steps"][0])
