"""Flower strategies by name, made reproducible.

Flower samples clients with its own randomness and aggregates replies in arrival order, so two
identical runs differ. ``Seeded`` (a mixin placed before the Flower strategy) picks the round's
clients from the config's seed, tells each message which plan client to train, and aggregates
replies sorted by client id. Everything else (FedAdam's moments, FedProx's mu ...) is Flower's.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (Bulyan, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx,
                                     FedTrimmedAvg, FedYogi, Krum, MultiKrum, QFedAvg)
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from cxrfl_ray.fl.averaging import packed_average

# The Flower strategy that aggregates under each name. fedbn, scaffold and fednova are FedAvg's
# averaging with an algorithm's hooks around it (fl/algorithms); fedprox's hooks add the proximal term.
STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg, "fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad,
    "fedprox": FedProx, "fedavgm": FedAvgM, "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg, "krum": Krum, "multikrum": MultiKrum, "bulyan": Bulyan, "qfedavg": QFedAvg,
    "fedbn": FedAvg, "scaffold": FedAvg, "fednova": FedAvg,
}
CLIENT_KEY = "cid"  # which plan client a message is for, and a reply is from


def select_clients(num_clients: int, per_round: int, seed: int, server_round: int) -> list[int]:
    """The plan clients that train in ``server_round``: a pure function of the seed."""
    rng = np.random.default_rng([seed, 7, server_round])
    return sorted(rng.choice(num_clients, size=per_round, replace=False).tolist())


class _Nodes:
    """A view of the grid that offers exactly the chosen nodes (so the strategy takes them all)."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, nodes

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def reply_client(message: Message) -> int:
    """The plan client a reply is from (errors carry none: they sort last)."""
    if message.has_error():
        return 1 << 62
    return int(message.content["metrics"][CLIENT_KEY])


