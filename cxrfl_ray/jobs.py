"""Run ``cxrfl`` commands on a Ray cluster with Ray's Job Submission SDK, and bring results back.

``submit`` ships the local files a command names (a sweep spec, a config) inside the job's
entrypoint (a small base64 tarball unpacked into ``REMOTE_ROOT/jobs/JOB_ID``, the job's working
folder), runs ``python -m cxrfl_ray.cli ...`` there on the cluster (where this package is
installed, see cluster/), follows the job's logs, and returns its exit status. (Ray's
``working_dir`` upload is not used: its copy can be garbage-collected under a long-running
driver once the trials that shared it end, and the driver's ``os.getcwd()`` then fails.) A sweep's folder goes to
``REMOTE_ROOT/sweeps/NAME`` on the cluster (a shared filesystem on multi-node clusters), and
``fetch`` copies it back through a second small job that streams it as a tarball in its logs:
nothing but the dashboard's HTTP port is needed.
"""

from __future__ import annotations

import base64
import io
import os
import shlex
import shutil
import sys
import tarfile
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

REMOTE_ROOT = "$HOME/cxrfl-runs"
JOB_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "RAY_AIR_NEW_OUTPUT": "0"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
BEGIN, END = "--- cxrfl tarball begin ---", "--- cxrfl tarball end ---"


def _passed_on() -> dict[str, str]:
    """Our own settings (``CXRFL_*``, e.g. ``CXRFL_DEBUG`` for tracebacks) go along with a job."""
    return {k: v for k, v in os.environ.items() if k.startswith("CXRFL_")}


class ClusterError(RuntimeError):
    """The cluster's dashboard cannot be reached (nothing listens, or the connection dropped)."""


def _reason(exc: BaseException) -> str:
    """The innermost cause of a connection failure (``[Errno 111] Connection refused``), not the
    chain of library wrappers around it."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return str(exc) or type(exc).__name__


@contextmanager
def _reaching(address: str):
    """Turn a connection failure while talking to ``address`` into one ClusterError line."""
    import requests

    try:
        yield
    except (ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise ClusterError(f"no Ray cluster answers at {address} ({_reason(exc)}); is the dashboard "
                           "address right (e.g. http://HEAD:8265) and the cluster up?") from None


class _Cluster:
    """Ray's JobSubmissionClient, with every call's connection failure one ClusterError (Ray's
    own is five chained tracebacks: socket, urllib3, requests, Ray)."""

    def __init__(self, address: str) -> None:
        from ray.job_submission import JobSubmissionClient

        self.address = address
        with _reaching(address):
            self._client = JobSubmissionClient(address)

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            with _reaching(self.address):
                return attr(*args, **kwargs)

        return call


def _client(address: str) -> _Cluster:
    return _Cluster(address)


def stage_inputs(args: list[str], staging: Path) -> list[str]:
    """Copy every local file an argument names (also ``KEY=path`` values) into ``staging`` and
    rewrite the argument to its place there; files under the current folder keep their path."""
    out = []
    for arg in args:
        key, sep, value = arg.rpartition("=") if "=" in arg and not arg.startswith("-") else ("", "", arg)
        path = Path(value)
        if value and not value.startswith("-") and "://" not in value and path.is_file():
            try:
                rel = path.resolve().relative_to(Path.cwd().resolve())
            except ValueError:
                rel = Path("_inputs") / path.name
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, staging / rel)
            value = str(rel)
        out.append(f"{key}{sep}{value}")
    return out


def sweep_folder(args: list[str], remote_root: str = REMOTE_ROOT) -> str | None:
    """Where a ``sweep`` command writes on the cluster (its ``--out``), None for other commands."""
    if not args or args[0] != "sweep":
        return None
    if "--out" in args:
        return args[args.index("--out") + 1]
    from cxrfl_ray.config import load_yaml

    name = (load_yaml(args[1]) or {}).get("name", Path(args[1]).stem)
    return f"{remote_root}/sweeps/{name}"


MAX_BUNDLE = 256 * 1024


def _targz(folder: Path, keep=None) -> bytes:
    """``folder`` as tar.gz bytes; ``keep`` is tarfile's filter (None drops a member)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=".", filter=keep)
    return buf.getvalue()


def _untargz(data: bytes, folder: Path) -> None:
    """Unpack tar.gz bytes into ``folder`` (tarfile's ``data`` filter: nothing lands outside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(folder, filter="data")


def bundle(folder: Path) -> str:
    """A folder as base64 tar.gz text, small enough for a command line."""
    data = _targz(folder)
    if len(data) > MAX_BUNDLE:
        raise ValueError(f"the files this command names take {len(data) // 1024} KB packed (limit "
                         f"{MAX_BUNDLE // 1024} KB): put data on storage the cluster reads (s3://, gs://, a shared disk)")
    return base64.b64encode(data).decode()


def unpack(folder: str, text: str) -> None:
    _untargz(base64.b64decode(text), Path(folder).expanduser())


def entrypoint(args: list[str], job_dir: str, files: str, remote_root: str = REMOTE_ROOT,
               python: str = "python") -> str:
    """Unpack the shipped files into the job's folder, then run the command there. Paths with
    ``$HOME`` stay unquoted so the cluster's shell expands them."""
    py = shlex.quote(python)
    line = f"{py} -m cxrfl_ray.jobs unpack {job_dir} {files} && cd {job_dir} && {py} -m cxrfl_ray.cli {shlex.join(args)}"
    if args and args[0] == "sweep" and "--out" not in args:
        line += f" --out {sweep_folder(args, remote_root)}"
    return line


