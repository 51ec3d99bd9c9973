"""Update compression (``fl.compression``): a client's update goes back smaller, and the server
decodes it before anything else reads it, so aggregation, privacy and the algorithms see weights.

client side (``fl/client``)                      server side (``fl/rounds``)
  compressed_work(cfg, work, ctx)  wraps the      decode_replies(replies, arrays, codec)
  algorithm's local work: its reply_weights()     -> twin replies with decoded float weights
  encoded against the round's global weights      (the received replies untouched: their bytes
                                                   are what the round's accounting counts)

Codecs, on each floating tensor's update d = w - g (g: the round's global, which both sides hold
bit for bit: the client's copy is the message it received):

- ``none``: the weights as they are (nothing wraps or copies: the plain run, bit for bit).
- ``fp16``: d in float16, decoded as g + d. The update, not the weights: an update is small next
  to its weight, and float16's 11-bit mantissa rounds a weight by up to 2^-11 |w|, as much as a
  small update itself. Measured on a ResNet18 after 5 local steps (random images), the relative
  L2 error of the update was 13% (SGD lr 0.01), 3.6% (Adam 1e-4), 45% (Adam 1e-5) with float16
  weights, and 0.02 - 0.14% with float16 updates; and rounded weights would round every client
  alike, so the error would not average out. Error per element: |d16 - d| <= 2^-11 |d| (|d| >= 2^-14, float16's
  normal range) or <= 2^-25 (below it), plus the float32 roundings of w - g and g + d16
  (<= 2^-24 |d| + 2^-24 |w|).
  An update beyond float16's range (|d| > 65504) becomes inf and the round's finite check drops it.
- ``int8``: q = round(d / s) in [-127, 127] with one float32 scale s = max|d| / 127 per tensor
  (s = 0 for an all-zero update, which decodes to g exactly), sent as ``key`` (int8) and
  ``key + SCALE_SUFFIX`` (float32, one element). Error per element <= s / 2 (1 + 2^-13), the
  2^-13 covering float32's roundings of w - g, d / s and q s, plus that of g + q s (<= 2^-24 |w|).
  A non-finite update is sent as scale NaN, so it decodes to NaN and the round's finite check
  drops it as it would have dropped the uncompressed one.

Only floating tensors are coded; integer buffers pass as they are. Records other than
``"arrays"`` (SCAFFOLD's control variates, ...) travel uncompressed. Arithmetic is float32 (the
global's dtype on decoding): float64 would only tighten the bounds by float32's 2^-24 and cost
time (a ResNet18 reply: 2.5 s to encode in float64 numpy).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, RecordDict

from cxrfl_ray.config import ExperimentConfig
from cxrfl_ray.fl.arrays import raw_record, views

CODECS = ("none", "fp16", "int8")
SCALE_SUFFIX = "::int8-scale"  # state-dict keys are dotted identifiers: "::" never occurs in one
WEIGHTS_KEY = "arrays"
INT8_MAX = 127  # symmetric range: -127..127, so q and -q are both representable


def _check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"fl.compression must be one of {', '.join(CODECS)}, not {codec!r}")


def _int8(d: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """One tensor's update as int8 codes and its float32 scale (the decoder's scale exactly)."""
    peak = float(np.max(np.abs(d))) if d.size else 0.0
    if not np.isfinite(peak):  # NaN / inf stay non-finite after decoding (0 * NaN = NaN)
        return np.zeros(d.shape, np.int8), np.float32(np.nan)
    scale = np.float32(peak / INT8_MAX)
    if scale == 0:  # all-zero update (or one below float32's resolution of peak / 127)
        return np.zeros(d.shape, np.int8), np.float32(0.0)
    q = np.clip(np.rint(d / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


def encode(weights: dict[str, torch.Tensor], global_: dict[str, np.ndarray], codec: str) -> dict[str, torch.Tensor]:
    """A reply's weights as ``codec`` sends them (CPU tensors, for ``tensors_record``); ``global_``
    is the round's global, of which ``weights`` may name a subset (FedBN sends no BatchNorm)."""
    _check_codec(codec)
    if codec == "none":
        return weights
    clash = sorted(k for k in weights if k.endswith(SCALE_SUFFIX))
    unknown = sorted(k for k in weights if k not in global_)
    if clash or unknown:
        raise ValueError(f"cannot compress the reply ({codec}): keys not in the round's global weights "
                         f"{(unknown + clash)[:5]}")
    out: dict[str, torch.Tensor] = {}
    for k, tensor in weights.items():
        g = global_[k]
        if tensor.numel() != g.size:
            raise ValueError(f"cannot compress {k!r}: shape {tuple(tensor.shape)} against the global's {g.shape}")
        g = g.reshape(tensor.shape)  # a record holds a 0-d tensor as shape (1,)
        if not tensor.is_floating_point():
            out[k] = tensor.detach().cpu()
            continue
        d = tensor.detach().to("cpu", torch.float32).numpy() - g.astype(np.float32, copy=False)
        if codec == "fp16":  # torch's cast: numpy's float -> half is software, 10x slower
            out[k] = torch.from_numpy(d).half()  # beyond float16's range: inf, dropped by the finite check
        else:
            q, scale = _int8(d)
            out[k] = torch.from_numpy(q)
            out[k + SCALE_SUFFIX] = torch.tensor([scale], dtype=torch.float32)
    return out


