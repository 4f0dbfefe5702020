"""Tensors on disk: adapter states and checkpoints (model, CHOCO replicas, optimizer, RNG, round).

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
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from p2pfl.node.snapshot import CheckpointError

log = logging.getLogger("p2pfl.checkpoint")
NAME = re.compile(r"^checkpoint-(\d{8})\.safetensors$")
KEEP = 2


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


def save_state(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """An adapter state as safetensors, written atomically: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, st_save({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata=metadata))


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    return st_load(Path(path).read_bytes())


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