def wait(address: str, job_id: str, timeout: float | None = None, follow: bool = True, poll: float = 1.0) -> str:
    """Follow a job's logs until it ends; returns its final status (stops it on timeout)."""
    client = _client(address)
    printed, deadline = 0, None if timeout is None else time.time() + timeout
    while True:
        status = client.get_job_status(job_id)
        status = str(getattr(status, "value", status))
        if follow:
            logs = client.get_job_logs(job_id)
            sys.stdout.write(logs[printed:])
            sys.stdout.flush()
            printed = len(logs)
        if status in TERMINAL:
            return status
        if deadline is not None and time.time() > deadline:
            client.stop_job(job_id)
            raise TimeoutError(f"job {job_id} did not finish within {timeout:.0f} s; it was stopped")
        time.sleep(poll)


def submit(address: str, args: list[str], *, remote_root: str = REMOTE_ROOT, python: str = "python",
           follow: bool = True, timeout: float | None = None, fetch: str | Path | None = None,
           env: dict[str, str] | None = None) -> tuple[str, str]:
    """Submit ``cxrfl ARGS`` as a Ray job; returns ``(job_id, final status)`` (or ``PENDING`` etc.
    without waiting when ``follow`` is False and no ``fetch``/``timeout`` is asked for)."""
    if not args:
        raise ValueError("nothing to submit: give a cxrfl command after --, e.g. -- sweep tune_configs/smoke.yaml")
    client = _client(address)  # an unreachable cluster is said before anything is packed
    with tempfile.TemporaryDirectory(prefix="cxrfl-job-") as staging:
        staged = stage_inputs(list(args), Path(staging))
        files = bundle(Path(staging))
    remote_sweep = sweep_folder(args, remote_root)
    submission_id = f"cxrfl-{uuid.uuid4().hex[:12]}"
    job_id = client.submit_job(
        entrypoint=entrypoint(staged, f"{remote_root}/jobs/{submission_id}", files, remote_root, python),
        submission_id=submission_id,
        runtime_env={"env_vars": {**JOB_ENV, **_passed_on(), **(env or {})}},
        metadata={"cxrfl_command": shlex.join(args)},
    )
    print(f"submitted job {job_id} to {address}: cxrfl {shlex.join(args)}", flush=True)
    if not (follow or fetch or timeout):
        return job_id, "PENDING"
    status = wait(address, job_id, timeout=timeout, follow=follow)
    if fetch is not None and remote_sweep is not None and status == "SUCCEEDED":
        fetch_folder(address, remote_sweep, Path(fetch), python=python, timeout=timeout)
    return job_id, status


def fetch_folder(address: str, remote: str, local: Path, *, python: str = "python",
                 with_checkpoints: bool = False, timeout: float | None = None) -> Path:
    """Copy a folder from the cluster's head: a job prints it as a base64 tarball between two
    marker lines, and the tarball is unpacked into ``local``."""
    client = _client(address)
    flag = " --with-checkpoints" if with_checkpoints else ""
    job_id = client.submit_job(entrypoint=f"{shlex.quote(python)} -m cxrfl_ray.jobs pack {remote}{flag}",
                               runtime_env={"env_vars": JOB_ENV})
    status = wait(address, job_id, timeout=timeout, follow=False)
    logs = client.get_job_logs(job_id)
    if status != "SUCCEEDED" or BEGIN not in logs:
        raise RuntimeError(f"fetching {remote} failed ({status}): {logs[-2000:]}")
    payload = logs.split(BEGIN, 1)[1].split(END, 1)[0]
    data = base64.b64decode("".join(payload.split()))
    _untargz(data, local)
    print(f"fetched {remote} -> {local.resolve()} ({len(data) / 1e6:.1f} MB)", flush=True)
    return local


def pack(folder: str, with_checkpoints: bool = False) -> None:
    """Print ``folder`` as a base64 tar.gz between marker lines (run on the cluster by ``fetch``).
    Checkpoints and Tune's own state stay behind unless asked for: results, not weights."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise SystemExit(f"no such folder on the cluster: {root}")

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if not with_checkpoints and info.name.endswith(".safetensors"):
            return None
        return info

    text = base64.b64encode(_targz(root, keep)).decode()
    print(BEGIN)
    for i in range(0, len(text), 16384):
        print(text[i:i + 16384])
    print(END, flush=True)


def job_status(address: str, job_id: str) -> dict:
    info = _client(address).get_job_info(job_id)
    return {"job_id": job_id, "status": str(getattr(info.status, "value", info.status)),
            "entrypoint": info.entrypoint, "message": info.message,
            "exit_code": getattr(info, "driver_exit_code", None)}


def stop_job(address: str, job_id: str) -> bool:
    return bool(_client(address).stop_job(job_id))


if __name__ == "__main__":  # on the cluster: pack a folder for fetch, unpack a job's files
    if len(sys.argv) >= 3 and sys.argv[1] == "pack":
        pack(sys.argv[2], with_checkpoints="--with-checkpoints" in sys.argv[3:])
    elif len(sys.argv) == 4 and sys.argv[1] == "unpack":
        unpack(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit("usage: python -m cxrfl_ray.jobs pack FOLDER [--with-checkpoints] | unpack FOLDER BASE64")
