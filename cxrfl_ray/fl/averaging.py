"""FedAvg's weighted average over replies packed in one buffer each (our backend's replies).

Bit for bit Flower's ``aggregate_arrayrecords`` (the same factors ``w / sum(w)``, the same ufuncs
and dtypes, the replies added in the same order), but over the buffers as they are mapped from
Ray's object store: each run of same-dtype arrays is one span, done in cache-sized chunks into
one output buffer, instead of a new temporary array per array per reply (a ResNet18 round of 10
replies: 20 full-size temporaries in Flower's). The result is a packed record, so it goes into
the object store for the next round without another pack.
"""

from __future__ import annotations

import functools

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from cxrfl_ray.fl.arrays import Index, layout, nbytes, packed, unpack

CHUNK = 1 << 15  # elements a step: the output chunk and one reply's product stay in L2 across replies


def packed_average(contents: list[RecordDict], weighting_key: str) -> ArrayRecord | None:
    """The weighted average of the replies' one ArrayRecord each, or None (Flower's function is
    then the one to use) unless every reply's record lies packed in a buffer of the same layout."""
    hints = []
    for content in contents:
        records = list(content.array_records.values())
        hint = packed(records[0]) if len(records) == 1 else None
        if hint is None or (hints and hint[0] != hints[0][0]):
            return None
        hints.append(hint)
    if not hints:
        return None
    weights = [next(iter(content.metric_records.values()))[weighting_key] for content in contents]
    total = sum(weights)
    factors = [w / total for w in weights]  # as Flower computes them
    index = hints[0][0]
    out_index, size = layout((key, _scaled(dtype), shape) for key, dtype, shape, _ in index)
    out = np.zeros(size, dtype=np.uint8)  # the padding stays zero
    for in_dtype, out_dtype, in_start, out_start, count in _spans(index, out_index):
        sources = [buffer[in_start:in_start + count * np.dtype(in_dtype).itemsize].view(in_dtype)
                   for _, buffer in hints]
        _weighted_sum(sources, factors, out[out_start:out_start + count * np.dtype(out_dtype).itemsize].view(out_dtype))
    return unpack(out_index, out)


@functools.cache
def _scaled(dtype: str) -> str:
    """The dtype of ``array * python_float`` (Flower's average of an int64 array is float64)."""
    return str((np.zeros(1, dtype=dtype) * 0.5).dtype)


def _spans(index: Index, out_index: Index) -> list[tuple[str, str, int, int, int]]:
    """(input dtype, output dtype, input byte offset, output byte offset, elements): one span for
    each run of arrays that keep their dtype and offset (the zero padding between them averaged
    along: offsets are multiples of 64, so padding is whole elements), one for each other array."""
    spans: list[list] = []
    for (_, dtype, shape, start), (_, out_dtype, _, out_start) in zip(index, out_index):
        size = np.dtype(dtype).itemsize
        count = nbytes(dtype, shape) // size
        kept = dtype == out_dtype and start == out_start
        if kept and spans and spans[-1][5] and spans[-1][0] == dtype:
            spans[-1][4] = (start - spans[-1][2]) // size + count
        else:
            spans.append([dtype, out_dtype, start, out_start, count, kept])
    return [tuple(span[:5]) for span in spans]


def _weighted_sum(sources: list[np.ndarray], factors: list[float], out: np.ndarray) -> None:
    """``out = s0 * f0``, then ``out += s * f`` for each next source: Flower's arithmetic, chunked."""
    scratch = np.empty(min(CHUNK, out.size), dtype=out.dtype)
    for lo in range(0, out.size, CHUNK):
        hi = min(lo + CHUNK, out.size)
        dst, tmp = out[lo:hi], scratch[:hi - lo]
        np.multiply(sources[0][lo:hi], factors[0], out=dst)
        for source, factor in zip(sources[1:], factors[1:]):
            np.multiply(source[lo:hi], factor, out=tmp)
            np.add(dst, tmp, out=dst)
