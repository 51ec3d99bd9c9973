"""Models by name: a registry and ``create_model`` (timm's factory pattern, no if/elif chains).

Segmentation models come from segmentation-models-pytorch (``<arch>-<encoder>``), classifiers
from timm. Pretrained weights load only from a local file, or from the hub when the config says
``pretrained: hub`` explicitly (and ``HF_HUB_OFFLINE=0``).
"""

from __future__ import annotations

from collections import OrderedDict

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn


class ModelError(ValueError):
    """An unknown model name, a wrong task, or weights that do not fit."""


@dataclass(frozen=True)
class ModelSpec:
    """One registered model.

    Parameters
    ----------
    name : registry name (``unet-resnet18``, ``resnet50`` ...).
    task : ``segmentation`` or ``classification``.
    build : ``build(in_chans, num_classes, pretrained_file_or_hub)`` -> module.
    cam_layer : dotted path of the last convolutional block (Grad-CAM's target).
    paper : one of the CXR-FL paper's models.
    """

    name: str
    task: str
    build: Callable[[int, int, str | None], nn.Module]
    cam_layer: str | None = None
    paper: bool = False


MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    MODELS[spec.name] = spec
    return spec


def known_models(task: str | None = None) -> list[str]:
    return sorted(n for n, s in MODELS.items() if task is None or s.task == task)


def get_spec(name: str, task: str | None = None) -> ModelSpec:
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; known {task or ''} models: {', '.join(known_models(task))}")
    spec = MODELS[name]
    if task is not None and spec.task != task:
        raise ModelError(
            f"model {name!r} is a {spec.task} model, not {task}; {task} models: {', '.join(known_models(task))}"
        )
    return spec


def create_model(name: str, task: str, in_chans: int = 1, num_classes: int = 3,
                 pretrained: str | None = None, norm: str = "batch") -> nn.Module:
    """Build a registered model; ``pretrained`` is a local weights file or ``"hub"``.

    ``norm="group"`` swaps every BatchNorm2d for GroupNorm (after loading weights, keeping the
    affine parameters): averaged BatchNorm running statistics do not describe the averaged model,
    which wrecks FedAvg evaluation (measured on phantom segmentation: val Jaccard 0.21 with the
    averaged statistics, 0.88 with statistics recomputed for the same weights).
    """
    spec = get_spec(name, task)
    if pretrained not in (None, "hub") and not Path(pretrained).is_file():
        raise ModelError(f"pretrained weights file not found: {pretrained}")
    if pretrained == "hub" and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise ModelError(
            "model.pretrained is 'hub' but HF_HUB_OFFLINE is set: run with HF_HUB_OFFLINE=0 to allow the "
            f"download, or give a local weights file for {name!r} (model.pretrained: /path/to/weights)"
        )
    model = spec.build(in_chans, num_classes, pretrained)
    if norm == "group":
        batchnorm_to_groupnorm(model)
    elif norm != "batch":
        raise ModelError(f"norm {norm!r}: use 'batch' or 'group'")
    return model


def batchnorm_to_groupnorm(module: nn.Module) -> nn.Module:
    """Replace BatchNorm2d layers in place by GroupNorm (32 groups, or fewer for narrow layers).

    timm's ``BatchNormAct2d`` (EfficientNet) is a BatchNorm2d that also applies its activation
    (and dropout): it becomes ``Sequential(norm=GroupNorm, drop, act)``, so the activation is kept
    and the norm is a plain GroupNorm (which Opacus' DP-SGD knows)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            channels = child.num_features
            groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0 and channels // g >= 2 or g == 1)
            norm = nn.GroupNorm(groups, channels, eps=child.eps, affine=child.affine)
            if child.affine:
                norm.weight.data.copy_(child.weight.data)
                norm.bias.data.copy_(child.bias.data)
            act, drop = getattr(child, "act", None), getattr(child, "drop", None)
            if isinstance(act, nn.Module) and not isinstance(act, nn.Identity) or \
                    isinstance(drop, nn.Module) and not isinstance(drop, nn.Identity):
                norm = nn.Sequential(OrderedDict(norm=norm, drop=drop or nn.Identity(), act=act or nn.Identity()))
            setattr(module, name, norm)
        else:
            batchnorm_to_groupnorm(child)
    return module


# -- weights from files -------------------------------------------------------------------------

def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``.pth`` loaded with ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load an encoder's weights, summing a 3-channel stem over channels when the model has 1."""
    load_fitting(encoder, {k.removeprefix("encoder."): v for k, v in read_state_dict(path).items()}, path, "encoder")


