"""Client-level DP (DP-FedAvg, McMahan et al. 2018), on the server: each client's update (its
weights minus the round's global weights) is clipped to L2 norm C, the clipped updates are
averaged with equal weights, and Gaussian noise of std z * C / K is added to their average
(K: the updates averaged). Optionally the clip adapts (Andrew et al. 2021).

The noise reaches the average through the strategy's own aggregation: the strategy is handed the
clipped, noised mean as one reply (its mean of one reply is that reply), so FedAvgM / FedAdam /
FedYogi / FedAdagrad take their server step from the noisy average, as in McMahan et al. Flower's ``DifferentialPrivacyServerSide*Clipping`` wrappers are
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


def default_count_stddev(per_round: int, z: float) -> float:
    """Andrew et al.'s cohort / 20, but at least z: with a cross-silo cohort of a few sites
    cohort / 20 is below the z / 2 the noise split needs; z costs the update 15% more noise
    (its multiplier 2 z / sqrt(3))."""
    return max(per_round / 20, z)


def _equal_weight(reply: Message, content: RecordDict) -> Message:
    """A twin of ``reply`` with ``content`` and weight 1 (the reply itself keeps its record: the
    client's metrics are logged from it)."""
    content = RecordDict(dict(content))
    metrics = MetricRecord(dict(reply.content["metrics"]))
    metrics["num-examples"] = 1  # equal weights: the sensitivity of the mean is C / K
    content["metrics"] = metrics
    twin = copy.copy(reply)
    twin.content = content
    return twin


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
        if name != "fedbn" and cfg.model.norm == "batch":
            from cxrfl_ray.fl.algorithms.fedbn import batchnorm_keys
            from cxrfl_ray.fl.algorithms.base import model_skeleton

            if batchnorm_keys(model_skeleton(cfg)):
                raise ValueError("privacy.mode 'client' noises every averaged tensor, BatchNorm's running variance "
                                 "too, which then goes negative (and its statistics are data the clip does not "
                                 "bound): set model.norm: group, or fl.strategy.name: fedbn (BatchNorm stays local)")
        cls(cfg, num_clients, per_round)  # target_epsilon solvable, adaptive noise split possible

    def aggregate(self, server_round: int, arrays: ArrayRecord, replies: list[Message], aggregate: Aggregate):
        """Clip each update, average them with equal weights, add the noise; the strategy gets
        that noised mean as one reply (its own mean of one reply is that reply, so FedAvgM /
        FedAdam / ... take their server step from it). With nothing clipped and no noise the
        replies go on as they are, weighted equally: z = 0 with a large clip is the plain run."""
        from cxrfl_ray.fl.arrays import raw_record, views

        glob = views(arrays)
        clip, k = self.clip_norm, len(replies)
        std = self.update_multiplier * clip / k
        rng = np.random.default_rng(None if self.cfg.privacy.secure_noise else [self.cfg.seed, NOISE_TAG, server_round])
        total: dict[str, np.ndarray] = {}  # the sum of the clipped updates / K, per float tensor
        buffer: dict[str, np.ndarray] = {}
        norms, others = [], []
        for reply in replies:
            w = views(reply.content["arrays"])
            updates, squares = {}, 0.0
            for key, v in w.items():
                if np.issubdtype(v.dtype, np.floating):
                    d = np.subtract(v, glob[key], out=buffer.setdefault(key, np.empty_like(v)))
                    squares += float(np.square(d).sum(dtype=np.float64))  # pairwise sum: ~1e-7 relative
                    updates[key] = d
            norm = math.sqrt(squares)
            norms.append(norm)
            factor = (clip / norm if norm > clip else 1.0) / k
            for key, d in updates.items():
                d *= d.dtype.type(factor)
                if key in total:
                    total[key] += d
                else:
                    total[key] = d.copy()
            others.append({key: v for key, v in w.items() if key not in updates})
        norms = np.asarray(norms)
        if std == 0 and (norms <= clip).all():
            result = aggregate([_equal_weight(r, r.content) for r in replies])
        else:
            mean = {}
            for key in sorted(total):  # a fixed order: the noise stream does not depend on the replies' order
                mean[key] = glob[key] + total[key]
                if std > 0:
                    mean[key] += rng.standard_normal(mean[key].shape, dtype=np.float32).astype(mean[key].dtype) \
                        * mean[key].dtype.type(std)
            for key in others[0]:  # integer buffers: their plain mean
                mean[key] = np.mean([o[key] for o in others], axis=0).astype(others[0][key].dtype)
            content = RecordDict(dict(replies[0].content))
            content["arrays"] = raw_record({key: torch.from_numpy(np.ascontiguousarray(mean[key]))
                                                for key in replies[0].content["arrays"].keys()})
            one = _equal_weight(replies[0], content)
            one.content["metrics"]["train_loss"] = float(np.mean([float(r.content["metrics"]["train_loss"])
                                                                   for r in replies]))
            result = aggregate([one])
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
