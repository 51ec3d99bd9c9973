"""Client system profiles: compute speed, bandwidths and availability of every plan client.

Drawn from the config's seed (``system:``), or read from trace files, as flat numpy arrays so a
million clients cost one vectorised draw, not a million objects. Traces:
- ``system.profile_trace``: CSV ``client,speed,up_mbps,down_mbps``, one row per plan client;
- ``system.availability.trace``: CSV ``client,start_s,end_s`` of online intervals (FedScale's
  client behaviour traces in CSV form); a client it does not list is always online.
A bad trace is refused with the file, the row and the column named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrfl_ray.config import ConfigError, SystemConfig

PROFILE_COLUMNS = ("client", "speed", "up_mbps", "down_mbps")
AVAILABILITY_COLUMNS = ("client", "start_s", "end_s")
PROFILE_TAG, PHASE_TAG = 0x5E1, 0x5E2  # keep these draws apart from the run's other seeded streams


@dataclass
class Availability:
    """Who is online when: a cycle (``share`` of every ``period`` from each client's ``phase``), and
    for traced clients their sorted intervals (``indptr`` into ``start``/``end``, CSR-style)."""

    share: float
    period: float
    phase: np.ndarray  # [N] in [0, 1)
    traced: np.ndarray | None = None  # [N] bool: the trace lists the client
    indptr: np.ndarray | None = None  # [N + 1]
    start: np.ndarray | None = None
    end: np.ndarray | None = None

    def online(self, t: float, clients: np.ndarray | None = None) -> np.ndarray:
        """Boolean mask: which of ``clients`` (default all) are online at simulated time ``t``."""
        ids = np.arange(self.phase.size) if clients is None else np.asarray(clients)
        up = ((t / self.period + self.phase[ids]) % 1.0) < self.share if self.share < 1 else np.ones(ids.size, bool)
        if self.traced is None:
            return up
        up = up.copy()
        for k in np.flatnonzero(self.traced[ids]):
            c = ids[k]
            lo, hi = self.indptr[c], self.indptr[c + 1]
            i = np.searchsorted(self.start[lo:hi], t, side="right") - 1  # the last interval started by t
            up[k] = i >= 0 and t < self.end[lo + i]
        return up


    def next_online(self, t: float) -> float:
        """The first time after ``t`` at which some client comes online (inf: none ever does): a
        round that finds everyone offline waits until then instead of spinning on the same instant."""
        times = []
        untraced = ~self.traced if self.traced is not None else np.ones(self.phase.size, bool)
        if self.share < 1 and untraced.any():
            frac = (t / self.period + self.phase[untraced]) % 1.0  # offline clients: frac >= share
            times.append(t + (float((1.0 - frac).min()) + 1e-9) * self.period)  # the next cycle's start
        if self.start is not None:
            later = self.start[self.start > t]
            if later.size:
                times.append(float(later.min()))
        return min(times) if times else float("inf")


@dataclass
class Profiles:
    """Per plan client: time factor of its compute (1: the reference), up/downlink in Mbit/s."""

    speed: np.ndarray
    up_mbps: np.ndarray
    down_mbps: np.ndarray
    availability: Availability

    @property
    def num_clients(self) -> int:
        return self.speed.size


def draw_profiles(system: SystemConfig, num_clients: int, seed: int) -> Profiles:
    """The config's profiles for ``num_clients`` clients: seeded draws, or the traces."""
    rng = np.random.default_rng([seed, PROFILE_TAG])
    s = system.speed
    if s.distribution == "lognormal":
        speed = rng.lognormal(0.0, s.sigma, num_clients)
    elif s.distribution == "two_speed":
        slow = rng.permutation(num_clients) < round(s.slow_share * num_clients)  # exactly that share
        speed = np.where(slow, s.slow_factor, 1.0)
    else:
        speed = np.ones(num_clients)
    spread = (lambda: rng.lognormal(0.0, system.bandwidth_sigma, num_clients)) if system.bandwidth_sigma > 0 \
        else (lambda: np.ones(num_clients))
    up, down = system.up_mbps * spread(), system.down_mbps * spread()
    if system.profile_trace:
        speed, up, down = read_profile_trace(system.profile_trace, num_clients)
    a = system.availability
    phase = np.random.default_rng([seed, PHASE_TAG]).random(num_clients)
    availability = Availability(a.online_share, a.period_s, phase)
    if a.trace:
        availability.traced, availability.indptr, availability.start, availability.end = \
            read_availability_trace(a.trace, num_clients)
    return Profiles(speed.astype(np.float64), up.astype(np.float64), down.astype(np.float64), availability)


def _read_csv(path: str | Path, columns: tuple[str, ...], what: str):
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path}: no such file")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas' parser errors name the line
        raise ConfigError(f"{what} {path}: not a CSV file ({exc})") from None
    names = [c.strip() for c in frame.columns]
    if names != list(columns):
        raise ConfigError(f"{what} {path}: columns {names}, expected exactly {','.join(columns)}")
    frame.columns = names
    out = {}
    for col in columns:
        values = frame[col].str.strip()
        if col == "client":
            ok = values.str.fullmatch(r"\d+")
            if not ok.all():
                row = int(np.flatnonzero(~ok.to_numpy())[0])
                raise ConfigError(f"{what} {path}: row {row + 2}, client {values.iloc[row]!r} is not a client id "
                                  f"(a whole number >= 0)")
            out[col] = values.astype(np.int64).to_numpy()
            continue
        numbers = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(numbers) | (numbers < 0) | ((numbers == 0) & (col != "start_s"))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            need = "a finite number >= 0" if col == "start_s" else "a finite number > 0"
            raise ConfigError(f"{what} {path}: row {row + 2}, {col} {values.iloc[row]!r} is not {need}")
        out[col] = numbers
    return path, out