def load_fitting(module: nn.Module, state: dict[str, torch.Tensor], path: str | Path, what: str = "model") -> None:
    """Load every tensor of ``state`` that fits ``module`` (a 3-channel stem summed to 1 channel);
    the rest keeps its initialisation. A file where nothing fits is an error."""
    own = module.state_dict()
    fitted, skipped = {}, []
    for key, value in state.items():
        if key not in own:
            skipped.append(key)
            continue
        target = own[key]
        if value.ndim == 4 and value.shape[1] != target.shape[1] and target.shape[1] == 1:
            value = value.sum(dim=1, keepdim=True)  # 3-channel stem -> 1 channel
        if value.shape != target.shape:
            skipped.append(key)
            continue
        fitted[key] = value
    if not fitted:
        raise ModelError(f"no weight in {path} fits the {what} (first keys: {list(state)[:3]})")
    module.load_state_dict(fitted, strict=False)


# -- builders -----------------------------------------------------------------------------------

def _smp(arch: str, encoder: str) -> Callable[[int, int, str | None], nn.Module]:
    def build(in_chans: int, num_classes: int, pretrained: str | None) -> nn.Module:
        import segmentation_models_pytorch as smp

        model = smp.create_model(
            arch, encoder_name=encoder, in_channels=in_chans, classes=1,
            encoder_weights="imagenet" if pretrained == "hub" else None,
        )
        if pretrained not in (None, "hub"):
            state = read_state_dict(pretrained)
            if any(k.startswith(("decoder.", "segmentation_head.")) for k in state):
                load_fitting(model, state, pretrained)  # a whole segmentation model (our own checkpoint)
            else:
                load_encoder_weights(model.encoder, pretrained)
        return model

    return build


def _timm(name: str) -> Callable[[int, int, str | None], nn.Module]:
    def build(in_chans: int, num_classes: int, pretrained: str | None) -> nn.Module:
        import timm

        kwargs: dict = {"in_chans": in_chans, "num_classes": num_classes}
        if pretrained == "hub":
            kwargs["pretrained"] = True
        elif pretrained is not None:
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained)})
        return timm.create_model(name, **kwargs)

    return build


class TinyConvNet(nn.Module):
    """One convolution: the floor a real model must clearly beat (and a fast test model)."""

    def __init__(self, in_chans: int, num_classes: int, segmentation: bool) -> None:
        super().__init__()
        self.segmentation = segmentation
        self.conv = nn.Conv2d(in_chans, 1 if segmentation else 8, kernel_size=3, padding=1)
        self.head = None if segmentation else nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.segmentation:
            return y
        return self.head(torch.relu(y).mean(dim=(2, 3)))


class SmallUNet(nn.Module):
    """A three-level U-Net of ~25k weights: small enough for a one-minute sweep on 2 CPU cores,
    deep enough to see a whole lung (one convolution cannot tell the lungs from the dark air
    around the body, and collapses to background). BatchNorm like the smp models, so
    ``model.norm: group`` and FedBN treat it the same way."""

    def __init__(self, in_chans: int, width: int = 8) -> None:
        super().__init__()

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        w = width
        self.down = nn.ModuleList([block(in_chans, w), block(w, 2 * w), block(2 * w, 4 * w)])
        self.up = nn.ModuleList([block(6 * w, 2 * w), block(3 * w, w)])
        self.head = nn.Conv2d(w, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, stage in enumerate(self.down):
            x = stage(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        for stage, skip in zip(self.up, reversed(skips[:-1])):
            x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = stage(torch.cat([x, skip], dim=1))
        return self.head(x)


register(ModelSpec("small-unet-seg", "segmentation", lambda c, k, p: SmallUNet(c), "down.2"))

for _arch, _enc, _paper in (
    ("unetplusplus", "efficientnet-b4", True),
    ("unet", "resnet18", False),
    ("unet", "resnet34", False),
    ("unetplusplus", "resnet34", False),
    ("unet", "efficientnet-b0", False),
):
    register(ModelSpec(f"{_arch}-{_enc}", "segmentation", _smp(_arch, _enc), "encoder", _paper))

for _name, _layer, _paper in (
    ("resnet50", "layer4.-1", True),
    ("densenet121", "features", True),
    ("resnet18", "layer4.-1", False),
    ("resnet34", "layer4.-1", False),
    ("efficientnet_b0", "conv_head", False),
):
    register(ModelSpec(_name, "classification", _timm(_name), _layer, _paper))

register(ModelSpec("tiny-conv-seg", "segmentation", lambda c, k, p: TinyConvNet(c, k, True), "conv"))
register(ModelSpec("tiny-conv", "classification", lambda c, k, p: TinyConvNet(c, k, False), "conv"))