def decode(arrays: dict[str, np.ndarray], global_: dict[str, np.ndarray], codec: str) -> dict[str, np.ndarray]:
    """The weights a reply encoded with ``codec`` stands for, in the global's dtypes and the
    reply's shapes (new arrays, never views of the reply's bytes). A key the global lacks, a code
    without its scale (or a scale without its code), or a tensor of the wrong dtype or size is a
    ``ValueError`` naming it."""
    _check_codec(codec)
    if codec == "none":
        return arrays
    scales = {k[: -len(SCALE_SUFFIX)] for k in arrays if k.endswith(SCALE_SUFFIX)}
    keys = [k for k in arrays if not k.endswith(SCALE_SUFFIX)]
    unknown = sorted(k for k in keys if k not in global_)
    orphan = sorted(k + SCALE_SUFFIX for k in scales if k not in arrays)
    if unknown or orphan:
        raise ValueError(f"cannot decode the {codec} reply: keys not in the round's global weights "
                         f"{(unknown + orphan)[:5]}")
    floats = [k for k in keys if np.issubdtype(global_[k].dtype, np.floating)]
    missing = sorted(k + SCALE_SUFFIX for k in floats if k not in scales) if codec == "int8" else []
    extra = sorted(k + SCALE_SUFFIX for k in scales if k not in floats or codec != "int8")
    if missing or extra:
        raise ValueError(f"cannot decode the {codec} reply: missing {missing[:5]}, unexpected {extra[:5]}")
    want = {"fp16": np.float16, "int8": np.int8}[codec]
    out: dict[str, np.ndarray] = {}
    for k in keys:
        a, g = arrays[k], global_[k]
        if a.size != g.size:
            raise ValueError(f"cannot decode {k!r}: shape {a.shape} against the global's {g.shape}")
        g = g.reshape(a.shape)  # the shape the reply would have had uncompressed (0-d: (1,) in a record)
        if k not in floats:
            if a.dtype != g.dtype:
                raise ValueError(f"cannot decode {k!r}: dtype {a.dtype} against the global's {g.dtype}")
            out[k] = np.array(a, copy=True)
            continue
        if a.dtype != want:
            raise ValueError(f"cannot decode {k!r}: a {codec} reply sends {np.dtype(want)}, not {a.dtype}")
        if codec == "fp16":
            d = a.astype(g.dtype)
        else:
            s = arrays[k + SCALE_SUFFIX]
            if s.size != 1 or not np.issubdtype(s.dtype, np.floating):
                raise ValueError(f"cannot decode {k!r}: its scale must be one float, not {s.dtype} {s.shape}")
            d = a.astype(g.dtype) * g.dtype.type(s.reshape(-1)[0])
        out[k] = g + d  # in the global's dtype: one rounding for fp16 (d16 is exact in float32)
    return out


class CompressedWork:
    """An algorithm's local work (``inner``) whose reply travels compressed.

    Not a ``LocalHooks`` subclass on purpose: every attribute but ``begin`` and ``reply_weights``
    (loss_term, batch_loss, before_step, finish, close, ...) is the inner work's, including hooks
    added to ``LocalHooks`` later, which a subclass would silently answer with the base's no-op.
    The update is taken against the training message's global arrays (``ctx.content["arrays"]``),
    the very bytes the server decodes against, not against the model: an algorithm's ``begin``
    may change the model (FedBN loads the client's own BatchNorm). Read-only views of that
    message, no copy; the keys are the inner reply's, at reply time."""

    def __init__(self, inner: Any, ctx, codec: str) -> None:
        _check_codec(codec)
        self.inner, self.ctx, self.codec = inner, ctx, codec
        self.global_: dict[str, np.ndarray] | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copy / unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def begin(self) -> None:
        self.inner.begin()

        self.global_ = views(self.ctx.content[WEIGHTS_KEY])

    def reply_weights(self) -> dict[str, torch.Tensor]:
        if self.global_ is None:
            raise RuntimeError("CompressedWork.reply_weights before begin: no global weights to encode against")
        return encode(self.inner.reply_weights(), self.global_, self.codec)


def compressed_work(cfg: ExperimentConfig, work: Any, ctx) -> Any:
    """The local work ``work`` for ``ctx`` (a ``ClientRound``) as ``fl.compression`` sends its
    reply: ``work`` itself for ``none``."""
    codec = cfg.fl.compression
    return work if codec == "none" else CompressedWork(work, ctx, codec)


def decode_replies(replies: list[Message], arrays: ArrayRecord, codec: str) -> list[Message]:
    """The round's replies with decoded weights, against the round's global ``arrays``: for each
    a twin Message (new content, the same metrics and other records) so the received replies keep
    their records (their bytes are the round's communication, their metrics are logged). Replies
    with an error pass as they are. ``none``: the same list, the same objects."""
    _check_codec(codec)
    if codec == "none":
        return replies

    glob = views(arrays)
    out = []
    for reply in replies:
        if reply.has_error():
            out.append(reply)
            continue
        if WEIGHTS_KEY not in reply.content:
            raise ValueError(f"cannot decode a reply without an {WEIGHTS_KEY!r} record")
        received = views(reply.content[WEIGHTS_KEY])
        decoded = decode(received, glob, codec)
        content = RecordDict(dict(reply.content))
        content[WEIGHTS_KEY] = raw_record(decoded)  # read by the aggregation only
        twin = copy.copy(reply)
        twin.content = content
        out.append(twin)
    return out
