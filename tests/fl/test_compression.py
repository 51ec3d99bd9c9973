"""Update compression (``fl.compression``): codecs round-trip a real ResNet18 update within their
error bounds at about 1/2 (fp16) and 1/4 (int8) of the float32 bytes, the server decodes replies
into twins (received replies untouched) that Flower's FedAvg averages to the true mean within the
bound, and the client wrapper sends exactly what the inner work would, encoded.

Bounds per element (w: the client's weight, g: the global, d = w - g, decoded r):
  fp16  |r - w| <= (2^-11 + 2^-23) |d| + 2^-25 + 2^-24 |w|   (float16 rounding of d, normal or
                   subnormal; float32 roundings of w - g and g + d16)
  int8  |r - w| <= s / 2 (1 + 2^-13) + 2^-24 |w|,  s = max|d| / 127 per tensor (float32 roundings
                   of w - g, d / s, q s and g + q s)
Measured on a ResNet18 (1e-3 relative updates): the worst element reaches 0.998 (fp16) and 1.000
(int8) of its bound; sent bytes are 0.5001 (fp16) and 0.2505 (int8) of float32's.
No Ray, no training: real torch tensors and Flower records.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from cxrfl_ray.config import build_config
from cxrfl_ray.fl.algorithms.base import ClientRound, trainable_state
from cxrfl_ray.fl.arrays import npy_record, view
from cxrfl_ray.fl.compression import (SCALE_SUFFIX, CompressedWork, compressed_work, decode, decode_replies,
                                      encode)
from cxrfl_ray.fl.strategies import make_strategy
from cxrfl_ray.tasks.models import create_model
from tests.fl.messages import train_reply

F32 = 2.0 ** -24  # float32 unit roundoff


@pytest.fixture(scope="module")
def resnet():
    """A ResNet18's full state (num_batches_tracked included) as the global, and a client's
    weights: the global plus a small update (1e-3 relative, as a few local steps give)."""
    torch.manual_seed(0)
    state = create_model("resnet18", "classification", 1, 3).state_dict()
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            v.fill_(7)
    glob = {k: view(a).copy() for k, a in npy_record(state).items()}  # as the server holds it
    gen = torch.Generator().manual_seed(1)
    weights = {k: (v + 1e-3 * (v.abs().mean() + 1e-3) * torch.randn(v.shape, generator=gen)
                   if v.is_floating_point() else v + 3) for k, v in state.items()}
    return glob, weights


def record_bytes(tensors) -> int:
    return sum(len(a.data) for a in npy_record(tensors).values())


def fp16_bound(w: np.ndarray, g: np.ndarray) -> np.ndarray:
    w64 = w.astype(np.float64)
    return ((2.0 ** -11 + 2.0 ** -23) * np.abs(w64 - g) + 2.0 ** -25 + F32 * np.abs(w64)) * (1 + 1e-6)


def int8_bound(w: np.ndarray, g: np.ndarray) -> np.ndarray:
    w64 = w.astype(np.float64)
    scale = np.float32(np.abs(w64 - g).max() / 127)
    return (float(scale) / 2 * (1 + 2.0 ** -13) + F32 * np.abs(w64)) * (1 + 1e-6)


BOUNDS = {"fp16": fp16_bound, "int8": int8_bound}


def round_trip(weights, glob, codec):
    encoded = encode(weights, glob, codec)
    record = npy_record(encoded)  # through the bytes a reply carries
    return encoded, decode({k: view(v) for k, v in record.items()}, glob, codec)


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_round_trip_on_a_resnet18_is_within_the_bound_with_integer_buffers_exact(resnet, codec):
    glob, weights = resnet
    encoded, decoded = round_trip(weights, glob, codec)
    assert set(decoded) == set(glob)
    worst = 0.0
    for k, g in glob.items():
        w, r = weights[k].numpy(), decoded[k]
        assert r.dtype == g.dtype and r.shape == g.shape, k
        if not np.issubdtype(g.dtype, np.floating):
            assert encoded[k].dtype == torch.int64 and np.array_equal(r, w.reshape(r.shape)), k  # passed as it is
            assert k + SCALE_SUFFIX not in encoded
            continue
        assert encoded[k].dtype == {"fp16": torch.float16, "int8": torch.int8}[codec], k
        err = np.abs(r.astype(np.float64) - w)
        bound = BOUNDS[codec](w, g)
        assert (err <= bound).all(), (k, float((err / bound).max()))
        worst = max(worst, float((err / bound).max()))
    # The bound is tight, so it would catch a coarser codec (fp16 weights instead of updates
    # err by 2^-11 |w|, a thousand times the bound on these 1e-3 updates).
    assert worst > 0.4, worst
    if codec == "int8":
        k = "fc.weight"
        d = weights[k].numpy().astype(np.float64) - glob[k]
        assert encoded[k + SCALE_SUFFIX].dtype == torch.float32 and encoded[k + SCALE_SUFFIX].numel() == 1
        assert float(encoded[k + SCALE_SUFFIX]) == np.float32(np.abs(d).max() / 127)
        assert int(encoded[k].abs().max()) == 127


def test_fp16_of_updates_is_far_more_accurate_than_fp16_of_weights(resnet):
    """Why the update is coded, not the weights: the relative error of the update."""
    glob, weights = resnet
    _, decoded = round_trip(weights, glob, "fp16")
    num_d = num_w = den = 0.0
    for k, g in glob.items():
        if np.issubdtype(g.dtype, np.floating):
            w = weights[k].numpy().astype(np.float64)
            num_d += float(((decoded[k] - w) ** 2).sum())
            num_w += float(((weights[k].half().numpy().astype(np.float64) - w) ** 2).sum())
            den += float(((w - g) ** 2).sum())
    rel_d, rel_w = (num_d / den) ** 0.5, (num_w / den) ** 0.5
    assert rel_d < 1e-3 and rel_w > 100 * rel_d, (rel_d, rel_w)


@pytest.mark.parametrize("codec, ratio, tol", [("fp16", 0.5, 0.005), ("int8", 0.25, 0.005)])
def test_encoded_bytes_are_a_half_and_a_quarter_of_float32(resnet, codec, ratio, tol):
    """Counted as the server counts them: the bytes of the record sent (npy headers, int8 scales
    and the int64 counters included)."""
    glob, weights = resnet
    plain = record_bytes(weights)
    sent = record_bytes(encode(weights, glob, codec))
    assert ratio <= sent / plain <= ratio + tol, sent / plain
    assert record_bytes(encode(weights, glob, "none")) == plain


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_an_all_zero_update_decodes_to_the_global_exactly(resnet, codec):
    glob, _ = resnet
    same = {k: torch.from_numpy(v.copy()) for k, v in glob.items()}
    encoded, decoded = round_trip(same, glob, codec)
    if codec == "int8":
        assert float(encoded["conv1.weight" + SCALE_SUFFIX]) == 0.0
    for k, g in glob.items():
        assert decoded[k].dtype == g.dtype and np.array_equal(decoded[k], g), k


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_a_non_finite_update_stays_non_finite(codec):
    """So the round's finite check drops it as it drops an uncompressed one."""
    glob = {"a": np.zeros(4, np.float32), "b": np.ones(3, np.float32)}
    weights = {"a": torch.tensor([0.0, np.nan, 1.0, 2.0]), "b": torch.tensor([1.0, 1e6, 1.0])}
    _, decoded = round_trip(weights, glob, codec)
    assert not np.isfinite(decoded["a"]).all()
    if codec == "fp16":  # an update beyond float16's range overflows to inf
        assert np.isinf(decoded["b"][1]) and decoded["b"][0] == 1.0
    else:
        assert np.allclose(decoded["b"], [1.0, 1e6, 1.0], rtol=1e-6)


