"""SplitMix64 (Steele, Lea, Flood, OOPSLA 2014): the one generator behind every value that peers
must reproduce from a shared seed, the random-k indices and the consensus sketch.

Spelled out here rather than borrowed from numpy's or torch's generators, so those values are a
fixed function of the seed, immune to library versions and easy to rebuild in any language
(docs/wire.md gives the recurrence)."""

from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1


def splitmix64(seed: int, count: int) -> np.ndarray:
    """The first `count` outputs (uint64) of SplitMix64 from state `seed` (taken mod 2^64), vectorised."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed & MASK64) + (np.arange(1, count + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
