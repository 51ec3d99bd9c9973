"""Shared by the algorithm and engine tests: training replies as the engine hands them to the
server, a federated run stopped after a round as a killed one is, and a run's results to compare."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from flwr.app import Message, MessageType, Metadata, MetricRecord, RecordDict

TIMING = {"fit_seconds", "wall_time"}


def run_results(run: Path) -> tuple[list[tuple], dict[str, bytes]]:
    """A finished run's metrics, timings left out, sorted (scope, id, round, metric, value), and
    its round state's final weights as bytes: what two ways of running the same job must share."""
    from cxrfl_ray.fl.arrays import view
    from cxrfl_ray.fl.state import load_state

    rows = sorted((r["scope"], r["id"], r["round"], r["metric"], r["value"])
                  for r in pq.read_table(run / "metrics.parquet").to_pylist() if r["metric"] not in TIMING)
    _, arrays, _, _ = load_state(run)
    return rows, {k: view(v).tobytes() for k, v in arrays.items()}


def train_reply(cid: int, content: dict, **metrics: float) -> Message:
    """A training reply of plan client ``cid``: ``content`` (its records) plus a MetricRecord of
    ``cid`` and ``metrics`` (``num-examples``, ``train_loss``, ``steps`` ...)."""
    meta = Metadata(run_id=1, message_id=f"r{cid}", src_node_id=cid + 1, dst_node_id=0, reply_to_message_id=f"m{cid}",
                    group_id="1", created_at=0.0, ttl=3600.0, message_type=MessageType.TRAIN)
    return Message(content=RecordDict({**content, "metrics": MetricRecord({"cid": cid, **metrics})}), metadata=meta)


def stopped_after_round_1(cfg, run_dir: Path) -> Path:
    """``cfg`` run into ``run_dir`` and stopped once round 1 is saved (its round hook raises)."""
    from cxrfl_ray.fl.engine import run_federated
    from cxrfl_ray.fl.state import saved_round

    class Stop(Exception):
        pass

    def stop(server_round: int, metrics: dict) -> None:
        if server_round == 1:
            raise Stop

    with pytest.raises(RuntimeError, match="federated run failed"):
        run_federated(cfg, quiet=True, run_dir=run_dir, on_round=stop)
    assert saved_round(run_dir) == 1
    return run_dir
