"""A node's Train and Evaluate actions carried out on a trainer: the one place hosts and the
simulator turn those actions into calls, so every driver trains and evaluates alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from p2pfl.core.gossip import State
from p2pfl.node.actions import Evaluate, Train


class Learner(Protocol):
    """What a node's work needs of a `trainer.Trainer` (tests give simpler ones). Learners that
    take teachers or a gradient-tracking correction also have `set_teachers` / `set_correction`."""

    def train_round(self) -> dict[str, Any]: ...
    def evaluate(self, global_eval: bool = False) -> dict[str, Any]: ...
    def adapter_state(self) -> State: ...
    def load_adapter_state(self, state: State) -> None: ...


def learner_spec(learner: Any) -> dict[str, Any]:
    """What a node must know of its learner (`NodeSpec` fields): whether it synthesises with
    neighbours' replicas, and how often it evaluates. A learner without a config (a test's) does neither."""
    cfg = getattr(learner, "cfg", None)
    return {"augment": getattr(cfg, "augment", "off") != "off", "eval_every": getattr(cfg, "eval_every", 1)}


def copy_inputs(action: Train | Evaluate) -> Train | Evaluate:
    """The action with its tensors copied: the node's own keep changing while work waits its turn."""
    if isinstance(action, Evaluate):
        return Evaluate(action.round, {k: v.clone() for k, v in action.state.items()}, action.global_eval, action.purpose)
    correction = None if action.correction is None else {k: v.clone() for k, v in action.correction.items()}
    return Train(action.round, {k: v.clone() for k, v in action.start.items()}, [{k: v.clone() for k, v in t.items()} for t in action.teachers],
                 correction)


def perform(learner: Learner, action: Train | Evaluate, teachers: bool, clock: Callable[[], float]) -> tuple[dict[str, Any], State | None]:
    """(metrics, trained state or None). `train_s` is the compute time of the local steps alone, on
    `clock` (the host's monotonic clock; the simulator's virtual one, on which work takes no time)."""
    learner.load_adapter_state(action.state if isinstance(action, Evaluate) else action.start)
    if isinstance(action, Evaluate):
        return learner.evaluate(action.global_eval), None
    if teachers:
        learner.set_teachers(action.teachers)  # type: ignore[attr-defined]
    if action.correction is not None:
        learner.set_correction(action.correction)  # type: ignore[attr-defined]
    t0 = clock()
    metrics = dict(learner.train_round())
    metrics["train_s"] = clock() - t0
    return metrics, learner.adapter_state()
