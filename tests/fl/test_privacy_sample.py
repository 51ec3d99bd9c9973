"""Sample-level DP (DP-SGD with Opacus) on the round seam: the config checks, the client's private
steps on tiny real models through ``train_local`` (plain training when z = 0 and the clip is huge,
every sample's gradient clipped, seeded noise, FedProx's term kept, the model plain afterwards),
the per-sample loss of segmentation, and the server's accountant against dp-accounting."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cxrfl_ray.config import build_config
from cxrfl_ray.fl.algorithms import ClientRound, make_algorithm
from cxrfl_ray.fl.privacy import make_privacy, privacy_class
from cxrfl_ray.fl.privacy.accounting import EpsilonUnreachable, epsilon
from cxrfl_ray.fl.privacy.sample_level import (PrivateSteps, SampleLevelDP, client_noise_multiplier, per_sample_loss,
                                               steps_per_round, unsupported_layers)
from cxrfl_ray.fl.rounds import ServerHooks
from cxrfl_ray.tasks.segmentation import DiceBCELoss
from cxrfl_ray.tasks.training import LocalHooks, train_local
from tests.fl.messages import train_reply

CPU = torch.device("cpu")


def _cfg(task: str = "classification", strategy: str = "fedavg", options=None, train=None, fl=None,
         norm: str = "group", **privacy):
    privacy = {"mode": "sample", "noise_multiplier": 1.0, "clip_norm": 1.0, **privacy}
    if "target_epsilon" in privacy:
        privacy.pop("noise_multiplier")
    return build_config({
        "task": task, "seed": 4, "model": {"name": "tiny-conv" if task == "classification" else "tiny-conv-seg",
                                           "norm": norm},
        "partition": {"clients": 3},
        "train": {"optimizer": "sgd", "momentum": 0.0, "lr": 0.1, "batch_size": 8, **(train or {})},
        "fl": {"rounds": 3, "clients_per_round": 2, "strategy": {"name": strategy, "options": options or {}},
               **(fl or {})},
        "privacy": privacy})


def _model(task: str = "classification") -> nn.Module:
    torch.manual_seed(0)
    if task == "segmentation":
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                             nn.Conv2d(4, 1, 3, padding=1))
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 2))


def _data(task: str = "classification", n: int = 20, size: int = 12):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, size, size, generator=g)
    if task == "segmentation":
        # Masks from nearly empty to nearly full: a batched Dice weighs the images by their mask areas.
        y = (torch.randn(n, 1, size, size, generator=g) > torch.linspace(-1.5, 1.5, n).view(n, 1, 1, 1)).float()
    else:
        y = torch.randint(0, 2, (n,), generator=g)
    return TensorDataset(x, y)


def _loss(task: str) -> nn.Module:
    return DiceBCELoss() if task == "segmentation" else nn.CrossEntropyLoss()


def _ctx(cfg, model, cid: int = 0, server_round: int = 1, rows: int = 20, mu: float | None = None) -> ClientRound:
    config = ConfigRecord({} if mu is None else {"proximal-mu": mu})
    return ClientRound(cid, server_round, model, cfg, RecordDict({"config": config}), None, 0, rows)


def _train(cfg, model, hooks=None, task: str = "classification", data=None, epochs: int = 1) -> dict:
    """``cfg``'s local training of ``model`` (SGD, a seeded shuffle) with ``hooks`` begun and finished."""
    data = data or _data(task)
    loader = DataLoader(data, batch_size=cfg.train.batch_size, shuffle=True, generator=torch.Generator().manual_seed(5))
    if hooks is not None and hasattr(hooks, "begin"):
        hooks.begin()
    fit = train_local(model, loader, _loss(task), torch.optim.SGD(model.parameters(), lr=cfg.train.lr), CPU,
                      epochs=epochs, hooks=hooks)
    if hooks is not None and hasattr(hooks, "finish"):
        hooks.finish(fit)
    return fit


