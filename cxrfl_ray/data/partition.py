"""Clients are plans over rows: which dataset rows each virtual client trains on.

A plan never copies images. Every scheme partitions *patients* (so no patient's images land
with two clients), draws all randomness from ``seed``, and leaves held-out sites and the
val/test splits out of the training pool for central evaluation.

Why not flwr-datasets' partitioners: they split rows, not patients, and their retry loops for
a minimum partition size do not scale to 10,000 clients; these are vectorised numpy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxrfl_ray.data.store import StoredDataset

PLAN_FORMAT = "cxrfl-plan"
PLAN_VERSION = 1


class PartitionError(ValueError):
    """A partition request that cannot be met (the message names the parameter)."""


@dataclass
class Plan:
    """Client id -> row ids, plus the rows kept out of training for evaluation."""

    scheme: str
    num_clients: int
    seed: int
    params: dict[str, Any]
    clients: list[np.ndarray]
    central: dict[str, np.ndarray]  # split name -> rows of non-held-out sites
    holdout: dict[str, np.ndarray]  # held-out site -> all of its rows
    dataset: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "dataset": self.dataset,
            "scheme": self.scheme,
            "num_clients": self.num_clients,
            "seed": self.seed,
            "params": self.params,
            "clients": {str(i): ids.tolist() for i, ids in enumerate(self.clients)},
            "central": {k: v.tolist() for k, v in self.central.items()},
            "holdout": {k: v.tolist() for k, v in self.holdout.items()},
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), separators=(",", ":")))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        data = json.loads(Path(path).read_text())
        if data.get("format") != PLAN_FORMAT:
            raise PartitionError(f"{path} is not a cxrfl plan (format={data.get('format')!r})")
        as_ids = lambda xs: np.asarray(xs, dtype=np.int64)  # noqa: E731
        n = data["num_clients"]
        return cls(
            scheme=data["scheme"],
            num_clients=n,
            seed=data["seed"],
            params=data["params"],
            clients=[as_ids(data["clients"][str(i)]) for i in range(n)],
            central={k: as_ids(v) for k, v in data["central"].items()},
            holdout={k: as_ids(v) for k, v in data["holdout"].items()},
            dataset=data.get("dataset", {}),
        )

    def counts(self, metadata: pa.Table, label_names: Sequence[str]) -> list[dict[str, Any]]:
        """Per-client rows, patients, and counts per label and site (the table we print)."""
        labels = metadata.column("label").to_numpy()
        sites = metadata.column("site").to_numpy(zero_copy_only=False)
        patients = metadata.column("patient_id").to_numpy(zero_copy_only=False)
        names = {i: n for i, n in enumerate(label_names)}
        out = []
        for cid, ids in enumerate(self.clients):
            lab = np.bincount(labels[ids] + 1, minlength=len(label_names) + 1)
            site_names, site_counts = np.unique(sites[ids], return_counts=True)
            row: dict[str, Any] = {"client": cid, "rows": int(ids.size), "patients": int(np.unique(patients[ids]).size)}
            row.update({names[k]: int(lab[k + 1]) for k in range(len(label_names))})
            if lab[0]:
                row["unlabelled"] = int(lab[0])
            row["sites"] = {str(s): int(c) for s, c in zip(site_names, site_counts)}
            out.append(row)
        return out


# -- schemes: each maps units (patients) to clients ------------------------------------------
# A scheme gets the units' labels and sites, the number of clients and a seeded generator, and
# returns the client of every unit.

SchemeFn = Callable[..., np.ndarray]


def partition_iid(unit_labels: np.ndarray, num_clients: int, rng: np.random.Generator, **_: Any) -> np.ndarray:
    """The paper's split: round-robin over units in label order (shuffled within a label)."""
    order = rng.permutation(unit_labels.size)
    order = order[np.argsort(unit_labels[order], kind="stable")]
    client = np.empty(unit_labels.size, dtype=np.int64)
    client[order] = np.arange(unit_labels.size) % num_clients
    return client


def partition_dirichlet(
    unit_labels: np.ndarray, num_clients: int, rng: np.random.Generator, *, alpha: float = 0.5,
    min_size: int = 1, **_: Any,
) -> np.ndarray:
    """Label skew: each label's units are split over clients by proportions ~ Dir(alpha)."""
    if not alpha > 0:
        raise PartitionError(f"dirichlet alpha must be > 0, got {alpha}")
    client = np.empty(unit_labels.size, dtype=np.int64)
    for label in np.unique(unit_labels):
        units = rng.permutation(np.flatnonzero(unit_labels == label))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.floor(np.cumsum(shares)[:-1] * units.size).astype(np.int64)
        client[units] = np.repeat(np.arange(num_clients), np.diff(np.concatenate([[0], cuts, [units.size]])))
    return _ensure_min_size(client, num_clients, min_size, rng)


