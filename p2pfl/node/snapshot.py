"""A node's state as tensors and plain data, and back: what a checkpoint holds (the host writes
it, `p2pfl.host.checkpoint`). Pure: no files here.

Engines become tensors named `<prefix>x/...`, `<prefix>xhat/...`, `<prefix>rep/<j>/...` and a
JSON-able rest; nested plain data with tensors inside (an optimizer state, an RNG state) is split
into both (`split_plain`) so that nothing is ever unpickled.
"""

from __future__ import annotations

from typing import Any

import torch

from p2pfl.core.gossip import ChocoEngine, Replica
from p2pfl.errors import P2pflError
from p2pfl.ppfm.cluster import ClusterState
from p2pfl.ppfm.levels import Levels


class CheckpointError(P2pflError, ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def engine_state(engine: ChocoEngine, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors named `<prefix>x/...`, `<prefix>xhat/...`, `<prefix>rep/<j>/...` and the plain rest.

    The prefix keeps several engines (the base graph's and each PPFM level's) in one checkpoint."""
    tensors = {f"{prefix}x/{k}": v for k, v in engine.x.items()}
    tensors.update({f"{prefix}xhat/{k}": v for k, v in engine.xhat.items()})
    reps: dict[str, Any] = {}
    for j, rep in engine.replicas.items():
        tensors.update({f"{prefix}rep/{j}/{k}": v for k, v in rep.xhat.items()})
        reps[str(j)] = {"inc": rep.inc, "next_seq": rep.next_seq, "round": rep.round, "synced": rep.synced}
    meta = {"round": engine.round, "out_seq": engine.out_seq, "replicas": reps}
    return tensors, meta


def restore_engine(engine: ChocoEngine, tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str = "") -> None:
    """Put a checkpointed engine state (saved with the same prefix) back; the layout must match."""
    def pick(sub: str) -> dict[str, torch.Tensor]:
        sub = prefix + sub
        got = {k[len(sub):]: v.to(torch.float32) for k, v in tensors.items() if k.startswith(sub)}
        if {k: tuple(v.shape) for k, v in got.items()} != engine.layout:
            raise CheckpointError(f"checkpoint: tensors under {sub!r} do not match the model's adapter layout")
        return got

    engine.x = pick("x/")
    engine.xhat = pick("xhat/")
    engine.round = int(meta["round"])
    engine.out_seq = int(meta["out_seq"])
    for key, info in meta.get("replicas", {}).items():
        j = int(key)
        if j not in engine.replicas:
            continue  # topology changed; that neighbour starts fresh
        engine.replicas[j] = Replica(
            xhat=pick(f"rep/{j}/"), inc=info["inc"], next_seq=int(info["next_seq"]), round=int(info["round"]), synced=bool(info["synced"])
        )


def split_plain(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move every tensor of a nested dict/list into `tensors` (by path); return the JSON-able rest."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[split_plain(k, f"{prefix}/k{i}", tensors), split_plain(v, f"{prefix}/{i}", tensors)] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, list | tuple):
        return [split_plain(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    return obj


def join_plain(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {join_plain(k, tensors): join_plain(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [join_plain(v, tensors) for v in obj]
    return obj


def levels_state(levels: Levels) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Both meta-level engines, the cluster state and the accumulated fingerprint of a `ppfm.Levels`."""
    tensors, cmeta = engine_state(levels.cluster, "ppfm/cluster/")
    gtensors, gmeta = engine_state(levels.glob, "ppfm/global/")
    tensors.update(gtensors)
    tensors["ppfm/fingerprint"] = levels.fingerprint
    return tensors, {"cluster": cmeta, "global": gmeta, "state": levels.state.to_dict()}


def restore_levels(levels: Levels, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    restore_engine(levels.cluster, tensors, meta["cluster"], "ppfm/cluster/")
    restore_engine(levels.glob, tensors, meta["global"], "ppfm/global/")
    state = ClusterState.from_dict(meta["state"])
    if state.labels and set(state.labels) != set(levels.labels):
        raise CheckpointError(f"checkpoint: cluster labels cover peers {sorted(state.labels)}, the topology has {sorted(levels.labels)}")
    levels.state = state
    fp = tensors["ppfm/fingerprint"]
    if fp.shape != levels.fingerprint.shape:
        raise CheckpointError(f"checkpoint: fingerprint of {fp.numel()} rows, this run sketches {levels.fingerprint.numel()}")
    levels.fingerprint = fp.double().clone()
    levels.apply(state.labels or levels.labels)

