"""Codecs that compress one tensor for the wire, and the per-tensor plan that picks them.

Pure functions of their inputs (no I/O, no global RNG), so sender and receiver decode the same
bytes to bit-identical tensors and CHOCO replicas never drift. Every lossy codec is a
*contraction*, ``||x - Q(x)||^2 <= (1 - delta) ||x||^2`` with ``delta > 0`` (in expectation for
random-k), which is what CHOCO-Gossip needs to reach exact consensus anyway.

Specs: ``none``, ``fp16``, ``bf16``, ``int8[:BLOCK]``, ``sign[:BLOCK]``, ``sign:tensor``,
``topk:FRACTION``, ``randk:FRACTION`` and ``SPARSIFIER+QUANTIZER`` (e.g. ``topk:0.05+int8``),
where the quantizer (``fp16``, ``bf16``, ``int8[:B]``, ``sign[:B]``, ``sign:tensor``) compresses
the values the sparsifier kept. ``int8`` means ``int8:256`` and ``sign`` means ``sign:128``.
A plan is ``DEFAULT`` or ``DEFAULT,PATTERN=SPEC,...`` with fnmatch patterns, first match wins.

Choosing one (bench/compression.py measures bytes to a consensus target and accuracy in
training; docs/benchmarks.md has the figures): under CHOCO, blockwise ``sign:B`` with small blocks
(plain ``sign``, or ``sign:64``) keeps exact gossip's pace per round at 1 + 32/B bits a value, so
it needs the fewest bytes to a consensus target;
``int8`` and ``fp16``/``bf16`` keep pace at 8 and 16 bits. Sparsifiers pay for int32 indices
and need a step size ~ their fraction (``default_gamma``), so they need proportionally more
rounds. One scale per tensor (``sign:tensor``) barely converges: see ``SignCodec``. Training
deltas are close to Gaussian, so there long blocks (``sign:2048``) cost no accuracy and send the
least.

Part naming: a dense codec's main part is ``data``; under a sparsifier it is ``values`` and the
sparsifier adds ``indices`` (top-k only; random-k ships a seed instead).
"""

from __future__ import annotations

import functools
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from fractions import Fraction

import numpy as np
import torch

from p2pfl.errors import P2pflError
from p2pfl.wire import all_finite

__all__ = ["Codec", "CodecError", "CompressionPlan", "Encoded", "encoded_nbytes", "get_codec"]

MAX_SPARSE_NUMEL = 2**31 - 1  # indices travel as int32
_MAX_SEED = 2**64 - 1


class CodecError(P2pflError, ValueError):
    """A bad codec spec, bad input to encode, or encoded parts/meta that do not fit together."""


@dataclass(frozen=True)
class Encoded:
    """One encoded tensor: ``parts`` travel as raw frames, ``meta`` in the msgpack header."""

    parts: dict[str, torch.Tensor]
    meta: dict[str, float | int]


def encoded_nbytes(enc: Encoded) -> int:
    """Bytes of the raw part frames (meta rides in the header and is not counted)."""
    return sum(p.numel() * p.element_size() for p in enc.parts.values())


# --------------------------------------------------------------------------- validation helpers


def _part(parts: Mapping[str, object], key: str, dtype: torch.dtype, n: int, who: str) -> torch.Tensor:
    t = parts[key]
    if not isinstance(t, torch.Tensor):
        raise CodecError(f"{who}: part {key!r} is a {type(t).__name__}, expected a tensor")
    if t.dtype != dtype:
        raise CodecError(f"{who}: part {key!r} has dtype {t.dtype}, expected {dtype}")
    if t.device.type != "cpu":
        raise CodecError(f"{who}: part {key!r} is on {t.device}, expected cpu")
    if t.dim() != 1 or t.numel() != n:
        raise CodecError(f"{who}: part {key!r} has shape {list(t.shape)}, expected [{n}]")
    return t


def _meta_int(meta: Mapping[str, object], key: str, who: str, lo: int, hi: int) -> int:
    v = meta[key]
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise CodecError(f"{who}: meta {key!r} = {v!r}, expected an integer in [{lo}, {hi}]")
    return v


def _meta_scale(meta: Mapping[str, object], key: str, who: str) -> float:
    v = meta[key]
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v < 0 or v > 3.4e38:
        raise CodecError(f"{who}: meta {key!r} = {v!r}, expected a finite non-negative float32 scale")
    return float(v)


# --------------------------------------------------------------------------------------- codecs


