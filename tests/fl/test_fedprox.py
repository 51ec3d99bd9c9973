"""FedProx on the algorithm seam: Flower's strategy sends proximal_mu, the client's LocalWork adds
(mu / 2) * ||w - w_global||^2 to its loss."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn

from cxrfl_ray.config import build_config
from cxrfl_ray.fl.engine import run_federated
from cxrfl_ray.fl.algorithms import ClientRound, make_algorithm
from cxrfl_ray.fl.strategies import make_strategy
from cxrfl_ray.tasks.training import train_local


def _work(model: nn.Module, mu: float):
    cfg = build_config({"fl": {"strategy": {"name": "fedprox", "options": {"proximal_mu": mu}}}})
    content = RecordDict({"config": ConfigRecord({"proximal-mu": mu})})
    work = make_algorithm(cfg).local(ClientRound(0, 1, model, cfg, content, None))
    work.begin()
    return work


def test_the_proximal_term_is_half_mu_times_the_squared_distance_to_the_round_start():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    work = _work(model, mu=0.5)
    start = [p.detach().clone() for p in model.parameters()]
    assert float(work.loss_term(model)) == 0.0
    with torch.no_grad():
        model.weight += torch.tensor([[1.0, -2.0, 0.0]])
        model.bias += 3.0
    expected = 0.5 / 2 * (1.0 + 4.0 + 9.0)
    assert torch.isclose(work.loss_term(model), torch.tensor(expected))
    assert all(torch.equal(a, s) for a, s in zip(work.anchor, start))  # anchored at the round's start


def test_mu_pulls_local_training_towards_the_global_weights_and_mu_zero_is_fedavg():
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.randn(48, 3, generator=torch.Generator().manual_seed(1))
    data = DataLoader(TensorDataset(x, torch.ones(48, 1) * 5), batch_size=8)

    def trained(mu: float) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        work = _work(model, mu)
        train_local(model, data, nn.MSELoss(), torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"),
                    hooks=work)
        return start, torch.cat([p.detach().flatten() for p in model.parameters()])

    start, plain = trained(0.0)
    assert _work(nn.Linear(3, 1), 0.0).loss_term(nn.Linear(3, 1)) is None  # mu 0 adds nothing
    _, pulled = trained(10.0)
    assert (pulled - start).norm() < 0.5 * (plain - start).norm()


@pytest.mark.timeout(300)
def test_a_fedprox_federation_differs_from_fedavg_only_through_mu(phantoms, tmp_path, ray_session):
    """The engine path: Flower's FedProx sends mu in every training message and the clients use
    it. mu 0 is exactly FedAvg's run; mu > 0 changes the weights."""
    from safetensors.torch import load_file

    from tests.fl.test_simulate import config

    data = phantoms(n=120, size=32)

    def final(name: str, mu: float | None):
        options = {} if mu is None else {"proximal_mu": mu}
        cfg = config(data, tmp_path / f"{name}{mu}", data={"size": 32}, partition={"clients": 2},
                     fl={"rounds": 1, "fraction": 1.0, "strategy": {"name": name, "options": options}},
                     train={"steps": 3, "lr": 0.1})
        return load_file(str(run_federated(cfg, quiet=True) / "last.safetensors"))

    fedavg, prox0, prox = final("fedavg", None), final("fedprox", 0.0), final("fedprox", 5.0)
    assert all(torch.equal(fedavg[k], prox0[k]) for k in fedavg)
    assert any(not torch.equal(fedavg[k], prox[k]) for k in fedavg if k.endswith("weight"))


def test_the_client_reads_mu_under_the_key_flowers_fedprox_sends_it():
    """Flower's FedProx.configure_train writes mu as ``proximal-mu``; a client reading another key
    trains plain FedAvg without a word (as it did before the seam)."""
    import inspect

    from flwr.serverapp.strategy import FedProx

    from cxrfl_ray.fl.algorithms.fedprox import MU_KEY

    assert f'config["{MU_KEY}"] = self.proximal_mu' in inspect.getsource(FedProx.configure_train)
    strategy = make_strategy("fedprox", {"proximal_mu": 0.25}, num_clients=2, per_round=2, seed=0, client_eval=False)
    assert strategy.proximal_mu == 0.25