def _private(cfg, model, **ctx) -> PrivateSteps:
    ctx = _ctx(cfg, model, **ctx)
    return privacy_class("sample").local_work(cfg, make_algorithm(cfg).local(ctx), ctx)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _plain(model: nn.Module) -> bool:
    """No Opacus hook or attribute left on the model."""
    hooks = any(m._forward_hooks or m._backward_hooks for m in model.modules())
    attrs = any(hasattr(p, a) for p in model.parameters() for a in ("grad_sample", "summed_grad", "_forward_counter"))
    return not hooks and not attrs and not hasattr(model, "autograd_grad_sample_hooks")


# -- checks before Ray ----------------------------------------------------------------------------

def test_batchnorm_and_other_layers_opacus_cannot_train_are_refused_before_ray():
    with pytest.raises(ValueError, match=r"privacy.mode 'sample' \(DP-SGD\) cannot train BatchNorm, which mixes the "
                                         r"samples of a batch: set model.norm: group"):
        SampleLevelDP.check(_cfg(norm="batch"), 3, 2)

    def resnet(norm: str):
        return build_config({"model": {"name": "resnet18", "norm": norm}, "partition": {"clients": 4},
                             "privacy": {"mode": "sample", "noise_multiplier": 1.0}})

    with pytest.raises(ValueError, match=r"model\.norm"):
        ServerHooks.check(resnet("batch"), 4)
    ServerHooks.check(resnet("group"), 4)
    # Layers other than BatchNorm, named.
    found = unsupported_layers(nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2, affine=True,
                                                                                   track_running_stats=True)))
    assert found == ["1 (InstanceNorm2d): We do not support tracking running stats with differential privacy"]
    assert unsupported_layers(_model()) == []


def test_an_unreachable_target_epsilon_is_refused_with_the_smallest_reachable():
    with pytest.raises(EpsilonUnreachable, match=r"privacy.target_epsilon 1e-06 cannot be met over fl.rounds 3 of 1 "
                                                 r"DP-SGD steps .* the smallest reachable epsilon"):
        ServerHooks.check(_cfg(target_epsilon=1e-6), 3)
    ServerHooks.check(_cfg(target_epsilon=1.0), 3)


# -- the client's steps ---------------------------------------------------------------------------

def test_per_sample_gradients_are_recorded_through_the_plain_model_and_the_model_is_plain_after():
    """train_local calls the model itself, not Opacus' wrapper: the hooks on its layers still
    record each sample's gradient, equal to that sample's loss alone differentiated."""
    from cxrfl_ray.tasks.models import create_model

    cfg = build_config({"model": {"name": "resnet18", "norm": "group"},
                        "privacy": {"mode": "sample", "noise_multiplier": 1.0}})
    torch.manual_seed(0)
    model = create_model("resnet18", "classification", 1, 2, norm="group")
    x, y = torch.randn(3, 1, 32, 32), torch.tensor([0, 1, 1])
    twin = copy.deepcopy(model)
    work = _private(cfg, model)
    work.begin()
    model.train()
    nn.CrossEntropyLoss()(model(x), y).backward()
    params = dict(model.named_parameters())
    for i in range(3):
        twin.zero_grad()
        nn.CrossEntropyLoss()(twin(x[i:i + 1]), y[i:i + 1]).backward()
        for name, p in twin.named_parameters():
            torch.testing.assert_close(params[name].grad_sample[i], p.grad, rtol=1e-4, atol=1e-5)
    work.close()
    assert _plain(model)
    # Left behind by a client whose training raised: the next client's begin wraps it again, and
    # the old wrapper closed late leaves the new one's hooks alone.
    stale, work = _private(cfg, model), _private(cfg, model)
    stale.begin()
    work.begin()
    stale.close()
    assert model.autograd_grad_sample_hooks
    work.close()
    assert _plain(model)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_zero_noise_and_a_huge_clip_is_plain_training(task):
    """20 rows in batches of 8: the short last batch too is divided by its own size."""
    cfg = _cfg(task, noise_multiplier=0.0, clip_norm=1e6)
    plain, private = _model(task), _model(task)
    loss = _train(cfg, plain, task=task, hooks=_PerImage() if task == "segmentation" else None)
    work = _private(cfg, private)
    fit = _train(cfg, private, work, task=task)
    assert fit["steps"] == 3 and fit["loss"] == pytest.approx(loss["loss"], rel=1e-5)
    torch.testing.assert_close(_flat(private), _flat(plain), rtol=1e-5, atol=1e-6)
    assert not torch.equal(_flat(private), _flat(_model(task)))
    assert _plain(private)


