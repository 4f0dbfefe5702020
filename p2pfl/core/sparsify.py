"""Sparsifying codecs: top-k and random-k, each optionally followed by a quantizer of the kept values.

They pay for int32 indices (top-k) and need a CHOCO step size ~ their fraction (``default_gamma``),
so they need proportionally more rounds than the quantizers (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from fractions import Fraction

import numpy as np
import torch

from p2pfl.core.codec import Codec, CodecError, Quantizer, check_part, meta_int
from p2pfl.core.prng import splitmix64
from p2pfl.core.specs import sparse_spec

MAX_SPARSE_NUMEL = 2**31 - 1  # indices travel as int32
_MAX_SEED = 2**64 - 1


class Sparsifier(Codec):
    """Keep k = max(1, ceil(fraction * numel)) coordinates, zero the rest; a quantizer may then
    compress the kept values. Contracts with delta = k/d (top-k: always; random-k: in expectation)."""

    name: str
    local = False

    def __init__(self, fraction: Fraction, values: Quantizer) -> None:
        self.fraction = fraction
        self.values = values.rekey("values")
        super().__init__(sparse_spec(self.name, fraction, values.spec), self._gamma(float(fraction)) * values.default_gamma)

    @staticmethod
    @abstractmethod
    def _gamma(f: float) -> float:
        """CHOCO step size for this fraction (the quantizer's own gamma multiplies it)."""

    def k_for(self, n: int) -> int:
        """Exact rational arithmetic, so 0.1 * 30 is 3 on every peer, not 4."""
        return 0 if n == 0 else min(n, max(1, math.ceil(self.fraction * n)))

    @property
    def part_names(self) -> frozenset[str]:
        return self.values.part_names

    @property
    def meta_names(self) -> frozenset[str]:
        return self.values.meta_names | {"k"}

    def _check_n(self, n: int) -> None:
        if n > MAX_SPARSE_NUMEL:
            raise CodecError(f"{self.spec}: {n} values exceed the int32 index range")

    def _decode_values(self, parts, meta, n: int) -> tuple[int, torch.Tensor]:
        self._check_n(n)
        k = self.k_for(n)
        got = meta_int(meta, "k", self.spec, 0, MAX_SPARSE_NUMEL)
        if got != k:
            raise CodecError(f"{self.spec}: meta 'k' = {got}, but {n} values give k = {k}")
        return k, self.values._decode(parts, meta, k)


class TopKCodec(Sparsifier):
    """The k largest |x| as values plus int32 indices in ascending order (ties broken by torch)."""

    name = "topk"

    @staticmethod
    def _gamma(f: float) -> float:
        # Measured with 16 peers: ring tolerates ~4f, but complete/exponential/torus diverge at 3f
        # and are fastest near 1.5-2f; ~2f for small f, reaching 1 (exact gossip) at f = 1.
        return round(2.0 * f / (1.0 + f), 9)

    @property
    def part_names(self) -> frozenset[str]:
        return self.values.part_names | {"indices"}

    def _encode(self, flat, seed):
        n = flat.numel()
        self._check_n(n)
        k = self.k_for(n)
        idx = torch.arange(n) if k == n else self._topk_indices(flat.abs(), k).sort().values  # ascending: the bytes are a function of x
        parts, meta = self.values._encode(flat[idx], seed)
        return {**parts, "indices": idx.to(torch.int32)}, {**meta, "k": k}

    @staticmethod
    def _topk_indices(a: torch.Tensor, k: int) -> torch.Tensor:
        """Exact top-k of ``a`` >= 0, 3-8x faster than one torch.topk over 1M values: a strided
        sample gives a threshold t with (very likely) a bit more than k values >= t; the k largest
        are then among those, so a small topk over the candidates is exact."""
        n = a.numel()
        if n >= 1 << 16 and k <= n // 4:
            sample = a[:: n >> 16]
            m = sample.numel()
            t = float(torch.topk(sample, min(m, m * k * 5 // (4 * n) + 16), sorted=False).values.min())
            cand = torch.from_numpy(np.flatnonzero(a.numpy() >= t))
            if cand.numel() >= k:
                return cand[torch.topk(a[cand], k, sorted=False).indices]
        return torch.topk(a, k, sorted=False).indices

    def _decode(self, parts, meta, n):
        k, vals = self._decode_values(parts, meta, n)
        idx = check_part(parts, "indices", torch.int32, k, self.spec).long()
        out = torch.zeros(n)
        if k:
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= n:
                raise CodecError(f"{self.spec}: part 'indices' has {lo if lo < 0 else hi}, outside [0, {n})")
            seen = torch.zeros(n, dtype=torch.bool)
            seen[idx] = True
            if int(seen.sum()) != k:  # duplicates would make the scatter order-dependent
                raise CodecError(f"{self.spec}: part 'indices' has duplicate entries")
            out[idx] = vals
        return out


class RandKCodec(Sparsifier):
    """Random-k: only the values travel; receivers rebuild the indices from meta 'seed'.

    Stratified sampling: one uniformly random coordinate from each of k contiguous, near-equal
    strata, so every coordinate is kept with probability ~k/d and indices come out sorted.
    This is the plain (biased) random-k that CHOCO needs: no d/k rescaling, which would be
    unbiased but expansive (E||x - Q(x)||^2 = (d/k - 1)||x||^2) and break the contraction."""

    name = "randk"

    @staticmethod
    def _gamma(f: float) -> float:
        # Measured with 16 peers: well-connected graphs diverge at ~1.25-1.5f and are fastest
        # near f/2 (the ring tolerates more); ~f/2 for small f, reaching 1 at f = 1.
        return round(f / (2.0 - f), 9)

    @property
    def meta_names(self) -> frozenset[str]:
        return super().meta_names | {"seed"}

    def indices(self, seed: int, n: int, k: int) -> torch.Tensor:
        if k == 0:
            return torch.zeros(0, dtype=torch.long)
        j = np.arange(k + 1, dtype=np.uint64)
        starts = (j * np.uint64(n)) // np.uint64(k)  # k*n < 2^62: exact
        sizes = starts[1:] - starts[:-1]
        return torch.from_numpy((starts[:-1] + splitmix64(seed, k) % sizes).astype(np.int64))

    def _encode(self, flat, seed):
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= _MAX_SEED:
            raise CodecError(f"{self.spec}: seed {seed!r} is not an integer in [0, 2^64)")
        n = flat.numel()
        self._check_n(n)
        k = self.k_for(n)
        parts, meta = self.values._encode(flat[self.indices(seed, n, k)], seed)
        return parts, {**meta, "k": k, "seed": seed}

    def _decode(self, parts, meta, n):
        k, vals = self._decode_values(parts, meta, n)
        seed = meta_int(meta, "seed", self.spec, 0, _MAX_SEED)
        out = torch.zeros(n)
        out[self.indices(seed, n, k)] = vals
        return out
