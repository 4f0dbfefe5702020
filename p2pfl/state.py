"""Adapter states on disk (atomic safetensors) and the synthetic state of `--no-train` runs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

State = dict[str, torch.Tensor]


def synthetic_state(seed: int, peer: int, dim: int, rank: int = 8, tensors: int = 16) -> State:
    """A random state with the shape of a LoRA-B set (`tensors` matrices of rank columns), >= dim floats.

    Deterministic from (seed, peer), so tests can rebuild every peer's starting point.
    """
    rows = max(1, -(-dim // (rank * tensors)))
    g = torch.Generator().manual_seed((seed * 1_000_003 + peer * 7_919 + 17) & 0x7FFFFFFFFFFFFFFF)
    return {f"blocks.{i:02d}.lora_B": torch.randn(rows, rank, generator=g) for i in range(tensors)}


def save_state(path: str | Path, state: State, metadata: dict[str, str] | None = None) -> None:
    """Write to a temp file in the same directory, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(path: str | Path) -> State:
    return load_file(str(path))