class _PerImage(LocalHooks):
    """Plain training on DP-SGD's per-sample loss (the segmentation reference)."""

    def batch_loss(self, loss_fn, outputs, targets):
        return per_sample_loss(loss_fn, outputs, targets)


class _Recording(PrivateSteps):
    """Records, at each step, each sample's gradient norm and the gradient Opacus' clipping should give."""

    def privatise(self, dp) -> None:
        samples = [p.grad_sample for p in dp.params]
        norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in samples], 1).norm(dim=1)
        factors = (self.clip_norm / (norms + 1e-6)).clamp(max=1.0)
        expected = [torch.einsum("i,i...", factors, g) / len(g) for g in samples]
        super().privatise(dp)
        self.steps.append((norms, factors, expected, [p.grad.clone() for p in dp.params]))


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_every_per_sample_gradient_is_clipped_to_the_norm(task):
    cfg = _cfg(task, noise_multiplier=0.0, clip_norm=0.01)
    model = _model(task)
    ctx = _ctx(cfg, model)
    work = _Recording(cfg, make_algorithm(cfg).local(ctx), ctx)
    work.steps = []
    _train(cfg, model, work, task=task)
    assert len(work.steps) == 3
    for norms, factors, expected, grads in work.steps:
        assert norms.max() > 10 * cfg.privacy.clip_norm  # the clip binds
        assert (norms * factors <= cfg.privacy.clip_norm * (1 + 1e-5)).all()
        for e, g in zip(expected, grads):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-9)
        assert math.sqrt(sum(float((g ** 2).sum()) for g in grads)) <= cfg.privacy.clip_norm * (1 + 1e-5)


def test_segmentation_takes_each_image_loss_alone():
    """smp's binary Dice sums over the batch, so a batched Dice would couple the images: DP-SGD
    takes the mean of per-image losses, and each recorded gradient is then that image's alone."""
    task, cfg = "segmentation", _cfg("segmentation")
    x, y = _data(task, n=4)[:]
    model, loss_fn = _model(task), _loss(task)
    with torch.no_grad():
        out = model(x)
    each = torch.stack([loss_fn(out[i:i + 1], y[i:i + 1]) for i in range(4)])
    assert float(per_sample_loss(loss_fn, out, y)) == pytest.approx(float(each.mean()), rel=1e-6)
    assert abs(float(loss_fn(out, y)) - float(each.mean())) > 1e-3  # the batched Dice differs

    def recorded(batch_loss) -> list[torch.Tensor]:
        m = _model(task)
        work = _private(cfg, m)
        work.begin()
        batch_loss(m(x)).backward()
        grads = [p.grad_sample.clone() for p in m.parameters()]
        work.close()
        return grads

    def own(i: int) -> list[torch.Tensor]:
        m = _model(task)
        loss_fn(m(x[i:i + 1]), y[i:i + 1]).backward()
        return [p.grad for p in m.parameters()]

    per_image = recorded(lambda o: per_sample_loss(loss_fn, o, y))
    batched = recorded(lambda o: loss_fn(o, y))
    for i in range(4):
        for g, mine in zip(per_image, own(i)):
            torch.testing.assert_close(g[i], mine, rtol=1e-4, atol=1e-6)
    assert not all(torch.allclose(g[0], mine, rtol=1e-3, atol=1e-5) for g, mine in zip(batched, own(0)))


