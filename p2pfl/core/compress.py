"""Codec specs and the per-tensor plan that picks a codec for each tensor.

The codecs themselves are `p2pfl.core.codec` (base and quantizers) and `p2pfl.core.sparsify`.

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
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from fractions import Fraction

import torch

from p2pfl.core.codec import Codec, CodecError, HalfCodec, Int8Codec, NoneCodec, Quantizer, SignCodec
from p2pfl.core.sparsify import RandKCodec, Sparsifier, TopKCodec

__all__ = ["CompressionPlan", "get_codec"]


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
    if not isinstance(first, Sparsifier):
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
    if not isinstance(second, Quantizer) or isinstance(second, NoneCodec):
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
