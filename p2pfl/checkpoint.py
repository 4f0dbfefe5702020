"""Checkpoints: a peer's full state (model, CHOCO replicas, optimizer, RNG, round) on disk.

One checkpoint is `checkpoint-<round>.safetensors` (tensors, with the plain-data part as JSON in
the safetensors metadata) plus `checkpoint-<round>.sha256`, written in that order, each through a
temp file + fsync + rename. A checkpoint counts only when its checksum file exists and matches, so
a crash mid-write, a truncated or a corrupted file is skipped and the previous good one is used.
Nothing here unpickles: tensors come from safetensors, the rest from JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from p2pfl.errors import P2pflError
from p2pfl.gossip import ChocoEngine, Replica

if TYPE_CHECKING:
    from p2pfl.ppfm import Levels

log = logging.getLogger("p2pfl.checkpoint")
NAME = re.compile(r"^checkpoint-(\d{8})\.safetensors$")
KEEP = 2


class CheckpointError(P2pflError, ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


@dataclass
class Checkpoint:
    round: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Path


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(directory: Path, rnd: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    blob = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata={"p2pfl": json.dumps(meta)})
    path = directory / f"checkpoint-{rnd:08d}.safetensors"
    _atomic_write(path, blob)
    _atomic_write(path.with_suffix(".sha256"), hashlib.sha256(blob).hexdigest().encode())
    for old in sorted(directory.glob("checkpoint-*.safetensors"))[:-KEEP]:
        old.unlink(missing_ok=True)
        old.with_suffix(".sha256").unlink(missing_ok=True)
    return path


def read(path: Path) -> Checkpoint:
    m = NAME.match(path.name)
    if m is None:
        raise CheckpointError(f"{path}: not a checkpoint file name")
    digest_file = path.with_suffix(".sha256")
    if not digest_file.exists():
        raise CheckpointError(f"{path}: no checksum file (write did not finish)")
    blob = path.read_bytes()
    want = digest_file.read_text().strip()
    got = hashlib.sha256(blob).hexdigest()
    if got != want:
        raise CheckpointError(f"{path}: checksum mismatch (file is {len(blob)} bytes, truncated or corrupted)")
    try:
        tensors = st_load(blob)
        n = int.from_bytes(blob[:8], "little")  # safetensors: u64 header length, JSON header
        meta = json.loads(json.loads(blob[8 : 8 + n])["__metadata__"]["p2pfl"])
    except (SafetensorError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e
    return Checkpoint(int(m.group(1)), tensors, meta, path)


def load_latest(directory: Path) -> Checkpoint | None:
    """Newest checkpoint that verifies; broken ones are logged and skipped."""
    for path in sorted(directory.glob("checkpoint-*.safetensors"), reverse=True):
        try:
            return read(path)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
    return None


# ------------------------------------------------------------------ engine state <-> tensors

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


# ------------------------------------------------------------------ PPFM levels <-> tensors

def levels_state(levels: Levels) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Both meta-level engines, the cluster state and the accumulated fingerprint of a `ppfm.Levels`."""
    tensors, cmeta = engine_state(levels.cluster, "ppfm/cluster/")
    gtensors, gmeta = engine_state(levels.glob, "ppfm/global/")
    tensors.update(gtensors)
    tensors["ppfm/fingerprint"] = levels.fingerprint
    return tensors, {"cluster": cmeta, "global": gmeta, "state": levels.state.to_dict()}


def restore_levels(levels: Levels, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from p2pfl.cluster import ClusterState

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