def test_weighted_cross_entropy_becomes_a_mean_of_per_sample_losses():
    out, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 2, 1])
    w = torch.tensor([1.0, 2.0, 5.0])
    expected = torch.stack([w[t] * nn.functional.cross_entropy(o[None], t[None]) for o, t in zip(out, y)]).mean()
    assert float(per_sample_loss(nn.CrossEntropyLoss(weight=w), out, y)) == pytest.approx(float(expected), rel=1e-6)
    assert float(per_sample_loss(nn.CrossEntropyLoss(), out, y)) == pytest.approx(
        float(nn.functional.cross_entropy(out, y)), rel=1e-7)


def test_noise_comes_from_the_seed_round_and_client():
    cfg = _cfg(noise_multiplier=1.0, clip_norm=1.0)

    def trained(**ctx) -> torch.Tensor:
        model = _model()
        _train(cfg, model, _private(cfg, model, **ctx))
        return _flat(model)

    first = trained()
    assert torch.equal(first, trained())
    assert not torch.allclose(first, trained(server_round=2), atol=1e-4)
    assert not torch.allclose(first, trained(cid=1), atol=1e-4)
    quiet = _cfg(noise_multiplier=0.0, clip_norm=1.0)
    model = _model()
    _train(quiet, model, _private(quiet, model))
    assert not torch.allclose(first, _flat(model), atol=1e-4)  # the noise is there


def test_fedprox_keeps_its_proximal_term_under_dp():
    """The term is no function of the samples: left out of the per-sample gradients, its gradient
    is added after privatising. With z = 0 and a huge clip DP-FedProx is plain FedProx."""
    def trained(strategy: str, private: bool, **privacy) -> torch.Tensor:
        options = {"proximal_mu": 5.0} if strategy == "fedprox" else {}
        cfg = _cfg(strategy=strategy, options=options, **privacy)
        model = _model()
        ctx = _ctx(cfg, model, mu=5.0 if strategy == "fedprox" else None)
        work = make_algorithm(cfg).local(ctx)
        _train(cfg, model, privacy_class("sample").local_work(cfg, work, ctx) if private else work, epochs=3)
        return _flat(model)

    assert not torch.allclose(trained("fedprox", True), trained("fedavg", True), atol=1e-4)
    torch.testing.assert_close(trained("fedprox", True, noise_multiplier=0.0, clip_norm=1e6),
                               trained("fedprox", False), rtol=1e-5, atol=1e-6)


class _Work(LocalHooks):
    """An algorithm's local work that records what DP-SGD lets through to it."""

    def __init__(self) -> None:
        self.calls, self.grads = [], []

    def begin(self):
        self.calls.append("begin")

    def before_step(self, model, optimizer):
        self.calls.append("before_step")
        self.grads.append([p.grad.clone() for p in model.parameters()])
        assert not any(getattr(p, "grad_sample", None) is not None for p in model.parameters())

    def reply_weights(self):
        self.calls.append("reply_weights")
        return {}

    def finish(self, fit):
        self.calls.append("finish")
        return {"extra": fit["steps"]}


def test_the_algorithms_hooks_see_the_private_gradients_and_the_model_is_plain_even_after_an_error():
    cfg = _cfg()
    model, inner = _model(), _Work()
    work = SampleLevelDP.local_work(cfg, inner, _ctx(cfg, model))
    work.begin()
    loader = DataLoader(_data(), batch_size=8)
    fit = train_local(model, loader, _loss("classification"), torch.optim.SGD(model.parameters(), lr=0.1), CPU,
                      hooks=work)
    assert work.finish(fit) == {"extra": 3} and work.reply_weights() == {}
    assert inner.calls == ["begin", "before_step", "before_step", "before_step", "finish", "reply_weights"]
    assert _plain(model)

    class Failing(_Work):
        def before_step(self, model, optimizer):
            raise RuntimeError("scaffold failed")

    work = SampleLevelDP.local_work(cfg, Failing(), _ctx(cfg, model))
    work.begin()
    with pytest.raises(RuntimeError, match="scaffold failed"):
        train_local(model, loader, _loss("classification"), torch.optim.SGD(model.parameters(), lr=0.1), CPU,
                    hooks=work)
    assert _plain(model)


