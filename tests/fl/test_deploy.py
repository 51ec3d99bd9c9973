"""The same ClientApp and ServerApp on Flower's deployment engine: a real ``flower-superlink`` and
two ``flower-supernode`` processes on 127.0.0.1, each node with its own dataset in
``--node-config``, one round started with ``flwr run`` from the repository. Runtime dependency
installation is off (it would run ``uv sync``); every process started is killed by its id."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from cxrfl_ray.data.store import open_dataset
from tests.conftest import free_port, kill_process_tree

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def split_rows(path: Path, split: str) -> int:
    return int(pc.sum(pc.equal(open_dataset(path).metadata.column("split"), split)).as_py())


def test_one_round_with_a_superlink_and_two_supernodes(phantoms, tmp_path):
    server_data = phantoms(n=40, size=48, seed=0, sites=2)
    site_data = [phantoms(n=50, size=48, seed=1, sites=2), phantoms(n=80, size=48, seed=2, sites=2)]
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"""name: deploy-test
task: segmentation
data: {{path: {server_data}, size: 48}}
model: {{name: tiny-conv-seg}}
partition: {{clients: 2}}
train: {{optimizer: adam, lr: 0.01, batch_size: 8, steps: 2}}
fl: {{rounds: 1, round_timeout: 300}}
tracking: {{wandb: offline}}
""")
    link_port = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n[superlink.test]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "WANDB_MODE": "offline",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    commands = [[str(VENV_BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link_port)]]
    for data in site_data:
        commands.append([str(VENV_BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                         "--port", str(free_port()), "--node-config", f'data-path="{data}"'])
    run_dir = tmp_path / "run"
    procs = []
    try:
        for i, cmd in enumerate(commands):
            log = open(tmp_path / f"proc{i}.log", "wb")
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            if i == 0:
                wait_for_port(link_port, 60)
        run = subprocess.run(
            [str(VENV_BIN / "flwr"), "run", str(REPO), "test", "--stream",
             "--run-config", f'config="{exp}" out="{run_dir}"'],
            env=env, capture_output=True, text=True, timeout=420)
        logs = run.stdout + run.stderr
        assert run.returncode == 0, logs[-3000:]
        assert (run_dir / "summary.json").is_file(), logs[-3000:]
    finally:
        for proc in procs:
            kill_process_tree(proc)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["clients"] == 2 and summary["rounds"] == 1
    metrics = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    clients = [r for r in metrics if r["scope"] == "client" and r["metric"] == "num-examples"]
    # Each SuperNode trained on all training rows of its own dataset (no partition plan).
    assert sorted(r["value"] for r in clients) == sorted(split_rows(d, "train") for d in site_data)
    assert sorted(r["id"] for r in clients) == ["0", "1"]
    # The server evaluated the global model on its own data after rounds 0 and 1.
    val = [r for r in metrics if (r["scope"], r["id"], r["metric"]) == ("central", "val", "examples")]
    assert [r["round"] for r in val] == [0, 1]
    assert all(r["value"] == split_rows(server_data, "val") for r in val)
    assert summary["final"]["central:val"]["jaccard"] > 0
    assert "[round 1/1]" in logs
