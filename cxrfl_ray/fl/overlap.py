"""Round r+1 trains while the server evaluates round r.

The server's evaluation of round r's global model (every view, on the driver) does not change
what round r+1 trains on, so round r+1's messages go out first and the clients train while the
server evaluates: on a simulation's shared cores the clients would otherwise idle through every
evaluation. What a run logs and saves is unchanged: the round state saved for round r is taken
before round r+1 is sent, round r is evaluated, logged and saved before round r+1's replies are
read, and an error in building round r+1 is raised only then. Only a grid that can receive later
(``receive``: the simulation's) sends ahead; a real federation's sends each round when it starts.
"""

from __future__ import annotations

import functools
import math

import torch

from cxrfl_ray.fl.rounds import InFlight, ServerHooks, Trained, finish_round, send_round


class RoundsAhead:
    """Sends each round before the round before it is evaluated (``enabled`` and the grid can)."""

    def __init__(self, strategy, grid, config, timeout: float, hooks: ServerHooks, last_round: int,
                 enabled: bool = True) -> None:
        self.strategy, self.grid, self.config, self.timeout, self.hooks = strategy, grid, config, timeout, hooks
        self.last_round = last_round
        self.ahead = enabled and callable(getattr(grid, "receive", None))
        self._next: InFlight | None = None
        self.hooks_state: tuple[dict, dict] = ({}, {})  # hooks.extra(), hooks.state() from before the last send

    def send(self, server_round: int, arrays) -> None:
        """Round ``server_round``'s messages out now, if it is a round of the run. The hooks' round
        state from before (``hooks_state``) is what the round before saves."""
        self.hooks_state = self.hooks.extra(), self.hooks.state()
        if self.ahead and server_round <= self.last_round:
            self._next = send_round(self.strategy, self.grid, server_round, arrays, self.config, self.timeout,
                                    self.hooks, push=True)

    def train(self, server_round: int, arrays) -> Trained:
        """Round ``server_round`` finished: from the messages sent ahead, else sent now."""
        flight, self._next = self._next, None
        if flight is None:
            flight = send_round(self.strategy, self.grid, server_round, arrays, self.config, self.timeout, self.hooks)
        elif flight.server_round != server_round:
            raise RuntimeError(f"round {flight.server_round} was sent ahead, round {server_round} was asked for")
        return finish_round(flight, self.strategy, self.grid, self.timeout, self.hooks)

    def sharing_cpus(self, evaluate):
        """``evaluate`` that, while a round is out, runs on the cores its clients leave on this
        machine (``grid.client_cpus``; at least one torch thread): threads on busy cores slow both."""

        @functools.wraps(evaluate)
        def shared(*args, **kwargs):
            if self._next is None:
                return evaluate(*args, **kwargs)
            threads = torch.get_num_threads()
            torch.set_num_threads(max(1, threads - math.ceil(getattr(self.grid, "client_cpus", 0))))
            try:
                return evaluate(*args, **kwargs)
            finally:
                torch.set_num_threads(threads)

        return shared
