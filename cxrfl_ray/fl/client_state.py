"""Per-client state (SCAFFOLD's control variate, FedBN's BatchNorm tensors) that follows the
client, not the Ray actor that happens to play it.

One safetensors file per client and round, ``DIR/<client>/<round>.safetensors``, read and written
by whichever actor plays the client, so nothing holds all clients in memory (10,000 clients are
10,000 small files) and a replaced actor loses nothing. The server decides which file counts:
each training message carries the round of the client's last *accepted* state (an update that
was aggregated), so a file written in a round that failed, or that a killed run never finished
(with ``fl.overlap_evaluation``, the round sent ahead when the run stopped), is never read, and
``--resume`` stays exact. In a simulation ``DIR`` is ``RUN/clients``; in a real federation it is on the site (``--node-config 'state-dir="..."'``), and the server only tracks
round numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_DIR_KEY = "state-dir"  # message config: where client states live (simulation: RUN/clients)
STATE_ROUND_KEY = "state-round"  # message config: the round of the client's last accepted state (0: none)


class ClientStateStore:
    """The state files of one client under ``root``."""

    def __init__(self, root: str | Path, client: int) -> None:
        self.dir = Path(root) / f"{client:06d}"

    def path(self, server_round: int) -> Path:
        return self.dir / f"{server_round:06d}.safetensors"

    def load(self, server_round: int) -> dict[str, torch.Tensor]:
        """The state accepted in ``server_round`` (0: the client has none yet: empty)."""
        if server_round <= 0:
            return {}
        path = self.path(server_round)
        if not path.is_file():
            raise FileNotFoundError(f"client state {path} is missing (the server accepted it in round {server_round})")
        return load_file(str(path))

    def save(self, server_round: int, tensors: dict[str, torch.Tensor | np.ndarray], keep_from: int) -> Path:
        """Write this round's state; drop files older than ``keep_from`` (the accepted state this
        round started from stays until the server accepts a newer one)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(server_round)
        tmp = path.with_suffix(".tmp")
        save_file({k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.detach().cpu())
                   .contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(path)
        for old in self.dir.glob("*.safetensors"):
            if old.stem.isdigit() and int(old.stem) < keep_from:
                old.unlink(missing_ok=True)
        return path


def state_bytes(root: str | Path) -> int:
    """Bytes of all client state files under ``root`` (the cost a run pays for per-client state)."""
    return sum(p.stat().st_size for p in Path(root).glob("*/*.safetensors"))


class AcceptedStates:
    """Server side: the round of each client's last accepted state (an update that was
    aggregated), sent with each training message. 4 bytes per client (40 KB at 10,000)."""

    def __init__(self, num_clients: int, root: str | Path | None) -> None:
        self.rounds = np.zeros(num_clients, dtype=np.int32)
        self.root = None if root is None else str(root)  # None: each site keeps its own (real federation)
        self.superseded: list[tuple[int, int]] = []  # (client, round) files replaced by this round's

    def message_config(self, cid: int) -> dict[str, int | str]:
        return {STATE_ROUND_KEY: int(self.rounds[cid]), **({STATE_DIR_KEY: self.root} if self.root else {})}

    def accept(self, server_round: int, clients: list[int]) -> None:
        ids = np.asarray(clients, dtype=np.int64)
        self.superseded += [(int(c), int(r)) for c, r in zip(ids, self.rounds[ids]) if r > 0]
        self.rounds[ids] = server_round

    def prune(self) -> None:
        """Once the round state that accepted newer files is saved, the files they replaced are
        never read again (not even by ``--resume``): delete them, so a client keeps one file at
        rest. (On a site the client drops them itself when it next trains.)"""
        if self.root is not None:
            for cid, old in self.superseded:
                ClientStateStore(self.root, cid).path(old).unlink(missing_ok=True)
        self.superseded = []