class Codec(ABC):
    """Encode a float32 tensor into raw parts + scalar meta, and back.

    Subclasses implement ``_encode``/``_decode`` on flat 1-D tensors; this base class does the
    shape/dtype handling and the checks that keep a bad peer's message a ``CodecError``.
    """

    spec: str
    default_gamma: float
    lossless: bool = False
    # Works on single values or fixed-size blocks, so coding a concatenation of tensors is as good
    # as coding each alone; False where whole-tensor statistics (one scale, top-k) drive the result.
    local: bool = True

    def __init__(self, spec: str, default_gamma: float) -> None:
        self.spec = spec
        self.default_gamma = default_gamma

    # names (and for parts, the dtypes) this codec emits; decode demands exactly these
    @property
    @abstractmethod
    def part_names(self) -> frozenset[str]: ...

    @property
    @abstractmethod
    def meta_names(self) -> frozenset[str]: ...

    @abstractmethod
    def _encode(
        self, flat: torch.Tensor, seed: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, float | int]]: ...

    @abstractmethod
    def _decode(self, parts: Mapping[str, torch.Tensor], meta: Mapping[str, object], n: int) -> torch.Tensor:
        """A fresh float32 1-D tensor of length n; parts are only read."""

    def encode(self, x: torch.Tensor, seed: int = 0) -> Encoded:
        """Encode ``x`` (any shape). ``seed`` drives random-k; others ignore it.

        ``none`` ships ``x``'s own memory (zero copy): do not modify ``x`` until it is sent.
        Non-finite input is refused rather than silently poisoning every replica.
        """
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise CodecError(
                f"{self.spec}: expected a floating-point tensor, got {getattr(x, 'dtype', type(x))}"
            )
        flat = x.detach().to("cpu", torch.float32).contiguous().reshape(-1)
        if flat.numel() and not all_finite(flat):
            raise CodecError(f"{self.spec}: input contains NaN or Inf")
        parts, meta = self._encode(flat, seed)
        return Encoded(parts=parts, meta=meta)

    def decode(self, enc: Encoded, shape: tuple[int, ...]) -> torch.Tensor:
        """A new float32 tensor of ``shape``; raises ``CodecError`` (only) on any inconsistency."""
        if not isinstance(enc, Encoded) or not isinstance(enc.parts, dict) or not isinstance(enc.meta, dict):
            raise CodecError(
                f"{self.spec}: expected Encoded(parts: dict, meta: dict), got {type(enc).__name__}"
            )
        try:
            shape = tuple(shape)
            ok = all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
        except TypeError:
            ok = False
        if not ok:
            raise CodecError(f"{self.spec}: shape {shape!r} is not a tuple of non-negative ints")
        for what, got, want in (("part", enc.parts, self.part_names), ("meta", enc.meta, self.meta_names)):
            if missing := want - set(got):
                raise CodecError(f"{self.spec}: missing {what} {sorted(missing)[0]!r}")
            if extra := set(got) - want:
                raise CodecError(f"{self.spec}: unexpected {what} {sorted(map(repr, extra))[0]}")
        n = math.prod(shape)
        out = self._decode(enc.parts, enc.meta, n)
        if n and not all_finite(out):
            raise CodecError(f"{self.spec}: decodes to NaN or Inf")
        return out.reshape(shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


class _Quantizer(Codec):
    """A dense, element-wise codec; ``key`` names its main part ('data', or 'values' under a sparsifier)."""

    def __init__(self, spec: str, default_gamma: float, key: str) -> None:
        super().__init__(spec, default_gamma)
        self.key = key

    @abstractmethod
    def rekey(self, key: str) -> _Quantizer: ...

    @property
    def part_names(self) -> frozenset[str]:
        """One part, the main one; quantizers with side data (scales) extend this."""
        return frozenset({self.key})

    @property
    def meta_names(self) -> frozenset[str]:
        return frozenset()


class NoneCodec(_Quantizer):
    """Plain float32, bit-exact."""

    lossless = True

    def __init__(self, key: str = "data") -> None:
        super().__init__("none", 1.0, key)

    def rekey(self, key: str) -> NoneCodec:
        return NoneCodec(key)

    def _encode(self, flat, seed):
        return {self.key: flat}, {}

    def _decode(self, parts, meta, n):
        return _part(parts, self.key, torch.float32, n, self.spec).clone()


class HalfCodec(_Quantizer):
    """fp16 or bf16 by rounding to nearest; values beyond the format's range saturate to its max
    instead of becoming Inf (relative error <= 2^-11 for fp16 normals, 2^-8 for bf16)."""

    def __init__(self, dtype: torch.dtype, key: str = "data") -> None:
        name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        super().__init__(name, 1.0, key)
        self.dtype = dtype

    def rekey(self, key: str) -> HalfCodec:
        return HalfCodec(self.dtype, key)

    def _encode(self, flat, seed):
        h = flat.to(self.dtype)
        if h.numel() and not all_finite(h):  # rare overflow: redo with saturation
            big = torch.finfo(self.dtype).max
            h = flat.clamp(-big, big).to(self.dtype)
        return {self.key: h}, {}

    def _decode(self, parts, meta, n):
        return _part(parts, self.key, self.dtype, n, self.spec).to(torch.float32)


class Int8Codec(_Quantizer):
    """Blockwise absmax int8: per block of B values, scale = max|x|/127 (a float32 part) and
    q = round(x/scale). Error per element <= scale/2, i.e. <= max|block|/254; 8 + 32/B bits/value."""

    DEFAULT_BLOCK = 256

    def __init__(self, block: int = DEFAULT_BLOCK, key: str = "data") -> None:
        super().__init__("int8" if block == self.DEFAULT_BLOCK else f"int8:{block}", 1.0, key)
        self.block = block

    def rekey(self, key: str) -> Int8Codec:
        return Int8Codec(self.block, key)

    @property
    def part_names(self) -> frozenset[str]:
        return frozenset({self.key, "scales"})

    @property
    def meta_names(self) -> frozenset[str]:
        return frozenset()

    def _nblocks(self, n: int) -> int:
        return -(-n // self.block)

    def _encode(self, flat, seed):
        n, b = flat.numel(), self.block
        nb = self._nblocks(n)
        if n % b:
            padded = flat.new_zeros(nb * b)
            padded[:n] = flat
        else:
            padded = flat
        blocks = padded.view(nb, b)
        scales = blocks.abs().amax(dim=1) / 127.0 if nb else flat.new_zeros(0)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(1)
        q = torch.div(blocks, safe).round_().clamp_(-127, 127).to(torch.int8).reshape(-1)[:n]
        return {self.key: q, "scales": scales}, {}

    def _decode(self, parts, meta, n):
        q = _part(parts, self.key, torch.int8, n, self.spec)
        nb = self._nblocks(n)
        scales = _part(parts, "scales", torch.float32, nb, self.spec)
        if nb and not (bool(torch.isfinite(scales).all()) and float(scales.min()) >= 0):
            raise CodecError(f"{self.spec}: part 'scales' has a negative or non-finite scale")
        b = self.block
        if n % b:
            out = torch.zeros(nb * b)
            out[:n] = q
        else:
            out = q.to(torch.float32)
        return out.view(nb, b).mul_(scales.unsqueeze(1)).reshape(-1)[:n].contiguous()


class SignCodec(_Quantizer):
    """Scaled sign: one bit per value (np.packbits, zeros count as +) times scale = mean|x|.

    ``sign:B`` has one scale per block of B values (a float32 part 'scales', +32/B bits/value);
    plain ``sign`` is ``sign:128``. ``sign:tensor`` has one scale for all the values it is given
    (meta 'scale'): a whole tensor, or what a sparsifier kept. Decodes to ``scale * sign(x)``,
    the best L2 fit with that scale, so it contracts with delta = ||x||_1^2 / (d ||x||_2^2)
    exactly (per block for ``sign:B``): ~2/pi on Gaussian data but down to 1/d on heavy-tailed
    data. Under CHOCO the residual x - xhat turns heavy-tailed (a few large coordinates move by
    only mean|x| per round and get stranded), so one scale per tensor converges very slowly,
    while small blocks keep pace with exact gossip (bench/compression.py): that is why the plain
    name means blocks. ``sign:tensor`` stays, under a name that says what it does, as the
    textbook one-scale operator (CHOCO's own paper and error-feedback SGD use it) and the least
    bits a sign code can send: the reference that shows what the block scales buy."""

    DEFAULT_BLOCK = 128

    def __init__(self, block: int | None = DEFAULT_BLOCK, key: str = "data") -> None:
        spec = "sign:tensor" if block is None else "sign" if block == self.DEFAULT_BLOCK else f"sign:{block}"
        super().__init__(spec, 0.3 if block is None else 1.0, key)
        self.block = block
        self.local = block is not None

    def rekey(self, key: str) -> SignCodec:
        return SignCodec(self.block, key)

    @property
    def part_names(self) -> frozenset[str]:
        return frozenset({self.key} if self.block is None else {self.key, "scales"})

    @property
    def meta_names(self) -> frozenset[str]:
        return frozenset({"scale"} if self.block is None else ())

    def _encode(self, flat, seed):
        bits = torch.from_numpy(np.packbits(flat.numpy() >= 0))
        n = flat.numel()
        if self.block is None:
            return {self.key: bits}, {"scale": float(flat.abs().mean()) if n else 0.0}
        b = self.block
        nb = -(-n // b)
        padded = flat.abs()
        if n % b:
            padded = torch.cat([padded, padded.new_zeros(nb * b - n)])
        counts = torch.full((nb,), float(b))
        if n % b:
            counts[-1] = n % b  # the short last block averages over its real values only
        scales = padded.view(nb, b).sum(dim=1) / counts
        return {self.key: bits, "scales": scales}, {}

    def _decode(self, parts, meta, n):
        bits = _part(parts, self.key, torch.uint8, -(-n // 8), self.spec)
        pm = torch.from_numpy(np.unpackbits(bits.detach().numpy(), count=n))
        if self.block is None:
            scale = _meta_scale(meta, "scale", self.spec)
            # bit*2s - s is exact in float32, so every peer gets identical +-s.
            return pm.to(torch.float32).mul_(2.0 * scale).sub_(scale)
        b = self.block
        nb = -(-n // b)
        scales = _part(parts, "scales", torch.float32, nb, self.spec)
        if nb and not (bool(torch.isfinite(scales).all()) and float(scales.min()) >= 0):
            raise CodecError(f"{self.spec}: part 'scales' has a negative or non-finite scale")
        out = torch.zeros(nb * b)
        out[:n] = pm
        return out.mul_(2.0).sub_(1.0).view(nb, b).mul_(scales.unsqueeze(1)).reshape(-1)[:n].contiguous()


class _Sparsifier(Codec):
    """Keep k = max(1, ceil(fraction * numel)) coordinates, zero the rest; a quantizer may then
    compress the kept values. Contracts with delta = k/d (top-k: always; random-k: in expectation)."""

    name: str
    local = False

    def __init__(self, fraction: Fraction, values: _Quantizer) -> None:
        self.fraction = fraction
        self.values = values.rekey("values")
        f = float(fraction)
        spec = f"{self.name}:{f!r}" + ("" if isinstance(values, NoneCodec) else f"+{values.spec}")
        super().__init__(spec, self._gamma(f) * values.default_gamma)

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
        got = _meta_int(meta, "k", self.spec, 0, MAX_SPARSE_NUMEL)
        if got != k:
            raise CodecError(f"{self.spec}: meta 'k' = {got}, but {n} values give k = {k}")
        return k, self.values._decode(parts, meta, k)


class TopKCodec(_Sparsifier):
    """The k largest |x| as values plus int32 indices (torch.topk; ties broken by torch)."""

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
        idx = torch.arange(n) if k == n else self._topk_indices(flat.abs(), k)
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
        idx = _part(parts, "indices", torch.int32, k, self.spec).long()
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


def _splitmix64(seed: int, count: int) -> np.ndarray:
    """The first ``count`` outputs of SplitMix64 from ``seed`` (Steele et al. 2014), vectorised.

    Spelled out here rather than borrowed from numpy/torch RNGs so that random-k indices are a
    fixed function of the seed, immune to library version changes between peers."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (np.arange(1, count + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class RandKCodec(_Sparsifier):
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
        return torch.from_numpy((starts[:-1] + _splitmix64(seed, k) % sizes).astype(np.int64))

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
        seed = _meta_int(meta, "seed", self.spec, 0, _MAX_SEED)
        out = torch.zeros(n)
        out[self.indices(seed, n, k)] = vals
        return out


# -------------------------------------------------------------------------------------- parsing

_NUMBER = re.compile(r"(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_QUANTIZERS = ("fp16", "bf16", "int8", "sign")
_SPARSIFIERS = {"topk": TopKCodec, "randk": RandKCodec}
_KNOWN = ("none", *_QUANTIZERS, *_SPARSIFIERS)


def _parse_one(token: str) -> Codec:
    name, sep, arg = token.strip().partition(":")
    name, arg = name.strip(), arg.strip()
    if name not in _KNOWN:
        raise CodecError(f"unknown codec {name!r} in {token!r}; known: {', '.join(_KNOWN)}")
    if name in _SPARSIFIERS:
        if not sep or not _NUMBER.fullmatch(arg):
            raise CodecError(f"{name}: needs a fraction in (0, 1], e.g. {name}:0.05; got {token!r}")
        f = float(arg)
        if not 0 < f <= 1:
            raise CodecError(f"{name}: fraction {arg} is outside (0, 1]")
        # Canonical value: the double's shortest decimal, exactly, so k agrees on every peer.
        return _SPARSIFIERS[name](Fraction(repr(f)), NoneCodec())
    if name in ("int8", "sign"):
        if not sep:
            return Int8Codec() if name == "int8" else SignCodec()
        if name == "sign" and arg == "tensor":
            return SignCodec(None)
        if not arg.isdigit() or not 1 <= int(arg) <= 2**24:
            also = " or 'tensor'" if name == "sign" else ""
            raise CodecError(f"{name}: block size must be an integer in [1, 2^24]{also}, got {arg!r}")
        return Int8Codec(int(arg)) if name == "int8" else SignCodec(int(arg))
    if sep:
        raise CodecError(f"{name}: takes no parameter, got {token!r}")
    return {
        "none": NoneCodec,
        "fp16": lambda: HalfCodec(torch.float16),
        "bf16": lambda: HalfCodec(torch.bfloat16),
    }[name]()


def get_codec(spec: str) -> Codec:
    """The codec for ``spec`` (cached: codecs are immutable). ``CodecError`` names the bad token."""
    if not isinstance(spec, str) or not spec.strip():
        raise CodecError(f"empty codec spec {spec!r}")
    return _get_codec(spec)


@functools.lru_cache(maxsize=256)
def _get_codec(spec: str) -> Codec:
    tokens = spec.split("+")
    if any(not t.strip() for t in tokens):
        raise CodecError(f"codec spec {spec!r}: empty stage around '+'")
    stages = [_parse_one(t) for t in tokens]
    if len(stages) == 1:
        return stages[0]
    first = stages[0]
    if not isinstance(first, _Sparsifier):
        why = (
            "it is lossless already"
            if isinstance(first, NoneCodec)
            else "only topk/randk may be followed by a quantizer"
        )
        raise CodecError(f"codec spec {spec!r}: nothing can be composed after {first.spec!r} ({why})")
    if len(stages) > 2:
        raise CodecError(
            f"codec spec {spec!r}: nothing can be composed after {stages[1].spec!r} (at most SPARSIFIER+QUANTIZER)"
        )
    second = stages[1]
    if not isinstance(second, _Quantizer) or isinstance(second, NoneCodec):
        raise CodecError(
            f"codec spec {spec!r}: {second.spec!r} cannot compress the kept values; use one of {', '.join(_QUANTIZERS)}"
        )
    return type(first)(first.fraction, second)


@dataclass(frozen=True)
class CompressionPlan:
    """Which codec each named tensor uses: overrides by fnmatch pattern, first match wins."""

    default: Codec
    overrides: tuple[tuple[str, Codec], ...] = ()

    @property
    def spec(self) -> str:
        return ",".join([self.default.spec, *(f"{p}={c.spec}" for p, c in self.overrides)])

    @classmethod
    def parse(cls, spec: str) -> CompressionPlan:
        """``"topk:0.05+int8"`` or ``"fp16,*lora_A*=none,blocks.0.*=int8"``; a plan with only
        overrides sends everything else uncompressed (``none``)."""
        if not isinstance(spec, str) or not spec.strip():
            raise CodecError(f"empty compression plan {spec!r}")
        default: Codec | None = None
        overrides: list[tuple[str, Codec]] = []
        for item in spec.split(","):
            pattern, eq, codec = item.rpartition("=")
            pattern, codec = pattern.strip(), codec.strip()
            if not codec or (eq and not pattern):
                raise CodecError(
                    f"compression plan {spec!r}: malformed entry {item!r} (want SPEC or PATTERN=SPEC)"
                )
            if eq:
                overrides.append((pattern, get_codec(codec)))
            elif default is not None:
                raise CodecError(f"compression plan {spec!r}: two defaults, {default.spec!r} and {codec!r}")
            else:
                default = get_codec(codec)
        return cls(default or get_codec("none"), tuple(overrides))

    def codec_for(self, tensor_name: str) -> Codec:
        for pattern, codec in self.overrides:
            if fnmatchcase(tensor_name, pattern):
                return codec
        return self.default
