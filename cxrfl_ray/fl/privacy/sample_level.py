"""Sample-level DP (DP-SGD, Abadi et al. 2016) on each client, with Opacus: every local step
clips each sample's gradient to L2 norm C, sums them, adds Gaussian noise of std z * C and divides
by the batch size. What leaves a client is then DP with respect to each of its rows, against the
server as well as against whoever sees the global model.

client (``PrivateSteps``, round the algorithm's local work)
  begin        Opacus' ``GradSampleModule`` hooks on the runtime's model (on layer outputs, so
               ResNets train): train_local's plain ``model(x)`` records per-sample gradients
  batch_loss   the mean of per-sample losses (a batched Dice couples the samples of a batch)
  before_step  Opacus' ``DPOptimizer.pre_step``: p.grad <- (sum_i clip_C(g_i) + N(0, z^2 C^2)) / b;
               then the algorithm's data-independent loss term (FedProx) and its own before_step
  finish       the hooks removed: the shared model is plain again for evaluation and the next client
server (``SampleLevelDP``)
  account      client i's epsilon from its sampling rate q_i = batch_size / rows_i, its noise
               multiplier z_i and its DP-SGD steps so far; the federation's is the largest

With ``privacy.target_epsilon`` each client solves its own z_i for its q_i and the steps it would
take training every round (``client_noise_multiplier``); the server solves the same from the reply's
row count, so both agree without sending z. The noise comes from (seed, round, client).
"""

from __future__ import annotations

import math
from functools import lru_cache, partial
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message
from opacus import GradSampleModule
from opacus.grad_sample.functorch import prepare_layer
from opacus.grad_sample.gsm_base import OPACUS_PARAM_MONKEYPATCH_ATTRS
from opacus.layers import DPGRU, DPLSTM, DPRNN
from opacus.optimizers import DPOptimizer
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from torch import nn

from cxrfl_ray.config import ExperimentConfig
from cxrfl_ray.fl.algorithms.base import model_skeleton
from cxrfl_ray.fl.privacy.accounting import APPROXIMATION, epsilon, noise_for_epsilon
from cxrfl_ray.fl.privacy.base import NoPrivacy
from cxrfl_ray.fl.strategies import CLIENT_KEY
from cxrfl_ray.tasks.training import LocalHooks

NOISE_TAG = 0x5D95  # keeps the DP-SGD noise stream apart from the other seeded draws
DRAWN = "shuffled fixed-size batches"


# -- the plan both sides compute -----------------------------------------------------------------

def steps_per_round(cfg: ExperimentConfig, rows: int) -> int:
    """DP-SGD steps of a client of ``rows`` rows in a round, counted as ``fit_client`` does:
    ``train.steps`` (or one pass, ceil(rows / batch_size) batches) per epoch, ``train.epochs`` epochs."""
    return (cfg.train.steps or math.ceil(rows / cfg.train.batch_size)) * cfg.train.epochs


def sampling_rate(cfg: ExperimentConfig, rows: int) -> float:
    return min(1.0, cfg.train.batch_size / max(int(rows), 1))


def client_noise_multiplier(cfg: ExperimentConfig, rows: int) -> float:
    """z of a client with ``rows`` training rows: ``privacy.noise_multiplier``, or the smallest z
    that keeps it within ``privacy.target_epsilon`` after training every one of ``fl.rounds``
    (the conservative plan: a client sampled less often spends less). One function for the client
    (to train) and the server (to account)."""
    p = cfg.privacy
    if p.noise_multiplier is not None:
        return float(p.noise_multiplier)
    if rows <= 0:
        raise ValueError("privacy.target_epsilon: the client's row count is needed to solve its noise multiplier")
    return _solve(float(p.target_epsilon), cfg.train.batch_size, int(rows), cfg.fl.rounds,
                  steps_per_round(cfg, rows), float(p.delta), p.accountant)


@lru_cache(maxsize=1024)
def _solve(target: float, batch_size: int, rows: int, rounds: int, per_round: int, delta: float,
           accountant: str) -> float:
    return noise_for_epsilon(target, min(1.0, batch_size / rows), rounds * per_round, delta, accountant,
                             what=f"fl.rounds {rounds} of {per_round} DP-SGD steps (a client of {rows} rows, "
                                  f"train.batch_size {batch_size})")


def noise_seed(seed: int, server_round: int, cid: int) -> int:
    return int(np.random.SeedSequence([seed, NOISE_TAG, server_round, cid]).generate_state(1, np.uint64)[0] >> 1)


