"""Per-client state files: the server's accepted round decides which file a client reads, so a
state written in a round that failed or never finished is never used."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrfl_ray.fl.client_state import (STATE_DIR_KEY, STATE_ROUND_KEY, AcceptedStates, ClientStateStore,
                                       state_bytes)


def test_a_client_reads_its_accepted_round_and_old_files_go_once_a_newer_one_is_accepted(tmp_path):
    store = ClientStateStore(tmp_path, 7)
    assert store.load(0) == {}  # never trained: no state
    store.save(1, {"c": torch.ones(3)}, keep_from=0)
    store.save(2, {"c": torch.full((3,), 2.0)}, keep_from=1)  # round 2 started from round 1's state
    # Round 2 failed on the server: the client still starts round 3 from round 1's state.
    assert torch.equal(store.load(1)["c"], torch.ones(3))
    store.save(3, {"c": np.full(3, 3.0, dtype=np.float32)}, keep_from=1)
    assert sorted(p.name for p in store.dir.iterdir()) == ["000001.safetensors", "000002.safetensors",
                                                           "000003.safetensors"]
    store.save(5, {"c": torch.zeros(3)}, keep_from=3)  # round 3 was accepted: 1 and 2 can go
    assert sorted(p.name for p in store.dir.iterdir()) == ["000003.safetensors", "000005.safetensors"]
    assert torch.equal(store.load(3)["c"], torch.full((3,), 3.0))
    assert state_bytes(tmp_path) == sum(p.stat().st_size for p in store.dir.iterdir())
    with pytest.raises(FileNotFoundError, match="000007/000004.safetensors is missing .*accepted it in round 4"):
        store.load(4)


def test_the_server_sends_each_client_its_own_accepted_round():
    accepted = AcceptedStates(4, "/run/clients")
    accepted.accept(1, [0, 2])
    accepted.accept(2, [2, 3])
    assert accepted.rounds.tolist() == [1, 0, 2, 2]
    assert accepted.message_config(0) == {STATE_ROUND_KEY: 1, STATE_DIR_KEY: "/run/clients"}
    assert AcceptedStates(2, None).message_config(1) == {STATE_ROUND_KEY: 0}  # a site keeps its own folder


def test_once_the_round_state_is_saved_the_files_it_replaced_are_deleted(tmp_path):
    accepted = AcceptedStates(3, tmp_path)
    for cid in (0, 1):
        ClientStateStore(tmp_path, cid).save(1, {"c": torch.ones(1)}, keep_from=0)
    accepted.accept(1, [0, 1])
    accepted.prune()  # nothing was replaced yet
    ClientStateStore(tmp_path, 0).save(2, {"c": torch.zeros(1)}, keep_from=1)
    accepted.accept(2, [0])
    assert (tmp_path / "000000" / "000001.safetensors").is_file()  # still needed until round 2 is saved
    accepted.prune()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("*/*")) == [
        "000000/000002.safetensors", "000001/000001.safetensors"]
