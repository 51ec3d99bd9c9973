"""A client model whose weights live in one buffer, laid out as ``arrays.pack`` lays out a record.

Then the round's global weights (one packed buffer, mapped from Ray's object store) go into the
model with one copy, and the reply is the model's buffer as it is: Ray copies it once into its
store, with no pack before (a ResNet50 message: 320 ``copy_`` calls and a 94 MB pack saved).

Each parameter's and buffer's tensor becomes a typed view of its part of the buffer (``.data`` of
a parameter; the module's buffer entry). Training, optimizers, Opacus' hooks and
``load_state_dict`` write through the views as before. Anything that moves a tensor out of the
buffer (``model.to(...)``, a replaced buffer) is noticed (``intact``) and the slow paths are used.
"""

from __future__ import annotations

import warnings

import torch
from flwr.app import ArrayRecord

from cxrfl_ray.fl.algorithms.base import trainable_state
from cxrfl_ray.fl.arrays import Index, is_raw, layout, nbytes, packed, record_like, unpack


class FlatWeights:
    """The model's trainable state (``trainable_state``) re-homed into one uint8 buffer on its
    device; a model that cannot be (shared tensors, a dtype numpy lacks) is left as it is and every
    method takes the usual path."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.index: Index | None = None
        self._slots: list[tuple[dict, str, int]] = []  # (module's parameters or buffers, name, offset)
        state = trainable_state(model)
        dtypes = {k: _numpy_dtype(v.dtype) for k, v in state.items()}
        if not state or None in dtypes.values() or len({v.data_ptr() for v in state.values()}) < len(state):
            return
        index, size = layout((k, dtypes[k], tuple(v.shape)) for k, v in state.items())
        device = next(iter(state.values())).device
        self.buffer = torch.zeros(size, dtype=torch.uint8, device=device)
        for key, _, shape, start in index:
            tensor = self._part(start, state[key].dtype, shape)
            tensor.copy_(state[key])
            self._rehome(key, tensor, start)
        # a GPU model's reply is copied to the host once, into pinned memory kept for every reply
        self.host = self.buffer if device.type == "cpu" else torch.empty(size, dtype=torch.uint8, pin_memory=True)
        self.index = index

    def _part(self, start: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
        count = nbytes(_numpy_dtype(dtype), shape)
        return self.buffer[start:start + count].view(dtype).view(shape)

    def _rehome(self, key: str, tensor: torch.Tensor, start: int) -> None:
        prefix, _, name = key.rpartition(".")
        module = self.model.get_submodule(prefix)
        if name in module._parameters:
            module._parameters[name].data = tensor
            self._slots.append((module._parameters, name, start))
        else:
            module._buffers[name] = tensor
            self._slots.append((module._buffers, name, start))

    def intact(self) -> bool:
        """Every tensor of the state still lies where it was put (nothing moved the model)."""
        if self.index is None:
            return False
        base = self.buffer.data_ptr()
        return all(entries[name] is not None and entries[name].data_ptr() == base + start
                   for entries, name, start in self._slots)

    def load(self, arrays: ArrayRecord) -> bool:
        """Copy global weights packed in this layout into the model in one copy; False (nothing
        done) for any other record."""
        hint = packed(arrays)
        if hint is None or hint[0] != self.index or not self.intact():
            return False
        with warnings.catch_warnings():  # the mapped buffer is read-only; it is only read
            warnings.simplefilter("ignore", UserWarning)
            self.buffer.copy_(torch.from_numpy(hint[1]))
        return True

    def record_like(self, tensors: dict[str, torch.Tensor], like: ArrayRecord) -> ArrayRecord:
        """``arrays.record_like``; when the reply is raw and is the model's whole state as it lies
        in the buffer, the buffer itself (on a GPU, one copy to the host)."""
        if not is_raw(like) or list(tensors) != [k for k, *_ in (self.index or [])] or not self._holds(tensors):
            return record_like(tensors, like)
        if self.host is not self.buffer:
            self.host.copy_(self.buffer)
        return unpack(self.index, self.host.numpy())

    def _holds(self, tensors: dict[str, torch.Tensor]) -> bool:
        base = self.buffer.data_ptr()
        return all(tensors[key].data_ptr() == base + start for key, _, _, start in self.index)


def _numpy_dtype(dtype: torch.dtype) -> str | None:
    try:
        return str(torch.empty(0, dtype=dtype).numpy().dtype)
    except TypeError:  # bfloat16 and others numpy has no type for
        return None

