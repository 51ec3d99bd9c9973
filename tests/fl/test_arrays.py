"""Raw and npy forms of weights in Flower's records (fl/arrays.py): the same values either way,
raw without copies, and Flower's own aggregation reads both to the same bits."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from cxrfl_ray.fl.arrays import (RAW, RawArray, as_raw, npy_record, raw_record, record_like, record_of, torch_views,
                                 view, views, wire_size)


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "bn.running_var": torch.rand(4, generator=g),
            "counts": torch.arange(6, dtype=torch.int64).reshape(2, 3).t(),  # not contiguous
            "scalar": torch.tensor(2.5)}


def test_raw_arrays_are_views_of_the_tensors_and_read_only():
    t = tensors(0)
    record = raw_record(t)
    assert all(isinstance(record[k], RawArray) and record[k].stype == RAW for k in t)
    assert np.shares_memory(view(record["conv.weight"]), t["conv.weight"].numpy())  # no copy
    assert not np.shares_memory(view(record["counts"]), t["counts"].numpy())  # made contiguous: one copy
    for key, value in t.items():
        got = view(record[key])
        assert np.array_equal(got, value.numpy()) and got.dtype == value.numpy().dtype and got.shape == tuple(value.shape)
        assert not got.flags.writeable
    npy = npy_record(t)
    assert [wire_size(record[k]) for k in t] == [len(npy[k].data) for k in t]  # traffic counted in Flower's form
    assert sum(len(record[k].data) for k in t) == sum(v.numel() * v.element_size() for v in t.values())  # no header
    with pytest.raises(ValueError, match="read-only"):
        record["bn.running_var"].numpy()[0] = 1.0


def test_npy_record_is_flowers_bytes_and_both_forms_hold_the_same_values():
    t = tensors(1)
    npy, stock = npy_record(t), ArrayRecord({k: v.contiguous() for k, v in t.items()})
    assert all(npy[k].data == stock[k].data for k in t)  # Flower's np.save bytes, byte for byte
    raw = as_raw(npy)
    assert all(isinstance(raw[k], RawArray) for k in t) and as_raw(raw) is raw
    assert np.shares_memory(view(raw["conv.weight"]), np.frombuffer(npy["conv.weight"].data, np.uint8))  # a view
    assert raw == raw and all(raw[k] == npy[k] for k in t)
    for key in t:
        assert torch.equal(torch_views(raw)[key], torch_views(npy)[key])


def test_a_record_keeps_raw_arrays_and_pickles_them_whole():
    raw = raw_record(tensors(2))
    with pytest.raises(TypeError):  # Flower's ArrayRecord(dict) rebuilds each Array from bytes: it refuses raw ones
        ArrayRecord({"x": raw["scalar"]})
    kept = record_of({"x": raw["scalar"], "y": npy_record({"y": torch.ones(2)})["y"]})
    assert type(kept["x"]) is RawArray and type(kept["y"]) is Array
    back = pickle.loads(pickle.dumps(raw))
    assert all(type(back[k]) is RawArray and np.array_equal(view(back[k]), view(raw[k])) for k in raw)


def test_a_reply_takes_the_form_its_global_weights_came_in():
    t = tensors(3)
    assert all(isinstance(v, RawArray) for v in record_like(t, like=raw_record(t)).values())
    assert all(type(v) is Array for v in record_like(t, like=npy_record(t)).values())


def test_flowers_fedavg_aggregates_raw_replies_to_the_same_bits_as_npy_replies():
    replies = [tensors(seed) for seed in (4, 5, 6)]
    replies = [{k: v for k, v in r.items() if v.is_floating_point()} for r in replies]
    examples = [3, 10, 7]

    def contents(make):
        return [RecordDict({"arrays": make(r), "metrics": MetricRecord({"num-examples": n})})
                for r, n in zip(replies, examples)]

    from_raw = aggregate_arrayrecords(contents(raw_record), "num-examples")
    from_npy = aggregate_arrayrecords(contents(npy_record), "num-examples")
    assert list(from_raw) == list(from_npy)
    for key in from_npy:
        assert from_raw[key].data == from_npy[key].data, key  # identical bytes
    mean = sum(r["conv.weight"].numpy() * (n / sum(examples)) for r, n in zip(replies, examples))
    np.testing.assert_allclose(views(from_raw)["conv.weight"], mean, rtol=1e-6)


def test_a_packed_record_is_one_aligned_buffer_whose_views_hold_every_array():
    from cxrfl_ray.fl.arrays import ALIGN, pack, unpack

    t = tensors(7)
    index, buffer = pack(raw_record(t))
    assert buffer.dtype == np.uint8 and buffer.ndim == 1
    assert [k for k, *_ in index] == list(t) and all(offset % ALIGN == 0 for *_, offset in index)
    back = unpack(index, buffer)
    assert list(back) == list(t)
    for key, value in t.items():
        got = view(back[key])
        assert np.array_equal(got, value.numpy()) and got.dtype == value.numpy().dtype and got.shape == tuple(value.shape)
        assert np.shares_memory(got, buffer)  # a view of the one buffer, not a copy
    assert unpack(*pack(npy_record(t))) == back  # the npy form packs to the same arrays


def test_a_record_unpacked_from_a_buffer_packs_to_that_buffer_until_an_array_is_replaced():
    from cxrfl_ray.fl.arrays import pack, unpack

    t = tensors(8)
    index, buffer = pack(raw_record(t))
    ends = [o for *_, o in index[1:]] + [buffer.size]
    for (_, dtype, shape, start), end in zip(index, ends):  # padding is zeros: the same bytes every run
        used = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        assert not buffer[start + used:end].any()
    back = unpack(index, buffer)
    again_index, again = pack(back)
    assert again is buffer and again_index == index  # no copy
    back["scalar"] = RawArray(np.array(1.0))
    new_index, copied = pack(back)
    assert copied is not buffer and view(unpack(new_index, copied)["scalar"]) == 1.0


def _packed_replies(replies: list[dict[str, torch.Tensor]], examples: list[int]):
    from cxrfl_ray.fl.arrays import pack, unpack

    return [RecordDict({"arrays": unpack(*pack(raw_record(r))), "metrics": MetricRecord({"num-examples": n})})
            for r, n in zip(replies, examples)]


def test_the_packed_average_is_flowers_fedavg_bit_for_bit_with_its_dtypes():
    from cxrfl_ray.fl.arrays import packed
    from cxrfl_ray.fl.averaging import CHUNK, packed_average

    def reply(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {**tensors(seed), "half": torch.randn(5, generator=g).half(),  # a dtype of its own
                "big": torch.randn(CHUNK * 2 + 13, generator=g),  # spans several chunks
                "odd": torch.randn(3, generator=g), "flag": torch.tensor([True, False]), "tail": torch.randn(7, generator=g)}

    replies, examples = [reply(s) for s in (11, 12, 13, 14)], [5, 9, 2, 31]
    contents = _packed_replies(replies, examples)
    ours = packed_average(contents, "num-examples")
    flowers = aggregate_arrayrecords([RecordDict({"arrays": npy_record(r), "metrics": MetricRecord({"num-examples": n})})
                                      for r, n in zip(replies, examples)], "num-examples")
    assert packed(ours) is not None and list(ours) == list(flowers)
    for key in flowers:
        theirs = flowers[key].numpy()
        got = view(ours[key])
        assert got.dtype == theirs.dtype and got.shape == theirs.shape, key  # int64 and bool average to float64
        assert got.tobytes() == theirs.tobytes(), key
    assert view(ours["counts"]).dtype == np.float64 and view(ours["half"]).dtype == np.float16
    np.testing.assert_allclose(view(ours["big"]), sum(r["big"].numpy() * (n / sum(examples))
                                                      for r, n in zip(replies, examples)), rtol=1e-5, atol=1e-6)


def test_the_packed_average_leaves_replies_it_cannot_read_to_flower():
    from cxrfl_ray.fl.averaging import packed_average

    replies, examples = [tensors(s) for s in (1, 2)], [1, 2]
    assert packed_average([RecordDict({"arrays": npy_record(r), "metrics": MetricRecord({"num-examples": n})})
                           for r, n in zip(replies, examples)], "num-examples") is None
    mixed = _packed_replies(replies, examples)
    mixed[1]["arrays"] = raw_record({k: v for k, v in replies[1].items() if k != "scalar"})  # not packed
    assert packed_average(mixed, "num-examples") is None
    other = _packed_replies([replies[0], {**replies[1], "scalar": torch.tensor([1.0, 2.0])}], examples)
    assert packed_average(other, "num-examples") is None  # two layouts
