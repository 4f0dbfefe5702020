"""What travels besides the model, per algorithm: nothing for decentralized SGD, K-GT's tracking
variable for gradient tracking (Liu, Lin, Koloskova, Stich, 2023).

With `--algorithm gt` the engine's state carries the tracked model change beside the model
(names under `TRACK`), so it travels in the same messages under the same codec; this peer keeps
the correction its trainer applies in its local steps.
"""

from __future__ import annotations

from typing import Any

import torch

from p2pfl.core.state import State, zeros_like_state
from p2pfl.node.snapshot import CheckpointError

TRACK = "_track/"  # engine-state names of the tracked model change (K-GT's z)


class Dsgd:
    """Decentralized SGD: the model is all that travels."""

    correction: State | None = None  # what the trainer's local steps subtract (gradient tracking)

    def extend(self, x0: State) -> State:
        """The engine's state for a model `x0`."""
        return x0

    def trained(self, state: State, x: State) -> State:
        """The engine's new state for a trained model `state`, the engine being at `x`."""
        return state

    def sent(self, x: State) -> None:
        """The engine's state as it went out this round (before mixing)."""

    def mixed(self, x: State, weights: tuple[float, float]) -> None:
        """After mixing, at engine state `x`; `weights`: this peer's push-sum weight before and after."""

    def model(self, x: State) -> State:
        return x

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {}

    def restore(self, tensors: dict[str, Any]) -> None:
        pass


class GradientTracking(Dsgd):
    def __init__(self, x0: State) -> None:
        self.correction = zeros_like_state(x0)  # K-GT's c_i, as a displacement per round
        self._sent: State = {}

    def extend(self, x0: State) -> State:
        return {**x0, **{TRACK + k: torch.zeros_like(v) for k, v in x0.items()}}

    def trained(self, state: State, x: State) -> State:
        """The model's change over the local steps travels beside it: z_i (times K eta)."""
        return {**state, **{TRACK + k: x[k] - v for k, v in state.items()}}

    def sent(self, x: State) -> None:
        self._sent = {k: v.clone() for k, v in x.items() if k.startswith(TRACK)}

    def mixed(self, x: State, weights: tuple[float, float]) -> None:
        """K-GT's correction step, c_i += sum_j w_ij (z_j - z_i), with c and z as displacements
        over a round. Mixing moved the tracking part from this peer's z_i by exactly that sum, so
        it is read off the engine: no second mixing rule.

        On push-sum (epidemic) the sum moves to numerators, c_i += omega_i' z_i' - omega_i z_i:
        column-stochastic mixing conserves sum_i omega_i z_i, so sum_i c_i stays 0, which is what
        puts the fixed point at the optimum of the sum. With omega = 1 the two rules agree."""
        before, after = weights
        assert self.correction is not None
        for k, c in self.correction.items():
            c += after * x[TRACK + k] - before * self._sent[TRACK + k]

    def model(self, x: State) -> State:
        return {k: v for k, v in x.items() if not k.startswith(TRACK)}

    def snapshot(self) -> dict[str, torch.Tensor]:
        assert self.correction is not None
        return {f"track/{k}": v for k, v in self.correction.items()}

    def restore(self, tensors: dict[str, Any]) -> None:
        assert self.correction is not None
        for k, c in self.correction.items():
            if f"track/{k}" not in tensors:
                raise CheckpointError(f"checkpoint: no gradient-tracking correction for {k!r} (saved without --algorithm gt?)")
            c.copy_(tensors[f"track/{k}"])