# -- per-sample loss -------------------------------------------------------------------------------

def per_sample_loss(loss_fn: nn.Module, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The batch's loss as the mean of each sample's own loss, so each sample's gradient (what
    DP-SGD clips) is the gradient of its loss alone. Unweighted mean-reduced cross-entropy, BCE
    and MSE already are that mean; weighted cross-entropy becomes the plain mean of w_y * CE
    (PyTorch's divides by the batch's sum of weights, which couples the samples); anything else
    (Dice, which sums over the batch) is taken one image at a time."""
    reduction = getattr(loss_fn, "reduction", None)
    if isinstance(loss_fn, nn.CrossEntropyLoss) and reduction == "mean":
        if loss_fn.weight is None:
            return loss_fn(outputs, targets)
        return nn.functional.cross_entropy(outputs, targets, weight=loss_fn.weight, reduction="none",
                                           label_smoothing=loss_fn.label_smoothing).mean()
    if type(loss_fn) in (nn.BCEWithLogitsLoss, nn.BCELoss, nn.MSELoss) and reduction == "mean" \
            and getattr(loss_fn, "weight", None) is None and getattr(loss_fn, "pos_weight", None) is None:
        return loss_fn(outputs, targets)  # a mean over elements, equally many per sample
    return torch.stack([loss_fn(outputs[i:i + 1], targets[i:i + 1]) for i in range(len(outputs))]).mean()


def unsupported_layers(model: nn.Module) -> list[str]:
    """``"layer1.0.bn1 (BatchNorm2d): BatchNorm cannot support ..."`` for each layer Opacus refuses:
    its validators (``ModuleValidator``; they name no layer, so each layer is asked on its own) and
    ``GradSampleModule``'s own refusal of trainable layers with buffers (their statistics are not private)."""
    if not ModuleValidator.validate(model, strict=False) and not any(
            any(True for _ in m.buffers()) for _, m in trainable_modules(model)):
        return []
    found = []
    for name, m in model.named_modules():
        validator = ModuleValidator.VALIDATORS.get(type(m))
        errors = [str(e).split(". ")[0] for e in (validator(m) if validator else [])]
        if not errors and any(p.requires_grad for p in m.parameters(recurse=False)) and any(True for _ in m.buffers()):
            errors = ["a trainable layer with buffers, which are not private"]
        if errors:
            found.append(f"{name or '(model)'} ({type(m).__name__}): {errors[0]}")
    return found


# -- the client's steps ---------------------------------------------------------------------------

def strip_opacus(model: nn.Module) -> None:
    """Remove Opacus' hooks and attributes from ``model`` (left by a client whose training raised),
    so it can be wrapped again and evaluates as a plain model."""
    handles = getattr(model, "autograd_grad_sample_hooks", None)
    if handles is not None:
        while handles:
            handles.pop().remove()
        del model.autograd_grad_sample_hooks
    for p in model.parameters():
        for attr in (*OPACUS_PARAM_MONKEYPATCH_ATTRS, "summed_grad"):
            if hasattr(p, attr):
                delattr(p, attr)
    for m in model.modules():
        for attr in ("activations", "max_batch_len"):
            if attr in m.__dict__:
                delattr(m, attr)


class OutputHookedGradSampleModule(GradSampleModule):
    """Opacus' ``GradSampleModule``, with each layer's output gradient taken from a hook on its
    output tensor instead of a full backward hook on the layer: the output of a full backward hook
    may not be changed in place (PyTorch refuses it), and a ResNet block does, ``x += shortcut``
    right after its last norm (Opacus issue #828: stock hooks fail on every ResNet here). A tensor
    hook registered before an in-place change receives the gradient of the value before it
    (PyTorch's autograd notes): the layer's output gradient, which Opacus' own
    ``capture_backprops_hook`` turns into per-sample gradients, as from its full backward hook."""

    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True,
                  force_functorch: bool = False) -> None:
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model")
        hooks = self._module.autograd_grad_sample_hooks = []
        self.autograd_grad_sample_hooks = hooks
        for module in self.iterate_submodules(self._module):
            if type(module) in (DPRNN, DPLSTM, DPGRU):
                continue  # their RNNLinear layers are hooked
            if force_functorch or type(module) not in self.GRAD_SAMPLERS:
                prepare_layer(module, batch_first=batch_first)
            hooks.append(module.register_forward_hook(self.capture_activations_hook))
            hooks.append(module.register_forward_hook(
                partial(self._hook_output, loss_reduction=loss_reduction, batch_first=batch_first)))
        self.enable_hooks()

    def _hook_output(self, module, inputs, output, *, loss_reduction: str, batch_first: bool) -> None:
        if not self.hooks_enabled or not module.training or not torch.is_grad_enabled():
            return  # as capture_activations_hook, which then stored nothing
        tensor = output if isinstance(output, torch.Tensor) else output[0]
        if tensor.requires_grad:
            tensor.register_hook(lambda grad: self.capture_backprops_hook(
                module, None, (grad,), loss_reduction=loss_reduction, batch_first=batch_first))


