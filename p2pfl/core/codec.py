"""Codecs that compress one tensor for the wire: the base class, its checks, and the dense quantizers.

Pure functions of their inputs (no I/O, no global RNG), so sender and receiver decode the same
bytes to bit-identical tensors and CHOCO replicas never drift. Every lossy codec is a
*contraction*, ``||x - Q(x)||^2 <= (1 - delta) ||x||^2`` with ``delta > 0`` (in expectation for
random-k), which is what CHOCO-Gossip needs to reach exact consensus anyway. Specs and per-tensor
plans are parsed in `p2pfl.core.specs` and built in `p2pfl.core.compress`; sparsifiers live in
`p2pfl.core.sparsify`.

Part naming: a dense codec's main part is ``data``; under a sparsifier it is ``values`` and the
sparsifier adds ``indices`` (top-k only; random-k ships a seed instead).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from p2pfl.core.specs import DEFAULT_BLOCKS, CodecError, dense_spec
from p2pfl.core.wire import all_finite


@dataclass(frozen=True)
class Encoded:
    """One encoded tensor: ``parts`` travel as raw frames, ``meta`` in the msgpack header."""

    parts: dict[str, torch.Tensor]
    meta: dict[str, float | int]


def encoded_nbytes(enc: Encoded) -> int:
    """Bytes of the raw part frames (meta rides in the header and is not counted)."""
    return sum(p.numel() * p.element_size() for p in enc.parts.values())


# --------------------------------------------------------------------------- validation helpers


def check_part(parts: Mapping[str, object], key: str, dtype: torch.dtype, n: int, who: str) -> torch.Tensor:
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


def meta_int(meta: Mapping[str, object], key: str, who: str, lo: int, hi: int) -> int:
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


class Quantizer(Codec):
    """A dense, element-wise codec; ``key`` names its main part ('data', or 'values' under a sparsifier)."""

    def __init__(self, spec: str, default_gamma: float, key: str) -> None:
        super().__init__(spec, default_gamma)
        self.key = key

    @abstractmethod
    def rekey(self, key: str) -> Quantizer: ...

    @property
    def part_names(self) -> frozenset[str]:
        """One part, the main one; quantizers with side data (scales) extend this."""
        return frozenset({self.key})

    @property
    def meta_names(self) -> frozenset[str]:
        return frozenset()


class NoneCodec(Quantizer):
    """Plain float32, bit-exact."""

    lossless = True

    def __init__(self, key: str = "data") -> None:
        super().__init__("none", 1.0, key)

    def rekey(self, key: str) -> NoneCodec:
        return NoneCodec(key)

    def _encode(self, flat, seed):
        return {self.key: flat}, {}

    def _decode(self, parts, meta, n):
        return check_part(parts, self.key, torch.float32, n, self.spec).clone()


class HalfCodec(Quantizer):
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
        return check_part(parts, self.key, self.dtype, n, self.spec).to(torch.float32)


class Int8Codec(Quantizer):
    """Blockwise absmax int8: per block of B values, scale = max|x|/127 (a float32 part) and
    q = round(x/scale). Error per element <= scale/2, i.e. <= max|block|/254; 8 + 32/B bits/value."""

    def __init__(self, block: int = DEFAULT_BLOCKS["int8"], key: str = "data") -> None:
        super().__init__(dense_spec("int8", block), 1.0, key)
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
        q = check_part(parts, self.key, torch.int8, n, self.spec)
        nb = self._nblocks(n)
        scales = check_part(parts, "scales", torch.float32, nb, self.spec)
        if nb and not (bool(torch.isfinite(scales).all()) and float(scales.min()) >= 0):
            raise CodecError(f"{self.spec}: part 'scales' has a negative or non-finite scale")
        b = self.block
        if n % b:
            out = torch.zeros(nb * b)
            out[:n] = q
        else:
            out = q.to(torch.float32)
        return out.view(nb, b).mul_(scales.unsqueeze(1)).reshape(-1)[:n].contiguous()


class SignCodec(Quantizer):
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

    def __init__(self, block: int | None = DEFAULT_BLOCKS["sign"], key: str = "data") -> None:
        super().__init__(dense_spec("sign", block), 0.3 if block is None else 1.0, key)
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
        bits = check_part(parts, self.key, torch.uint8, -(-n // 8), self.spec)
        pm = torch.from_numpy(np.unpackbits(bits.detach().numpy(), count=n))
        if self.block is None:
            scale = _meta_scale(meta, "scale", self.spec)
            # bit*2s - s is exact in float32, so every peer gets identical +-s.
            return pm.to(torch.float32).mul_(2.0 * scale).sub_(scale)
        b = self.block
        nb = -(-n // b)
        scales = check_part(parts, "scales", torch.float32, nb, self.spec)
        if nb and not (bool(torch.isfinite(scales).all()) and float(scales.min()) >= 0):
            raise CodecError(f"{self.spec}: part 'scales' has a negative or non-finite scale")
        out = torch.zeros(nb * b)
        out[:n] = pm
        return out.mul_(2.0).sub_(1.0).view(nb, b).mul_(scales.unsqueeze(1)).reshape(-1)[:n].contiguous()