def test_bad_replies_and_codecs_are_refused_naming_the_key():
    glob = {"w": np.zeros(3, np.float32), "n": np.zeros((), np.int64)}
    good = {k: view(v) for k, v in npy_record(encode({"w": torch.ones(3)}, glob, "int8")).items()}
    with pytest.raises(ValueError, match="stray"):
        decode({**good, "stray": np.zeros(3, np.int8)}, glob, "int8")
    with pytest.raises(ValueError, match=r"w::int8-scale"):
        decode({"w": good["w"]}, glob, "int8")
    with pytest.raises(ValueError, match=r"w::int8-scale"):
        decode({"w": np.zeros(3, np.float16), "w" + SCALE_SUFFIX: good["w" + SCALE_SUFFIX]}, glob, "fp16")
    with pytest.raises(ValueError, match=r"'w'.*float16"):
        decode({"w": np.zeros(3, np.float32)}, glob, "fp16")
    with pytest.raises(ValueError, match=r"'w'.*shape"):
        decode({"w": np.zeros(4, np.float16)}, glob, "fp16")
    with pytest.raises(ValueError, match="other"):
        encode({"other": torch.ones(3)}, glob, "fp16")
    with pytest.raises(ValueError, match="fl.compression"):
        encode({"w": torch.ones(3)}, glob, "int4")
    assert np.array_equal(decode({"w": np.ones(3, np.float16)}, glob, "fp16")["w"], np.ones(3, np.float32))


