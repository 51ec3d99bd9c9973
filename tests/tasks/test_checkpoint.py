"""Checkpoints: safetensors only, carry model and config, refuse the wrong task or shape."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from cxrfl_ray.config import build_config
from cxrfl_ray.tasks.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cxrfl_ray.tasks.models import create_model


def test_round_trip_gives_the_same_model(tmp_path):
    cfg = build_config({"model": {"name": "resnet18"}, "data": {"size": 32}})
    model = create_model("resnet18", "classification", 1, 3).eval()
    path = save_checkpoint(tmp_path / "m.safetensors", model, cfg, 3, ["a", "b", "c"], info={"epoch": 4})
    loaded, cfg2, meta = load_checkpoint(path, task="classification")
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), model(x))
    assert cfg2 == cfg and meta["label_names"] == '["a", "b", "c"]'


def test_wrong_task_wrong_shape_and_foreign_files(tmp_path):
    cfg = build_config({"model": {"name": "tiny-conv"}})
    path = save_checkpoint(tmp_path / "c.safetensors", create_model("tiny-conv", "classification", 1, 3), cfg, 3, [])
    with pytest.raises(CheckpointError, match="holds a classification model \\(tiny-conv\\), but a segmentation model is needed"):
        load_checkpoint(path, task="segmentation")
    # Same metadata, weights of another shape: says the weights do not fit.
    small = create_model("tiny-conv", "classification", 1, 5)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(CheckpointError, match="weights do not fit model tiny-conv"):
        load_checkpoint(tmp_path / "bad.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="not a cxrfl checkpoint"):
        load_checkpoint(tmp_path / "foreign.safetensors")
    (tmp_path / "pickle.pth").write_bytes(b"\x80\x04junk")
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        load_checkpoint(tmp_path / "pickle.pth")


def test_a_model_with_non_finite_weights_is_never_written(tmp_path):
    cfg = build_config({"model": {"name": "tiny-conv"}})
    model = create_model("tiny-conv", "classification", 1, 3)
    name, param = next(iter(model.named_parameters()))
    with torch.no_grad():
        param.view(-1)[0] = float("inf")
    with pytest.raises(CheckpointError, match=f"not saved, the model's {name} holds non-finite values"):
        save_checkpoint(tmp_path / "best.safetensors", model, cfg, 3, ["a", "b", "c"])
    assert list(tmp_path.iterdir()) == []
