"""`cxrfl submit` against a real two-node Ray cluster on this machine (a head with the dashboard
and a second node), running the smoke sweep through Ray's Job Submission API. Every Ray process
the test starts is found by its cluster's port and session and killed, also when the test fails."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = str(Path(sys.executable).parent)


def _proc_table() -> tuple[dict[int, str], dict[int, list[int]]]:
    lines, kids = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            lines[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return lines, kids


def cluster_processes(port: int) -> list[int]:
    """The processes of the Ray cluster whose GCS listens on ``port``: those naming its port or
    its session folder, and all their descendants."""
    lines, kids = _proc_table()
    sessions = {m for c in lines.values() if f"--gcs_server_port={port}" in c for m in re.findall(r"session_[0-9_\-]+", c)}
    todo = [p for p, c in lines.items() if f":{port}" in c or any(s in c for s in sessions)]
    found: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += kids.get(pid, [])
    found.discard(os.getpid())
    return sorted(found)


def own_agent_ports() -> list[str]:
    """Free ports for a node's dashboard agent: its default (52365) may be held by another Ray on
    this machine (the test session's), and a head without its agent cannot take jobs."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


@pytest.fixture(scope="module")
def two_node_cluster():
    port, dashboard = free_port(), free_port()
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "FLWR_TELEMETRY_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    ray = f"{VENV_BIN}/ray"
    try:
        subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
                        "--num-cpus=1", "--disable-usage-stats", *own_agent_ports()], env=env, check=True, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        subprocess.run([ray, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--disable-usage-stats",
                        *own_agent_ports()], env=env, check=True, timeout=120, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        for pid in cluster_processes(port):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
        # `ray stop` would remove the pointer to the cluster; left behind, a plain ray.init()
        # (Flower's RayBackend) would try to join the dead cluster.
        pointer = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if pointer.is_file() and pointer.read_text().strip().endswith(f":{port}"):
            pointer.unlink()
        assert not cluster_processes(port), "Ray processes of the test cluster survived"


@pytest.mark.timeout(600)
def test_smoke_sweep_submitted_to_a_two_node_cluster(two_node_cluster, tmp_path, monkeypatch, capsys):
    from ray.util.state import list_actors, list_nodes

    from cxrfl_ray.cli import main as cxrfl
    from cxrfl_ray.fl.backend import ClientActor

    address, env = two_node_cluster
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.chdir(REPO)  # the spec is named relative to the repository, as a user would
    assert len([n for n in list_nodes(address=address) if n.state == "ALIVE"]) == 2
    remote = tmp_path / "on-cluster" / "smoke"
    fetched = tmp_path / "fetched"
    code = cxrfl(["submit", "--address", address, "--timeout", "500", "--fetch", str(fetched),
                  "--remote-root", str(tmp_path / "cluster-home"), "--",
                  "sweep", "tune_configs/smoke.yaml", "--out", str(remote), "--quiet",
                  "--set", f"base.data.path={tmp_path / 'phantoms'}", "--set", "base.fl.rounds=2",
                  "--set", "space={train.epochs: {grid: [1]}, fl.clients_per_round: {grid: [1, 2]}}",
                  "--set", "base.tracking.wandb=disabled"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert re.search(r"submitted job \S+ to http://127.0.0.1:\d+", out)
    assert "report:" in out  # the job's own output was followed
    trials = pq.read_table(fetched / "trials.parquet").to_pandas()
    assert trials["trial"].nunique() == 2 and set(trials["status"]) == {"TERMINATED"}
    assert sorted(trials.drop_duplicates("trial")["param:fl.clients_per_round"]) == [1, 2]
    assert sorted(trials["round"].dropna().unique().tolist()) == [0, 1, 2]
    assert (fetched / "report" / "report.md").is_file() and not list(fetched.rglob("*.safetensors"))
    # Trials that need 1.5 CPUs cannot fit one 1-CPU node: their client actors spread over both.
    actors = list_actors(address=address, filters=[("class_name", "=", ClientActor.__name__)], detail=True, limit=1000)
    assert len({a.node_id for a in actors}) == 2
