"""Codecs made from specs, and the per-tensor plan that picks a codec for each tensor.

The codecs themselves are `p2pfl.core.codec` (base and quantizers) and `p2pfl.core.sparsify`; the
grammar of specs and plans is `p2pfl.core.specs`, which needs no torch.

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
from collections.abc import Callable

import torch

from p2pfl.core.codec import Codec, HalfCodec, Int8Codec, NoneCodec, Quantizer, SignCodec
from p2pfl.core.sparsify import RandKCodec, TopKCodec
from p2pfl.core.specs import CodecSpec, Plan, parse_codec, parse_plan

__all__ = ["CompressionPlan", "get_codec"]

_SPARSIFIERS = {"topk": TopKCodec, "randk": RandKCodec}
_DENSE: dict[str, Callable[[int | None], Quantizer]] = {
    "none": lambda block: NoneCodec(),
    "fp16": lambda block: HalfCodec(torch.float16),
    "bf16": lambda block: HalfCodec(torch.bfloat16),
    "int8": Int8Codec,  # `parse_codec` always gives int8 its block
    "sign": SignCodec,  # block None: one scale per tensor
}


@functools.lru_cache(maxsize=256)
def _build(s: CodecSpec) -> Codec:
    values = _DENSE[s.values.name](s.values.block)
    return values if s.sparsifier is None else _SPARSIFIERS[s.sparsifier](s.fraction, values)


def get_codec(spec: str) -> Codec:
    """The codec for ``spec`` (cached: codecs are immutable, and receivers look one up per tensor
    received). ``CodecError`` names the bad token."""
    return _get_codec(spec) if isinstance(spec, str) else _build(parse_codec(spec))  # the latter refuses


@functools.lru_cache(maxsize=256)
def _get_codec(spec: str) -> Codec:
    return _build(parse_codec(spec))


class CompressionPlan(Plan[Codec]):
    """Which codec each named tensor uses: overrides by fnmatch pattern, first match wins."""

    @classmethod
    def parse(cls, spec: str) -> CompressionPlan:
        """``"topk:0.05+int8"`` or ``"fp16,*lora_A*=none,blocks.0.*=int8"`` (`p2pfl.core.specs.parse_plan`)."""
        plan = parse_plan(spec)
        return cls(_build(plan.default), tuple((p, _build(c)) for p, c in plan.overrides))