# -- the server's accountant ----------------------------------------------------------------------

def _reply(cid: int, rows: int, steps: int):
    return train_reply(cid, {}, **{"num-examples": rows, "train_loss": 0.5, "steps": steps})


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_each_clients_epsilon_equals_dp_accounting_called_directly(accountant):
    import dp_accounting
    from dp_accounting import pld, rdp

    cfg, z, delta = _cfg(noise_multiplier=1.3, accountant=accountant), 1.3, 1e-5
    privacy = make_privacy(cfg, 3, 2)

    def direct(q: float, steps: int) -> float:
        acc = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
        acc.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps))
        return acc.get_epsilon(delta)

    first = privacy.account(1, [_reply(0, 40, 5), _reply(1, 100, 5)])
    assert set(first) == {"federation", "0", "1"}
    second = privacy.account(2, [_reply(1, 100, 13), _reply(2, 16, 2)])
    assert set(second) == {"federation", "1", "2"}
    assert second["1"]["epsilon"] == pytest.approx(direct(8 / 100, 18), rel=1e-9)
    assert second["2"]["epsilon"] == pytest.approx(direct(8 / 16, 2), rel=1e-9)
    assert second["1"] == {"epsilon": second["1"]["epsilon"], "steps": 18, "sampling_rate": 0.08,
                           "noise_multiplier": 1.3}
    eps = [direct(8 / 40, 5), direct(8 / 100, 18), direct(8 / 16, 2)]
    fed = second["federation"]
    assert fed["epsilon"] == pytest.approx(max(eps), rel=1e-9)
    assert fed["steps"] == 18 and fed["clients_accounted"] == 3 and fed["delta"] == delta
    assert all(isinstance(v, (int, float)) for row in second.values() for v in row.values())
    summary = privacy.summary()
    assert summary["epsilon"] == pytest.approx(max(eps)) and summary["noise_multiplier"] == 1.3
    assert summary["sampling"] == {"unit": "sample", "rate": 0.5, "drawn": "shuffled fixed-size batches"}

    # --resume: the arrays alone bring the accountant back.
    state = privacy.state()
    assert {k: v.dtype for k, v in state.items()} == {"steps": np.int64, "rows": np.int64}
    fresh = make_privacy(cfg, 3, 2)
    fresh.restore(state)
    assert fresh.account(3, [_reply(0, 40, 5)]) == privacy.account(3, [_reply(0, 40, 5)])
    assert fresh.summary() == privacy.summary()


def test_a_target_epsilon_gives_each_client_its_own_noise_for_its_planned_steps():
    cfg = _cfg(target_epsilon=2.0)  # 3 rounds, batch 8, one pass per round
    assert steps_per_round(cfg, 40) == 5 and steps_per_round(cfg, 41) == 6
    z40, z200 = client_noise_multiplier(cfg, 40), client_noise_multiplier(cfg, 200)
    assert 1.95 < epsilon(8 / 40, z40, 15, 1e-5) <= 2.0
    assert 1.95 < epsilon(8 / 200, z200, 75, 1e-5) <= 2.0
    assert z40 != pytest.approx(z200, rel=1e-3)
    assert _private(cfg, _model(), rows=40).noise_multiplier == z40  # the client trains with the server's z
    privacy = make_privacy(cfg, 3, 2)
    for r in (1, 2, 3):
        rows = privacy.account(r, [_reply(0, 40, 5), _reply(1, 200, 25)])
    assert rows["0"]["noise_multiplier"] == z40 and 1.95 < rows["0"]["epsilon"] <= 2.0
    assert 1.95 < rows["federation"]["epsilon"] <= 2.0
    assert privacy.summary()["noise_multiplier"] == {"min": min(z40, z200), "max": max(z40, z200)}
    cfg_steps = _cfg(target_epsilon=2.0, train={"steps": 4, "epochs": 2})
    assert steps_per_round(cfg_steps, 40) == 8
