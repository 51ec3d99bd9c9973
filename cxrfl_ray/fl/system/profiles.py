"""Client system profiles: compute speed, bandwidths and availability of every plan client.

Drawn from the config's seed (``system:``), or read from trace files, as flat numpy arrays so a
million clients cost one vectorised draw, not a million objects. Traces:
- ``system.profile_trace``: CSV ``client,speed,up_mbps,down_mbps``, one row per plan client;
- ``system.availability.trace``: CSV ``client,start_s,end_s`` of online intervals (FedScale's
  client behaviour traces in CSV form); a client it does not list follows the cycle (always online
  by default).
A bad trace is refused with the file, the row (its line number, header = line 1) and the column named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    _times: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _keys: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _keyed: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def online(self, t: float, clients: np.ndarray | None = None) -> np.ndarray:
        """Boolean mask: which of ``clients`` (default all) are online at simulated time ``t``."""
        ids = np.arange(self.phase.size) if clients is None else np.asarray(clients)
        up = ((t / self.period + self.phase[ids]) % 1.0) < self.share if self.share < 1 else np.ones(ids.size, bool)
        if self.traced is None:
            return up
        up = up.copy()
        k = np.flatnonzero(self.traced[ids])
        c = ids[k]
        times, keys = self._interval_keys()
        # each traced client's last interval started by t: the last key <= (client, rank of t)
        i = np.searchsorted(keys, c * (times.size + 1) + np.searchsorted(times, t, side="right"), side="right") - 1
        up[k] = (i >= self.indptr[c]) & (t < self.end[np.maximum(i, 0)])
        return up

    def _interval_keys(self) -> tuple[np.ndarray, np.ndarray]:
        """The distinct start times, and one int64 key per interval, client x (distinct starts + 1)
        + the rank of its start + 1: increasing (intervals are sorted by client, then start), so one
        ``searchsorted`` over all intervals finds every client's last interval started by t,
        exactly (integer ranks, no float offsets). Built once, on first use."""
        if self._keys is None or self._keyed is not self.start:
            times, rank = np.unique(self.start, return_inverse=True)
            owner = np.repeat(np.arange(self.indptr.size - 1, dtype=np.int64), np.diff(self.indptr))
            self._times, self._keys, self._keyed = times, owner * (times.size + 1) + rank + 1, self.start
        return self._times, self._keys

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
    """``path``, the columns as arrays (``client`` int64, the others float64) and each row's line
    in the file (the header is line 1; blank lines are skipped but counted), so an error names the
    row a text editor shows."""
    import re

    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path}: no such file")
    try:  # header=None: the header line fixes the field count, so a longer row is the parser's error
        # (pandas would otherwise take a first column as the index); blank lines kept: positions are lines
        frame = pd.read_csv(path, header=None, dtype=str, keep_default_na=False, skip_blank_lines=False,
                            encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise ConfigError(f"{what} {path}: empty file (expected the header {','.join(columns)})") from None
    except Exception as exc:  # pandas' parser errors name the line
        fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if fields:
            raise ConfigError(f"{what} {path}: row {fields[2]} has {fields[3]} fields, expected {fields[1]} "
                              f"({','.join(columns)})") from None
        raise ConfigError(f"{what} {path}: not a CSV file ({exc})") from None
    frame = frame.apply(lambda column: column.str.strip())
    names = frame.iloc[0].tolist()
    if names != list(columns):
        raise ConfigError(f"{what} {path}: columns {names}, expected exactly {','.join(columns)}")
    frame = frame.iloc[1:]
    frame = frame[(frame != "").any(axis=1)]  # blank lines
    lines = frame.index.to_numpy() + 1
    out = {}
    for i, col in enumerate(columns):
        values = frame[i]
        if col == "client":
            ok = values.str.fullmatch(r"\d+")
            if not ok.all():
                row = int(np.flatnonzero(~ok.to_numpy())[0])
                raise ConfigError(f"{what} {path}: row {lines[row]}, client {values.iloc[row]!r} is not a client id "
                                  f"(a whole number >= 0)")
            out[col] = values.astype(np.int64).to_numpy()
            continue
        numbers = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(numbers) | (numbers < 0) | ((numbers == 0) & (col != "start_s"))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            need = "a finite number >= 0" if col == "start_s" else "a finite number > 0"
            raise ConfigError(f"{what} {path}: row {lines[row]}, {col} {values.iloc[row]!r} is not {need}")
        out[col] = numbers
    return path, out, lines


def _known_clients(path: Path, clients: np.ndarray, lines: np.ndarray, num_clients: int, what: str) -> None:
    unknown = clients >= num_clients
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise ConfigError(f"{what} {path}: row {lines[row]}, client {int(clients[row])} is not a plan client "
                          f"(0..{num_clients - 1}); {int(unknown.sum())} row(s) name unknown clients")


def read_profile_trace(path: str | Path, num_clients: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``speed, up_mbps, down_mbps`` per client from a profile trace listing every client once."""
    what = "system.profile_trace"
    path, t, lines = _read_csv(path, PROFILE_COLUMNS, what)
    clients = t["client"]
    _known_clients(path, clients, lines, num_clients, what)
    counts = np.bincount(clients, minlength=num_clients)
    if (counts > 1).any():
        c = int(np.flatnonzero(counts > 1)[0])
        first, second = lines[np.flatnonzero(clients == c)[:2]]
        raise ConfigError(f"{what} {path}: rows {first} and {second} both list client {c} (one row per client)")
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
    path, t, lines = _read_csv(path, AVAILABILITY_COLUMNS, what)
    clients, start, end = t["client"], t["start_s"], t["end_s"]
    _known_clients(path, clients, lines, num_clients, what)
    empty = end <= start
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise ConfigError(f"{what} {path}: row {lines[row]}, client {int(clients[row])}: end_s {end[row]:g} is not "
                          f"after start_s {start[row]:g}")
    order = np.lexsort((start, clients))
    clients, start, end, rows = clients[order], start[order], end[order], lines[order]
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