def partition_quantity(
    unit_labels: np.ndarray, num_clients: int, rng: np.random.Generator, *, power: float = 1.0,
    min_size: int = 1, **_: Any,
) -> np.ndarray:
    """Size skew: client sizes follow a power law (client of rank r gets ~ r^-power)."""
    if not power >= 0:
        raise PartitionError(f"quantity power must be >= 0, got {power}")
    n = unit_labels.size
    if n < num_clients * min_size:
        raise PartitionError(f"{n} patients cannot give {num_clients} clients {min_size} each (min_size)")
    weights = rng.permutation((np.arange(num_clients) + 1.0) ** -power)
    spare = n - num_clients * min_size
    sizes = min_size + np.floor(weights / weights.sum() * spare).astype(np.int64)
    remainder = n - sizes.sum()
    sizes[np.argsort(-weights, kind="stable")[:remainder]] += 1
    client = np.empty(n, dtype=np.int64)
    client[rng.permutation(n)] = np.repeat(np.arange(num_clients), sizes)
    return client


def partition_site(
    unit_labels: np.ndarray, num_clients: int, rng: np.random.Generator, *, unit_sites: np.ndarray,
    **_: Any,
) -> np.ndarray:
    """One client per site, or each site split IID into clients in proportion to its size."""
    sites, site_of_unit, site_sizes = np.unique(unit_sites, return_inverse=True, return_counts=True)
    if num_clients < sites.size:
        raise PartitionError(
            f"scheme 'site' needs at least one client per site: {num_clients} clients < {sites.size} sites"
        )
    per_site = _largest_remainder(site_sizes, num_clients)
    client = np.empty(unit_labels.size, dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(per_site)[:-1]])
    for s in range(sites.size):
        units = np.flatnonzero(site_of_unit == s)
        if units.size < per_site[s]:
            raise PartitionError(f"site {sites[s]!r} has {units.size} patients for {per_site[s]} clients")
        local = partition_iid(unit_labels[units], int(per_site[s]), rng)
        client[units] = first[s] + local
    return client


SCHEMES: dict[str, SchemeFn] = {
    "iid": partition_iid,
    "dirichlet": partition_dirichlet,
    "quantity": partition_quantity,
    "site": partition_site,
}