class PrivateSteps(LocalHooks):
    """An algorithm's local work ``inner`` trained with DP-SGD (``privacy.mode: sample``)."""

    def __init__(self, cfg: ExperimentConfig, inner: LocalHooks, ctx) -> None:
        self.cfg, self.inner, self.ctx = cfg, inner, ctx
        self.noise_multiplier = client_noise_multiplier(cfg, ctx.rows)
        self.clip_norm = float(cfg.privacy.clip_norm)
        self.gsm = None
        self.dp = None  # DPOptimizer round train_local's optimizer, built at the first step
        self.generator: torch.Generator | None = None  # the noise, from (seed, round, client)

    def begin(self) -> None:
        self.inner.begin()
        strip_opacus(self.ctx.model)
        # Opacus' strict validation refuses what SampleLevelDP.check refused before Ray (BatchNorm).
        self.gsm = OutputHookedGradSampleModule(self.ctx.model, loss_reduction="mean")

    def batch_loss(self, loss_fn: nn.Module, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return per_sample_loss(loss_fn, outputs, targets)

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        """None: per-sample gradients would miss a term that is no function of the samples (the
        algorithm's, e.g. FedProx's); its gradient is added after privatising (``before_step``),
        which is still DP as it depends on no row. The reported train loss is then without it."""
        return None

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        try:
            dp = self._optimizer(optimizer)
            # Divide by this batch's size (the last batch of a pass may be short): with z = 0 and a
            # large clip the step is plain SGD's; the divisor is public (rows and batch size are).
            dp.expected_batch_size = len(dp.grad_samples[0])
            self.privatise(dp)
            term = self.inner.loss_term(model)
            if term is not None:
                params = list(dp.params)
                for p, g in zip(params, torch.autograd.grad(term, params, allow_unused=True)):
                    if g is not None:
                        p.grad.add_(g)
            self.inner.before_step(model, optimizer)
        except BaseException:
            self.close()
            raise

    def privatise(self, dp) -> None:
        """p.grad <- the clipped, noised mean of the per-sample gradients; the per-sample
        gradients cleared, so the next step starts clean."""
        dp.pre_step()
        for p in dp.params:
            p.grad_sample = None
            p.summed_grad = None

    def _optimizer(self, optimizer: torch.optim.Optimizer):
        if self.dp is None or self.dp.original_optimizer is not optimizer:
            if self.generator is None:
                device = next(self.ctx.model.parameters()).device
                self.generator = torch.Generator(device=device)
                if self.cfg.privacy.secure_noise:
                    self.generator.seed()  # the OS's entropy (not cryptographic: Opacus' secure_mode needs torchcsprng)
                else:
                    self.generator.manual_seed(noise_seed(self.cfg.seed, self.ctx.server_round, self.ctx.cid))
            self.dp = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.clip_norm,
                                  expected_batch_size=self.cfg.train.batch_size, generator=self.generator)
        return self.dp

    def reply_weights(self) -> dict[str, torch.Tensor]:
        return self.inner.reply_weights()

    def finish(self, fit: dict[str, float]) -> dict[str, ArrayRecord]:
        try:
            return self.inner.finish(fit)
        finally:
            self.close()

    def close(self) -> None:
        """The model plain again (hooks and per-sample state gone)."""
        model = self.ctx.model
        if self.gsm is not None:
            # Only this wrapper's own hooks (another client's begin may have stripped them and hooked anew).
            if getattr(model, "autograd_grad_sample_hooks", None) is self.gsm.autograd_grad_sample_hooks:
                self.gsm._close()
                strip_opacus(model)
            self.gsm = None
        self.dp = None


# -- the server's accountant ----------------------------------------------------------------------