class Seeded:
    """Seeded client selection and ordered aggregation for any FedAvg-family strategy."""

    num_clients: int
    per_round: int
    seed: int
    sites: bool  # a real federation: client i is the i-th connected node (the data is on the node)

    def _route(self, grid: Grid, clients: list[int]) -> _Nodes:
        nodes = sorted(grid.get_node_ids())
        if self.sites:
            if len(nodes) < self.num_clients:
                raise RuntimeError(f"{len(nodes)} SuperNodes connected for {self.num_clients} sites")
            chosen = [nodes[c] for c in clients]
        else:
            if len(nodes) < len(clients):
                raise RuntimeError(f"{len(nodes)} nodes for {len(clients)} clients")
            chosen = nodes[: len(clients)]  # any virtual node can play any plan client: the message says which
        self._assignment = dict(zip(chosen, clients))
        return _Nodes(grid, chosen)

    def configure_train(self, server_round: int, arrays, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        clients = self.round_cohort if self.round_cohort is not None else \
            select_clients(self.num_clients, self.per_round, self.seed, server_round)
        self.last_selection = clients
        return super().configure_train(server_round, arrays, config, self._route(grid, clients))

    def configure_evaluate(self, server_round: int, arrays, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        clients = self.last_selection
        return super().configure_evaluate(server_round, arrays, config, self._route(grid, clients))

    def _construct_messages(self, record: RecordDict, node_ids: list[int], message_type: str) -> Iterable[Message]:
        """One message per node, for its plan client; training messages also carry the algorithm's
        records of the round and the client's own config (``round_extras``)."""
        records, per_client = self.round_extras if message_type == MessageType.TRAIN else ({}, None)
        messages = []
        for node in sorted(node_ids):
            cid = self._assignment[node]
            config = ConfigRecord({**dict(record[self.configrecord_key]), **(per_client(cid) if per_client else {})})
            config[CLIENT_KEY] = cid
            content = RecordDict({self.arrayrecord_key: record[self.arrayrecord_key], self.configrecord_key: config,
                                  **records})
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = sorted(replies, key=reply_client)
        self.last_replies = replies
        if super().aggregate_train.__func__ is FedAvg.aggregate_train:  # FedAvg's own average: ours is faster
            return self._fedavg_train(replies)
        return super().aggregate_train(server_round, replies)

    def _fedavg_train(self, replies: list[Message]):
        """``FedAvg.aggregate_train`` with ``packed_average`` for replies packed by our backend
        (the same bytes as Flower's ``aggregate_arrayrecords``, which averages any others)."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        arrays = packed_average(contents, self.weighted_by_key)
        if arrays is None:
            arrays = aggregate_arrayrecords(contents, self.weighted_by_key)
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = sorted(replies, key=reply_client)
        self.last_eval_replies = replies
        return super().aggregate_evaluate(server_round, replies)


def keep_mean(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Weighted mean of the numeric metrics, without the client id (per-client values are kept
    from the replies themselves)."""
    total = sum(float(r["metrics"][weighting_key]) for r in records) or 1.0
    out: dict[str, float] = {}
    for r in records:
        w = float(r["metrics"][weighting_key]) / total
        for k, v in r["metrics"].items():
            if k not in (CLIENT_KEY, weighting_key) and isinstance(v, (int, float)):
                out[k] = out.get(k, 0.0) + w * float(v)
    out[weighting_key] = total
    return MetricRecord(out)


def check_cohort(name: str, options: dict[str, Any], per_round: int, min_replies: int | None = None) -> None:
    """Refuse robust-aggregation options the round's cohort cannot meet, naming the option and the
    rule: Krum/MultiKrum need n >= 2f + 3 replies (Blanchard et al. 2017) and MultiKrum averages
    1 <= m <= n - f of them; Bulyan needs n >= 4f + 3 (El Mhamdi et al. 2018), and as Flower's Bulyan
    skips a round with fewer (the model stays as it was), ``fl.min_replies`` must be that high too;
    q-FedAvg needs q >= 0 and a client_learning_rate > 0 (its Lipschitz estimate is 1 / lr)."""
    def whole(key: str, default: int) -> int:
        value = options.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"fl.strategy.options.{key} for {name} must be a whole number >= 0 (got {value!r})")
        return value

    cohort = f"{per_round} clients train per round (fl.clients_per_round, or fl.fraction of partition.clients)"
    if name in ("krum", "multikrum", "bulyan"):
        f = whole("num_malicious_nodes", 0)
        k = 4 if name == "bulyan" else 2
        need, rule = k * f + 3, f"{k} * num_malicious_nodes + 3"
        if per_round < need:
            raise ValueError(f"fl.strategy.options.num_malicious_nodes {f}: {name} needs at least {need} replies per "
                             f"round ({rule}), but {cohort}")
        if name == "bulyan" and min_replies is not None and min_replies < need:
            raise ValueError(f"fl.min_replies {min_replies}: bulyan does not aggregate a round with fewer than {need} "
                             f"replies ({rule}) and would leave the model unchanged; set fl.min_replies to {need} or more")
        m = whole("num_nodes_to_select", 1) if name == "multikrum" else 1
        if not 1 <= m <= per_round - f:
            raise ValueError(f"fl.strategy.options.num_nodes_to_select {m}: multikrum "
                             f"averages 1 to {per_round - f} replies (clients per round - num_malicious_nodes), and {cohort}")
    if name == "qfedavg":
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        q, lr = options.get("q", 0.1), options.get("client_learning_rate")
        if not number(q) or q < 0:
            raise ValueError(f"fl.strategy.options.q for qfedavg must be a number >= 0 (got {q!r})")
        if not number(lr) or lr <= 0:
            raise ValueError(f"fl.strategy.options.client_learning_rate for qfedavg must be a number > 0, the clients' "
                             f"train.lr ({'missing' if lr is None else f'got {lr!r}'})")


def make_strategy(name: str, options: dict[str, Any], *, num_clients: int, per_round: int, seed: int,
                  client_eval: bool, sites: bool = False, min_replies: int | None = None) -> FedAvg:
    """A seeded instance of the named Flower strategy; bad options name the strategy (``min_replies``:
    also check it against the strategy, ``check_cohort``)."""
    from cxrfl_ray.fl.algorithms import algorithm_class

    check_cohort(name, options, per_round, min_replies)
    base = STRATEGIES[name]
    cls = type(f"Seeded{base.__name__}", (Seeded, base), {})
    options = {k: v for k, v in options.items() if k not in algorithm_class(name).options}  # the algorithm's own
    kwargs = dict(fraction_train=1.0, fraction_evaluate=1.0 if client_eval else 0.0, min_train_nodes=1,
                  min_evaluate_nodes=1, min_available_nodes=1, train_metrics_aggr_fn=keep_mean,
                  evaluate_metrics_aggr_fn=keep_mean)
    try:
        strategy = cls(**kwargs, **options)
    except TypeError as exc:
        raise ValueError(f"fl.strategy.options for {name}: {exc}") from None
    strategy.num_clients, strategy.per_round, strategy.seed, strategy.sites = num_clients, per_round, seed, sites
    strategy.last_selection = []
    strategy.round_extras = ({}, None)  # (records for every training message, client id -> its config)
    strategy.round_cohort = None  # the round policy's cohort (None: select_clients)
    return strategy