def _largest_remainder(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` into integer parts proportional to ``sizes``, each at least 1."""
    k = sizes.size
    spare = total - k
    quota = sizes / sizes.sum() * spare
    parts = 1 + np.floor(quota).astype(np.int64)
    left = total - parts.sum()
    parts[np.argsort(-(quota - np.floor(quota)), kind="stable")[:left]] += 1
    return parts


def _ensure_min_size(client: np.ndarray, num_clients: int, min_size: int, rng: np.random.Generator) -> np.ndarray:
    """Give clients below ``min_size`` units taken from the largest clients (deterministic)."""
    if min_size <= 0:
        return client
    if client.size < num_clients * min_size:
        raise PartitionError(f"{client.size} patients cannot give {num_clients} clients {min_size} each (min_size)")
    sizes = np.bincount(client, minlength=num_clients)
    for c in np.flatnonzero(sizes < min_size):
        while sizes[c] < min_size:
            donor = int(np.argmax(sizes))
            candidates = np.flatnonzero(client == donor)
            unit = candidates[rng.integers(candidates.size)]
            client[unit] = c
            sizes[donor] -= 1
            sizes[c] += 1
    return client


# -- planning -----------------------------------------------------------------------------------

def plan_partition(
    dataset: StoredDataset | pa.Table,
    scheme: str,
    num_clients: int,
    seed: int = 0,
    *,
    holdout_sites: Sequence[str] = (),
    train_splits: Sequence[str] = ("train",),
    **scheme_args: Any,
) -> Plan:
    """Plan ``num_clients`` clients over the training rows of ``dataset``.

    Parameters
    ----------
    dataset : a stored dataset or its metadata table.
    scheme : ``iid`` | ``dirichlet`` (``alpha``) | ``quantity`` (``power``) | ``site``.
    num_clients : number of virtual clients.
    seed : the only source of randomness.
    holdout_sites : sites that never train (evaluated separately).
    train_splits : splits that form the training pool; the others stay central.
    scheme_args : ``alpha``, ``power``, ``min_size`` (units per client, default 1).
    """
    if scheme not in SCHEMES:
        raise PartitionError(f"unknown scheme {scheme!r}; choose from {sorted(SCHEMES)}")
    if num_clients < 1:
        raise PartitionError(f"clients must be >= 1, got {num_clients}")
    meta = dataset.metadata if isinstance(dataset, StoredDataset) else dataset
    site = meta.column("site")
    known_sites = sorted(set(pc.unique(site).to_pylist()))
    unknown = sorted(set(holdout_sites) - set(known_sites))
    if unknown:
        raise PartitionError(f"unknown holdout site(s) {unknown}; the dataset's sites are {known_sites}")
    held = pc.is_in(site, value_set=pa.array(list(holdout_sites), type=pa.string())).to_numpy(zero_copy_only=False)
    split = meta.column("split")
    in_train = pc.is_in(split, value_set=pa.array(list(train_splits), type=pa.string())).to_numpy(zero_copy_only=False)
    pool = np.flatnonzero(in_train & ~held)
    if pool.size == 0:
        raise PartitionError(f"no training rows: no row has split in {list(train_splits)} outside held-out sites")

    # Units are patients: dictionary-encode patient ids of the pool rows.
    encoded = pc.dictionary_encode(meta.column("patient_id").take(pa.array(pool))).combine_chunks()
    unit_of_row = encoded.indices.to_numpy().astype(np.int64)
    num_units = len(encoded.dictionary)
    if num_clients > num_units:
        raise PartitionError(
            f"more clients ({num_clients}) than patients ({num_units}) in the training pool; "
            "every client needs at least one patient"
        )
    first_row = np.full(num_units, pool.size, dtype=np.int64)
    np.minimum.at(first_row, unit_of_row, np.arange(pool.size))
    labels = meta.column("label").to_numpy()[pool]
    sites = site.to_numpy(zero_copy_only=False)[pool]
    rng = np.random.default_rng(seed)
    client_of_unit = SCHEMES[scheme](
        labels[first_row], num_clients, rng, unit_sites=sites[first_row], **scheme_args
    )
    client_of_row = client_of_unit[unit_of_row]
    order = np.argsort(client_of_row, kind="stable")
    bounds = np.searchsorted(client_of_row[order], np.arange(num_clients + 1))
    clients = [np.sort(pool[order[bounds[i]:bounds[i + 1]]]) for i in range(num_clients)]

    plan = evaluation_plan(dataset, seed, holdout_sites=holdout_sites, train_splits=train_splits)
    plan.scheme, plan.num_clients, plan.clients = scheme, num_clients, clients
    plan.params.update(scheme_args)
    return plan


def evaluation_plan(dataset: StoredDataset | pa.Table, seed: int = 0, *, holdout_sites: Sequence[str] = (),
                    train_splits: Sequence[str] = ("train",)) -> Plan:
    """A plan without clients: only the rows kept for evaluation (central splits, held-out sites).
    The server of a real federation has no clients' rows, and may hold no training rows at all."""
    meta = dataset.metadata if isinstance(dataset, StoredDataset) else dataset
    site = meta.column("site").to_numpy(zero_copy_only=False)
    held = np.isin(site, list(holdout_sites))
    splits = meta.column("split").to_numpy(zero_copy_only=False)
    central = {s: np.flatnonzero((splits == s) & ~held) for s in ("train", "val", "test") if s not in train_splits}
    holdout = {s: np.flatnonzero(site == s) for s in holdout_sites}
    dataset_info = {}
    if isinstance(dataset, StoredDataset):
        dataset_info = {"path": str(dataset.path), "name": dataset.card.get("name"), "num_rows": dataset.num_rows}
    params = {"holdout_sites": list(holdout_sites), "train_splits": list(train_splits)}
    return Plan("none", 0, seed, params, [], central, holdout, dataset_info)


def format_counts(rows: list[dict[str, Any]], label_names: Sequence[str], limit: int = 20) -> str:
    """A plain-text table of per-client counts (first ``limit`` clients, then a summary)."""
    cols = ["client", "rows", "patients", *label_names]
    widths = [max(len(c), 6) for c in cols]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths)) + "  sites"]
    for r in rows[:limit]:
        sites = ", ".join(f"{k}:{v}" for k, v in list(r["sites"].items())[:4])
        lines.append("  ".join(str(r.get(c, 0)).rjust(w) for c, w in zip(cols, widths)) + f"  {sites}")
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more clients")
    sizes = np.asarray([r["rows"] for r in rows])
    lines.append(
        f"{len(rows)} clients; rows per client min {sizes.min()} median {np.median(sizes):g} max {sizes.max()}"
    )
    return "\n".join(lines)
