"""A client model whose weights live in one packed buffer (fl/flat_weights.py): it trains as
before, loads a packed global with one copy and replies with its own buffer."""

from __future__ import annotations

import numpy as np
import torch

from cxrfl_ray.fl.algorithms.base import trainable_state
from cxrfl_ray.fl.arrays import npy_record, pack, packed, raw_record, unpack, view
from cxrfl_ray.fl.flat_weights import FlatWeights
from cxrfl_ray.tasks.models import create_model


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("resnet18", "classification", 1, 3)


def train_steps(net: torch.nn.Module, steps: int = 2) -> torch.Tensor:
    torch.manual_seed(99)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net.train()
    for _ in range(steps):
        x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 1])
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
    return loss.detach()


def test_a_flat_model_keeps_its_values_and_trains_to_the_same_bits():
    plain, flat_net = model(0), model(0)
    before = {k: v.clone() for k, v in trainable_state(flat_net).items()}
    flat = FlatWeights(flat_net)
    assert flat.intact()
    for key, value in trainable_state(flat_net).items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(train_steps(plain), train_steps(flat_net))  # the same losses
    for key, value in trainable_state(plain).items():  # and weights and BN statistics, bit for bit
        assert torch.equal(trainable_state(flat_net)[key], value), key
    assert flat.intact()  # training wrote through the views


def test_a_packed_global_loads_with_one_copy_and_the_reply_is_the_models_buffer():
    net, source = model(0), model(1)
    flat = FlatWeights(net)
    global_ = unpack(*pack(raw_record(trainable_state(source))))
    assert flat.load(global_)
    for key, value in trainable_state(source).items():
        assert torch.equal(trainable_state(net)[key], value), key
    assert not flat.load(npy_record(trainable_state(source)))  # Flower's form: the usual path loads it

    reply = flat.record_like(trainable_state(net), like=global_)
    index, buffer = packed(reply)
    assert index == flat.index and np.shares_memory(buffer, flat.buffer.numpy())  # no pack, no copy
    assert type(flat.record_like(trainable_state(net), like=npy_record({}))["fc.bias"]).__name__ == "Array"
    part = {k: v for k, v in trainable_state(net).items() if "bn" not in k}  # FedBN's reply: packed on send
    assert packed(flat.record_like(part, like=global_)) is None
    assert np.array_equal(view(reply["fc.weight"]), trainable_state(source)["fc.weight"].numpy())


def test_a_model_moved_out_of_its_buffer_is_noticed_and_loaded_the_usual_way():
    net = model(0)
    flat = FlatWeights(net)
    net.fc.weight.data = net.fc.weight.data.clone()  # something moved one tensor
    assert not flat.intact()
    assert not flat.load(unpack(*pack(raw_record(trainable_state(model(1))))))
    assert packed(flat.record_like(trainable_state(net), like=raw_record({"x": torch.zeros(1)}))) is None


def test_a_warmed_client_imports_nothing_more_and_replies_with_its_models_buffer(phantoms, tmp_path):
    """The ClientApp's own ``train`` on a packed global (as our backend hands it): the runtime
    built by ``warm`` serves it without importing any module, the global is loaded in one copy
    and the reply is the model's buffer, holding the trained weights."""
    import sys
    import time

    from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

    from cxrfl_ray.fl import client
    from cxrfl_ray.fl.strategies import CLIENT_KEY
    from tests.fl.test_simulate import config

    cfg = config(phantoms(n=40, size=48), tmp_path)
    client.warm(cfg.to_yaml())
    rt = client.runtime(cfg.to_yaml())
    source = create_model(cfg.model.name, cfg.task, cfg.data.channels, rt.prep.num_classes)
    global_ = unpack(*pack(raw_record(trainable_state(source))))
    meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="",
                    created_at=time.time(), ttl=3600.0, message_type=MessageType.TRAIN)
    msg = Message(content=RecordDict({"arrays": global_, "config": ConfigRecord(
        {client.EXPERIMENT_KEY: cfg.to_yaml(), "server-round": 1, CLIENT_KEY: 0})}), metadata=meta)
    before = set(sys.modules)
    reply = client.train(msg, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))
    assert set(sys.modules) - before == set()
    index, buffer = packed(reply.content["arrays"])
    assert index == rt.weights.index and np.shares_memory(buffer, rt.weights.buffer.numpy())
    trained = trainable_state(rt.model)
    assert any(not torch.equal(trained[k], v) for k, v in trainable_state(source).items())  # it trained
    for key, array in reply.content["arrays"].items():
        assert np.array_equal(view(array), trained[key].numpy()), key
