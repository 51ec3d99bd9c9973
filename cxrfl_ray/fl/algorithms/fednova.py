"""FedNova (Wang et al. 2020): normalised averaging, so that clients doing more local steps (a
bigger hospital with full-pass epochs, or a straggler that stopped early) do not pull the
average towards their own optimum.

Each client i reports its local steps tau_i (the reply's ``steps``) and examples n_i. Its update
x - y_i adds up a_i gradients (the normaliser); the server averages the normalised updates
d_i = (x - y_i) / a_i with p_i = n_i / sum n and steps by tau_eff = sum p_i a_i:

    x_new = x - tau_eff * sum_i p_i d_i

done as a rewrite of each reply, y_i' = x - (tau_eff / a_i)(x - y_i), followed by Flower's
example-weighted FedAvg (its arithmetic, client-id order). With equal a_i this is FedAvg.

Normaliser (the FedNova reference code's ``local_normalizing_vec``): plain SGD a = tau; SGD with
momentum rho (PyTorch's, no dampening) a = (tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho), the
sum over steps of 1 + rho + ... + rho^(t-1). Adam, AdamW and Adagrad: a = tau, an approximation
(their step is not a fixed sum of gradients; each moves the weights by about lr per step, so the
displacement grows about linearly in tau). Weight decay and a cosine schedule are left out of a:
every client runs the same fraction of its schedule in a round, so a common factor in all a_i
cancels in tau_eff / a_i.

Buffers (BatchNorm running statistics) are not sums of gradients: they are averaged as in
FedAvg. No client state.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Message

from cxrfl_ray.config import TrainConfig
from cxrfl_ray.fl.algorithms.base import WEIGHTS_KEY, Algorithm, model_skeleton
from cxrfl_ray.fl.arrays import RawArray, record_of, view


def normaliser(steps: int, train: TrainConfig) -> float:
    """a_i: how many gradients a client's update of ``steps`` local steps adds up."""
    rho = float(train.momentum) if train.optimizer == "sgd" else 0.0
    if rho == 0.0:
        return float(steps)
    return (steps - rho * (1.0 - rho**steps) / (1.0 - rho)) / (1.0 - rho)


def normalise_replies(arrays: ArrayRecord, replies: list[Message], normalisers: list[float],
                      weighted_by: str, buffers: frozenset[str] = frozenset()) -> float:
    """Rewrite each reply's weights to x - (tau_eff / a_i)(x - y_i) in place (``buffers`` as they
    are), so that the ``weighted_by``-weighted mean of the replies is FedNova's step. Returns tau_eff."""
    examples = np.array([float(r.content["metrics"][weighted_by]) for r in replies])
    tau_eff = float(np.dot(examples, normalisers) / examples.sum())
    x = {k: view(v).astype(np.float64) for k, v in arrays.items() if k not in buffers}
    for reply, a in zip(replies, normalisers):
        factor = tau_eff / a if a > 0 else 0.0  # no step: no update (y_i = x)
        if factor == 1.0:
            continue
        record = reply.content[WEIGHTS_KEY]
        out = {}
        for key, value in record.items():
            y = view(value)
            if key in buffers:
                out[key] = value
                continue
            new = x[key] - factor * (x[key] - y)
            out[key] = RawArray(new.astype(y.dtype))  # read by the aggregation only
        reply.content[WEIGHTS_KEY] = record_of(out)
    return tau_eff


class FedNova(Algorithm):
    name = "fednova"

    def aggregate(self, strategy, server_round: int, arrays: ArrayRecord, replies: list[Message]):
        cfg = self.cfg
        if replies:
            a = [normaliser(int(r.content["metrics"]["steps"]), cfg.train) for r in replies]
            buffers = frozenset(name for name, _ in model_skeleton(cfg).named_buffers())
            normalise_replies(arrays, replies, a, strategy.weighted_by_key, buffers)
        return strategy.aggregate_train(server_round, replies)