def small_model_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return trainable_state(create_model("resnet18", "classification", 1, 3))


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_decoded_replies_are_twins_and_fedavg_of_them_is_the_true_mean_within_the_bound(codec):
    glob_t = small_model_state(0)
    glob = {k: v.numpy().copy() for k, v in glob_t.items()}
    arrays = npy_record(glob_t)
    gen = torch.Generator().manual_seed(2)
    true = [{k: v + 1e-3 * (i + 1) * torch.randn(v.shape, generator=gen) for k, v in glob_t.items()}
            for i in range(2)]
    examples = [30, 10]
    replies = [train_reply(cid, {"arrays": npy_record(encode(w, glob, codec))}, **{"num-examples": n,
                                                                                       "train_loss": 1.0})
               for cid, (w, n) in enumerate(zip(true, examples))]
    before = [(r.content["arrays"], {k: bytes(a.data) for k, a in r.content["arrays"].items()}) for r in replies]

    twins = decode_replies(replies, arrays, codec)

    for reply, twin, (record, data), w in zip(replies, twins, before, true):
        assert twin is not reply and reply.content["arrays"] is record  # the received reply keeps its record
        assert {k: bytes(a.data) for k, a in reply.content["arrays"].items()} == data
        assert twin.content["metrics"] is reply.content["metrics"] and twin.metadata == reply.metadata
        got = {k: view(a) for k, a in twin.content["arrays"].items()}
        assert set(got) == set(glob)
        for k in glob:
            assert got[k].dtype == np.float32
            assert (np.abs(got[k].astype(np.float64) - w[k].numpy()) <= BOUNDS[codec](w[k].numpy(), glob[k])).all(), k

    strategy = make_strategy("fedavg", {}, num_clients=2, per_round=2, seed=0, client_eval=False)
    aggregated, _ = strategy.aggregate_train(1, twins)
    share = np.asarray(examples, np.float64) / sum(examples)
    for k, a in aggregated.items():
        mean = sum(s * w[k].numpy().astype(np.float64) for s, w in zip(share, true))
        bound = sum(s * BOUNDS[codec](w[k].numpy(), glob[k]) for s, w in zip(share, true)) + F32 * np.abs(mean)
        assert (np.abs(view(a) - mean) <= bound * 1.01).all(), k


def test_no_compression_returns_the_same_replies_and_the_same_work():
    glob = small_model_state(0)
    replies = [train_reply(0, {"arrays": npy_record(glob)}, **{"num-examples": 1})]
    out = decode_replies(replies, npy_record(glob), "none")
    assert out is replies and out[0] is replies[0]
    work = object()
    assert compressed_work(build_config({}), work, None) is work
    assert encode(glob, {}, "none") is glob


class FedBNLike:
    """Inner local work that keeps BatchNorm keys home and, like FedBN's ``begin``, changes the
    model before training (the client's own BN loaded; here a sent tensor too, ``fc.bias``, so an
    update taken against the model rather than the message would decode 5 off)."""

    def __init__(self, ctx) -> None:
        self.ctx, self.calls = ctx, []
        self.local = [k for k in trainable_state(ctx.model) if ".bn" in k or k.startswith("bn1.")]

    def begin(self):
        self.calls.append("begin")
        with torch.no_grad():
            for k, v in self.ctx.model.state_dict().items():
                if (k in self.local or k == "fc.bias") and v.is_floating_point():
                    v.add_(5.0)

    def loss_term(self, model):
        self.calls.append("loss_term")
        return torch.tensor(0.5)

    def batch_loss(self, loss_fn, outputs, targets):
        return torch.tensor(2.0)

    def before_step(self, model, optimizer):
        self.calls.append("before_step")

    def reply_weights(self):
        return {k: v for k, v in trainable_state(self.ctx.model).items() if k not in self.local}

    def finish(self, fit):
        self.calls.append("finish")
        return {"extra": npy_record({"x": torch.ones(2)})}


def test_compressed_work_sends_the_inner_works_keys_encoded_against_the_message():
    model = create_model("resnet18", "classification", 1, 3)
    glob = {k: v.clone() for k, v in trainable_state(model).items()}
    cfg = build_config({"fl": {"compression": "int8"}})
    ctx = ClientRound(0, 1, model, cfg, RecordDict({"arrays": npy_record(glob)}), None)
    inner = FedBNLike(ctx)
    work = compressed_work(cfg, inner, ctx)
    assert isinstance(work, CompressedWork)

    work.begin()
    with torch.no_grad():  # "training": every sent tensor moves
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                v.add_(1e-3 * torch.randn_like(v))
    assert work.loss_term(model).item() == 0.5 and work.batch_loss(None, None, None).item() == 2.0
    work.before_step(model, None)
    assert "extra" in work.finish({})
    assert inner.calls == ["begin", "loss_term", "before_step", "finish"] and work.local is inner.local

    sent = work.reply_weights()
    expected = inner.reply_weights()
    assert inner.local and not set(inner.local) & set(expected)
    assert set(sent) == set(expected) | {k + SCALE_SUFFIX for k in expected}
    got = decode({k: v.numpy() for k, v in sent.items()}, {k: v.numpy() for k, v in glob.items()}, "int8")
    for k, w in expected.items():  # against the message's global, not the model begin changed
        assert (np.abs(got[k] - w.numpy()) <= int8_bound(w.numpy(), glob[k].numpy())).all(), k
