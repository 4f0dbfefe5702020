"""Model states as the core handles them: named float tensors, and the synthetic state of
`--no-train` runs (a LoRA-B-shaped random state every peer can rebuild from the seed)."""

from __future__ import annotations

import torch

State = dict[str, torch.Tensor]


def zeros_like_state(state: State) -> State:
    return {k: torch.zeros_like(v, dtype=torch.float32) for k, v in state.items()}


def clone_state(state: State) -> State:
    return {k: v.detach().to(torch.float32).clone() for k, v in state.items()}


def synthetic_state(seed: int, peer: int, dim: int, rank: int = 8, tensors: int = 16) -> State:
    """A random state with the shape of a LoRA-B set (`tensors` matrices of rank columns), >= dim floats.

    Deterministic from (seed, peer), so tests can rebuild every peer's starting point.
    """
    rows = max(1, -(-dim // (rank * tensors)))
    g = torch.Generator().manual_seed((seed * 1_000_003 + peer * 7_919 + 17) & 0x7FFFFFFFFFFFFFFF)
    return {f"blocks.{i:02d}.lora_B": torch.randn(rows, rank, generator=g) for i in range(tensors)}
