"""FedProx (Li et al. 2020): local training pulled towards the round's global weights by
(mu / 2) * ||w - w_global||^2. Flower's ``FedProx`` strategy sends mu in each training message's
config as ``proximal-mu`` (flwr 1.42's key; before this seam the client read ``proximal_mu``,
found nothing, and FedProx silently trained as FedAvg); the term is added to the client's loss here."""

from __future__ import annotations

import torch
from torch import nn

from cxrfl_ray.fl.algorithms.base import Algorithm, LocalWork

MU_KEY = "proximal-mu"


class FedProxWork(LocalWork):
    def begin(self) -> None:
        self.mu = float(self.ctx.content["config"][MU_KEY])
        self.anchor = [p.detach().clone() for p in self.ctx.model.parameters()] if self.mu > 0 else []

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        if self.mu <= 0:
            return None
        return (self.mu / 2) * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), self.anchor))


class FedProx(Algorithm):
    name = "fedprox"

    def local(self, ctx):
        return FedProxWork(self, ctx)
