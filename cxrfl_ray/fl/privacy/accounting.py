"""Epsilon by dp-accounting (Google's well-kept accountants), never by hand.

One mechanism serves both modes: the Poisson-subsampled Gaussian, composed once per step.
- client level: a step is a round, q = cohort / clients, z the noise multiplier of the average;
- sample level: a step is one DP-SGD step of a client, q = batch size / the client's rows.

Both draw fixed-size batches (a cohort of K clients; a shuffled batch of B rows), not Poisson
samples, so the epsilon reported is that of Poisson sampling at the same rate: the approximation
McMahan et al. (2018) and Abadi et al. (2016) make, stated in every run's summary.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Literal

Accountant = Literal["rdp", "pld"]
APPROXIMATION = ("Poisson subsampling at rate q stands for the fixed-size draw (a cohort of K of N clients, "
                 "or a shuffled batch of B of n rows): the usual approximation of DP-FedAvg and DP-SGD")
MAX_NOISE_MULTIPLIER = 1000.0  # the search range of target_epsilon; more noise than this learns nothing


class _QuietAbsl:
    """dp-accounting's RDP logs a warning per order it drops while converging; they say nothing to a user."""

    def __enter__(self) -> None:
        self.log = logging.getLogger("absl")
        self.level = self.log.level
        self.log.setLevel(logging.ERROR)

    def __exit__(self, *exc) -> None:
        self.log.setLevel(self.level)


def dp_event(sampling_rate: float, noise_multiplier: float, steps: int):
    """``steps`` compositions of the Gaussian mechanism with Poisson sampling at ``sampling_rate``."""
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    step = gaussian if sampling_rate >= 1 else dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)
    return dp_accounting.SelfComposedDpEvent(step, steps)


def make_accountant(name: Accountant):
    from dp_accounting import pld, rdp

    return {"rdp": rdp.RdpAccountant, "pld": pld.PLDAccountant}[name]()


@functools.lru_cache(maxsize=4096)
def epsilon(sampling_rate: float, noise_multiplier: float, steps: int, delta: float,
            accountant: Accountant = "rdp") -> float:
    """Epsilon at ``delta`` after ``steps`` steps (0 before any; inf without noise)."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    acc = make_accountant(accountant)
    with _QuietAbsl():
        acc.compose(dp_event(min(1.0, sampling_rate), noise_multiplier, int(steps)))
        return float(acc.get_epsilon(delta))


class EpsilonUnreachable(ValueError):
    """``privacy.target_epsilon`` below what the planned steps reach with the most noise searched."""


def noise_for_epsilon(target_epsilon: float, sampling_rate: float, steps: int, delta: float,
                      accountant: Accountant = "rdp", what: str = "the planned rounds") -> float:
    """The smallest noise multiplier whose epsilon after ``steps`` is at most ``target_epsilon``."""
    import dp_accounting

    smallest = epsilon(sampling_rate, MAX_NOISE_MULTIPLIER, steps, delta, accountant)
    if smallest > target_epsilon:
        raise EpsilonUnreachable(
            f"privacy.target_epsilon {target_epsilon:g} cannot be met over {what}: the smallest reachable epsilon "
            f"(noise_multiplier {MAX_NOISE_MULTIPLIER:g}, delta {delta:g}) is {smallest:.4g}")
    with _QuietAbsl():
        z = dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant(accountant), lambda z: dp_event(min(1.0, sampling_rate), z, steps),
            target_epsilon, delta, bracket_interval=dp_accounting.ExplicitBracketInterval(1e-3, MAX_NOISE_MULTIPLIER),
            tol=1e-4)
    return float(z)