def _known_clients(path: Path, clients: np.ndarray, num_clients: int, what: str) -> None:
    unknown = clients >= num_clients
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise ConfigError(f"{what} {path}: row {row + 2}, client {int(clients[row])} is not a plan client "
                          f"(0..{num_clients - 1}); {int(unknown.sum())} row(s) name unknown clients")


def read_profile_trace(path: str | Path, num_clients: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``speed, up_mbps, down_mbps`` per client from a profile trace listing every client once."""
    what = "system.profile_trace"
    path, t = _read_csv(path, PROFILE_COLUMNS, what)
    clients = t["client"]
    _known_clients(path, clients, num_clients, what)
    counts = np.bincount(clients, minlength=num_clients)
    if (counts > 1).any():
        c = int(np.flatnonzero(counts > 1)[0])
        raise ConfigError(f"{what} {path}: client {c} is listed {int(counts[c])} times (once each)")
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0)
        raise ConfigError(f"{what} {path}: {missing.size} plan client(s) have no row, e.g. "
                          f"{', '.join(map(str, missing[:5]))} (one row per client 0..{num_clients - 1})")
    order = np.argsort(clients)
    return t["speed"][order], t["up_mbps"][order], t["down_mbps"][order]


def read_availability_trace(path: str | Path, num_clients: int):
    """``traced, indptr, start, end``: each listed client's online intervals, sorted; overlapping
    intervals of one client are an error (they say the trace was merged wrongly)."""
    what = "system.availability.trace"
    path, t = _read_csv(path, AVAILABILITY_COLUMNS, what)
    clients, start, end = t["client"], t["start_s"], t["end_s"]
    _known_clients(path, clients, num_clients, what)
    empty = end <= start
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise ConfigError(f"{what} {path}: row {row + 2}, client {int(clients[row])}: end_s {end[row]:g} is not after "
                          f"start_s {start[row]:g}")
    order = np.lexsort((start, clients))
    clients, start, end, rows = clients[order], start[order], end[order], order + 2
    same = clients[1:] == clients[:-1]
    overlap = same & (start[1:] < end[:-1])
    if overlap.any():
        i = int(np.flatnonzero(overlap)[0])
        raise ConfigError(f"{what} {path}: client {int(clients[i])}: rows {rows[i]} and {rows[i + 1]} overlap "
                          f"([{start[i]:g}, {end[i]:g}) and [{start[i + 1]:g}, {end[i + 1]:g}))")
    counts = np.bincount(clients, minlength=num_clients)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    return counts > 0, indptr, start, end


def transfer_seconds(num_bytes: float | np.ndarray, mbps: np.ndarray) -> np.ndarray:
    """Seconds to move ``num_bytes`` at ``mbps`` megabits per second."""
    return np.asarray(num_bytes, np.float64) * 8 / (mbps * 1e6)


__all__ = ["Availability", "Profiles", "draw_profiles", "read_availability_trace", "read_profile_trace",
           "transfer_seconds"]