class SampleLevelDP(NoPrivacy):
    """``privacy.mode: sample``: the server aggregates as it would without DP and accounts each
    client's epsilon. State: per client its DP-SGD steps and its rows (arrays, for ``--resume``)."""

    mode = "sample"

    def __init__(self, cfg: ExperimentConfig, num_clients: int, per_round: int) -> None:
        super().__init__(cfg, num_clients, per_round)
        self.steps = np.zeros(num_clients, np.int64)
        self.rows = np.zeros(num_clients, np.int64)

    @classmethod
    def check(cls, cfg: ExperimentConfig, num_clients: int, per_round: int) -> None:
        if cfg.model.norm == "batch":
            raise ValueError("privacy.mode 'sample' (DP-SGD) cannot train BatchNorm, which mixes the samples of a "
                             "batch: set model.norm: group")
        found = unsupported_layers(model_skeleton(cfg))
        if found:
            more = f" (and {len(found) - 5} more)" if len(found) > 5 else ""
            raise ValueError(f"privacy.mode 'sample' (DP-SGD): model.name {cfg.model.name!r} has layers Opacus cannot "
                             f"train with per-sample gradients: {'; '.join(found[:5])}{more}")
        if cfg.privacy.target_epsilon is not None:
            # The worst client the config allows: at most batch_size rows, so q = 1 at every step.
            client_noise_multiplier(cfg, cfg.train.batch_size)

    def account(self, server_round: int, replies: list[Message]) -> dict[str, dict[str, float]]:
        """Every good reply reached the server, so its steps are spent (also in a round that failed
        for too few replies and was not aggregated)."""
        cids = []
        for reply in replies:
            metrics = reply.content["metrics"]
            cid = int(metrics[CLIENT_KEY])
            self.rows[cid] = int(metrics["num-examples"])
            self.steps[cid] += int(metrics["steps"])
            cids.append(cid)
        out = {str(cid): self._client(cid) for cid in cids}
        seen = np.flatnonzero(self.rows > 0)
        rows = [self._client(int(c)) for c in seen]
        worst = max(rows, key=lambda r: r["epsilon"], default=None)
        federation = {"epsilon": worst["epsilon"] if worst else 0.0, "delta": float(self.cfg.privacy.delta),
                      "steps": int(self.steps.max(initial=0)), "clients_accounted": int(seen.size)}
        z = worst["noise_multiplier"] if worst else self.cfg.privacy.noise_multiplier  # that of the worst client
        if z is not None:
            federation["noise_multiplier"] = float(z)
        return {"federation": federation, **out}

    def _client(self, cid: int) -> dict[str, float]:
        p, rows = self.cfg.privacy, int(self.rows[cid])
        q, z = sampling_rate(self.cfg, rows), client_noise_multiplier(self.cfg, rows)
        steps = int(self.steps[cid])
        return {"epsilon": epsilon(q, z, steps, p.delta, p.accountant), "steps": steps, "sampling_rate": q,
                "noise_multiplier": z}

    def summary(self) -> dict[str, Any]:
        p = self.cfg.privacy
        seen = [int(c) for c in np.flatnonzero(self.rows > 0)]
        rows = [self._client(c) for c in seen]
        zs = [r["noise_multiplier"] for r in rows]
        z: Any = float(p.noise_multiplier) if p.noise_multiplier is not None else (
            {"min": min(zs), "max": max(zs)} if zs else None)
        return {"mode": self.mode, "epsilon": max((r["epsilon"] for r in rows), default=0.0), "delta": p.delta,
                "accountant": p.accountant, "noise_multiplier": z, "clip_norm": float(p.clip_norm),
                "clients_accounted": len(seen), "steps_max": int(self.steps.max(initial=0)),
                "sampling": {"unit": "sample", "rate": max((r["sampling_rate"] for r in rows), default=0.0),
                             "drawn": DRAWN},
                "approximation": APPROXIMATION}

    def state(self) -> dict[str, np.ndarray]:
        return {"steps": self.steps.copy(), "rows": self.rows.copy()}

    def restore(self, tensors: dict[str, np.ndarray]) -> None:
        self.steps = np.asarray(tensors["steps"], np.int64).copy()
        self.rows = np.asarray(tensors["rows"], np.int64).copy()

    @classmethod
    def local_work(cls, cfg: ExperimentConfig, work: LocalHooks, ctx) -> LocalHooks:
        return PrivateSteps(cfg, work, ctx)
