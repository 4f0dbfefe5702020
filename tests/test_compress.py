"""Codecs: round trips, spec grammar, contraction (what CHOCO relies on), and hostile decode input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from p2pfl.core import wire
from p2pfl.core.codec import Codec, CodecError, Encoded, encoded_nbytes
from p2pfl.core.compress import CompressionPlan, get_codec
from p2pfl.core.sparsify import RandKCodec

LOSSY = [
    "fp16",
    "bf16",
    "int8",
    "int8:64",
    "sign",
    "sign:tensor",
    "sign:64",
    "sign:5",
    "topk:0.05",
    "randk:0.1",
    "topk:0.05+int8",
    "topk:0.05+fp16",
    "topk:0.1+bf16",
    "topk:0.1+sign",
    "topk:0.1+sign:16",
    "topk:0.1+sign:tensor",
    "randk:0.1+fp16",
    "randk:0.2+int8",
    "randk:0.2+sign",
]
ALL = ["none", *LOSSY]
SHAPES = [(), (0,), (1,), (7,), (3, 5), (257,), (4, 8, 33)]
FP16_MAX = 65504.0


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def roundtrip(spec: str, x: torch.Tensor, seed: int = 0) -> tuple[Encoded, torch.Tensor]:
    c = get_codec(spec)
    enc = c.encode(x, seed=seed)
    return enc, c.decode(enc, tuple(x.shape))


def stages(spec: str) -> tuple[str, str | None]:
    """(sparsifier or dense codec, quantizer of the kept values or None)."""
    first, _, second = spec.partition("+")
    return first, second or None


def k_of(spec: str, n: int) -> int:
    first, _ = stages(spec)
    if first.startswith(("topk", "randk")):
        f = float(first.split(":")[1])
        return 0 if n == 0 else min(n, max(1, math.ceil(round(f * n, 9))))
    return n


def contraction_delta(spec: str, x: torch.Tensor) -> float:
    """A delta with ||x - Q(x)||^2 <= (1 - delta) ||x||^2, as derived for each codec."""
    first, second = stages(spec)
    x = x.double()
    d = x.numel()

    def quant_delta(q: str, v: torch.Tensor) -> float:
        if q.startswith("sign"):  # the worst block's ||v||_1^2 / (len ||v||_2^2)
            arg = q.partition(":")[2] or "128"
            block = max(1, v.numel()) if arg == "tensor" else int(arg)
            blocks = [b for b in v.split(block) if bool((b != 0).any())]
            return min((float(b.abs().sum() ** 2 / (b.numel() * (b**2).sum())) for b in blocks), default=1.0)
        if q == "fp16":
            return 1 - 2.0**-22  # relative error <= 2^-11 for normal fp16 numbers
        if q == "bf16":
            return 1 - 2.0**-16
        block = int(q.split(":")[1]) if ":" in q else 256
        return 1 - min(block, v.numel()) / 254.0**2  # |err| <= max|block| / 254 per element

    if first.startswith("topk"):
        k = k_of(spec, d)
        kept = x.flatten()[x.flatten().abs().topk(k).indices]
        return k / d * (quant_delta(second, kept) if second else 1.0)
    return quant_delta(first, x.flatten())


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("shape", SHAPES)
def test_none_is_bit_exact_and_returns_a_fresh_tensor(shape):
    x = randn(*shape)
    enc, y = roundtrip("none", x)
    assert torch.equal(x, y) and y.dtype == torch.float32 and y.shape == x.shape
    y.add_(1.0)  # decode must not alias the (possibly read-only) wire buffer
    assert torch.equal(enc.parts["data"].reshape(shape), x)
    assert get_codec("none").lossless and get_codec("none").default_gamma == 1.0


@pytest.mark.parametrize("spec", ALL)
@pytest.mark.parametrize("shape", SHAPES)
def test_roundtrip_shape_dtype_and_input_untouched(spec, shape):
    x = randn(*shape, seed=1) * 3
    x0 = x.clone()
    enc, y = roundtrip(spec, x, seed=5)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.equal(x, x0)
    for p in enc.parts.values():
        assert p.device.type == "cpu" and p.is_contiguous() and p.dim() == 1
    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in enc.meta.values())
    assert get_codec(spec).lossless == (spec == "none")


@pytest.mark.parametrize("n", [1, 1000, 4099])
def test_dense_codec_error_bounds(n):
    x = randn(n, seed=2) * 10
    _, y = roundtrip("fp16", x)
    assert torch.all((y - x).abs() <= x.abs() * 2.0**-11 + 2.0**-25)
    _, y = roundtrip("bf16", x)
    assert torch.all((y - x).abs() <= x.abs() * 2.0**-8)
    for block in (256, 64, 1):
        _, y = roundtrip(f"int8:{block}", x)
        pad = torch.zeros(-(-n // block) * block)
        pad[:n] = x.abs()
        bound = (pad.view(-1, block).amax(1) / 254).repeat_interleave(block)[:n]
        assert torch.all((y - x).abs() <= bound * (1 + 1e-5) + 1e-30)
    enc, y = roundtrip("sign:tensor", x)
    s = enc.meta["scale"]
    assert s == pytest.approx(float(x.abs().mean()))
    assert torch.equal(y, torch.where(x >= 0, s, -s).to(torch.float32))
    enc, y = roundtrip("sign", x)  # plain sign is blockwise: sign:128
    assert set(enc.parts) == {"data", "scales"} and not enc.meta
    assert torch.equal(y, roundtrip("sign:128", x)[1])
    for block in (128, 64, 7, 1):
        enc, y = roundtrip(f"sign:{block}", x)
        means = torch.stack([b.abs().mean() for b in x.split(block)])
        assert torch.allclose(enc.parts["scales"], means, rtol=1e-6)
        expect = torch.where(x >= 0, 1.0, -1.0) * means.repeat_interleave(block)[:n]
        assert torch.allclose(y, expect, rtol=1e-6)
    _, y = roundtrip("sign:1", x)
    assert torch.equal(y, x)  # one scale per value is lossless


def test_fp16_saturates_instead_of_overflowing_and_sign_counts_zero_as_plus():
    x = torch.tensor([1e6, -1e6, 1.0, 70000.0])
    _, y = roundtrip("fp16", x)
    assert y.tolist() == [FP16_MAX, -FP16_MAX, 1.0, FP16_MAX]
    _, y = roundtrip("bf16", torch.tensor([3.4e38, -3.4e38]))
    assert torch.isfinite(y).all()
    _, y = roundtrip("sign", torch.tensor([0.0, -0.0, 2.0, -2.0]))
    assert y.tolist() == [1.0, 1.0, 1.0, -1.0]
    _, y = roundtrip("sign", torch.zeros(5))
    assert torch.equal(y, torch.zeros(5))
    _, y = roundtrip("int8", torch.zeros(300))
    assert torch.equal(y, torch.zeros(300))


def test_topk_keeps_exactly_the_largest_magnitudes():
    x = randn(1000, seed=3)
    enc, y = roundtrip("topk:0.05", x)
    assert enc.meta["k"] == 50 and enc.parts["indices"].dtype == torch.int32
    top = set(x.abs().topk(50).indices.tolist())
    assert set(enc.parts["indices"].tolist()) == top
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[list(top)] = True
    assert torch.equal(y[mask], x[mask]) and torch.all(y[~mask] == 0)
    _, y = roundtrip("topk:1", x)
    assert torch.equal(y, x)


@pytest.mark.parametrize("case", ["gaussian", "sample_biased", "ties", "sparse"])
@pytest.mark.parametrize("frac", [0.001, 0.05, 0.25])
def test_topk_fast_path_is_exact_on_large_tensors(case, frac):
    n = 200_000
    x = randn(n, seed=13)
    if case == "sample_biased":  # the strided sample sees only the big values
        x = torch.full((n,), 0.5)
        x[:: n >> 16] = 10.0
        x[1 :: n >> 16] = 9.0
    elif case == "ties":
        x = torch.ones(n)
        x[::7] = -2.0
    elif case == "sparse":
        x = torch.zeros(n)
        x[:50] = torch.arange(1.0, 51.0)
    enc, _ = roundtrip(f"topk:{frac}", x)
    k = enc.meta["k"]
    got = x[enc.parts["indices"].long()].abs().sort().values
    assert torch.equal(got, x.abs().topk(k).values.sort().values)
    assert int(torch.unique(enc.parts["indices"]).numel()) == k


def test_randk_indices_are_distinct_stratified_and_unbiased_in_inclusion():
    c = get_codec("randk:0.1")
    assert isinstance(c, RandKCodec)
    n, k = 1003, 101
    counts = torch.zeros(n)
    for seed in range(2000):
        idx = c.indices(seed, n, k)
        assert idx.numel() == k and bool((idx[1:] > idx[:-1]).all()) and int(idx[0]) >= 0 and int(idx[-1]) < n
        counts[idx] += 1
    # every coordinate is kept with probability ~ k/n (strata differ in size by at most one)
    freq = counts / 2000
    assert float(freq.min()) > 0.06 and float(freq.max()) < 0.14
    assert float(freq.mean()) == pytest.approx(k / n)


def test_randk_keeps_its_values_and_zeros_the_rest():
    x = randn(500, seed=4)
    enc, y = roundtrip("randk:0.1", x, seed=9)
    idx = get_codec("randk:0.1").indices(9, 500, 50)
    assert enc.meta == {"k": 50, "seed": 9} and set(enc.parts) == {"values"}
    assert torch.equal(y[idx], x[idx]) and int((y != 0).sum()) == 50


@pytest.mark.parametrize("spec", ["topk:0.1+fp16", "topk:0.1+int8", "randk:0.1+int8", "randk:0.1+sign"])
def test_composition_quantizes_the_kept_values(spec):
    x = randn(2000, seed=5)
    sparse, quant = stages(spec)
    _, ys = roundtrip(sparse, x, seed=3)
    _, yc = roundtrip(spec, x, seed=3)
    kept = ys != 0
    assert torch.equal(yc != 0, kept) or quant == "int8"  # int8 may round tiny kept values to 0
    assert torch.all(yc[~kept] == 0)
    _, yq = roundtrip(quant, ys[kept])
    assert torch.equal(yc[kept], yq)


# -------------------------------------------------------------------------------------- contraction

finite_vectors = arrays(
    np.float32,
    st.integers(1, 600),
    elements=st.one_of(
        st.just(0.0), st.floats(2**-10, 2**10, width=32), st.floats(-(2**10), -(2**-10), width=32)
    ),
)


@pytest.mark.parametrize("spec", [s for s in LOSSY if not s.startswith("randk")])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(v=finite_vectors)
def test_deterministic_codecs_contract(spec, v):
    x = torch.from_numpy(v.copy())
    norm2 = float((x.double() ** 2).sum())
    _, y = roundtrip(spec, x)
    err2 = float(((x.double() - y.double()) ** 2).sum())
    delta = contraction_delta(spec, x)
    assert 0 < delta <= 1 + 1e-9
    delta = min(delta, 1.0)
    assert err2 <= (1 - delta) * norm2 * (1 + 1e-5) + 1e-12 * norm2  # slack: float32 rounding of scales


@pytest.mark.parametrize("spec", [s for s in LOSSY if s.startswith("randk")])
@settings(max_examples=40, deadline=None)
@given(v=finite_vectors, seed=st.integers(0, 2**64 - 1))
def test_randk_never_expands(spec, v, seed):
    x = torch.from_numpy(v.copy())
    _, y = roundtrip(spec, x, seed=seed)
    assert float(((x - y).double() ** 2).sum()) <= float((x.double() ** 2).sum()) * (1 + 1e-5)


@pytest.mark.parametrize("spec", ["randk:0.1", "randk:0.2+int8"])
def test_randk_contracts_in_expectation(spec):
    x = randn(999, seed=6) ** 3  # heavy-tailed, so a lucky/unlucky draw matters
    k = k_of(spec, 999)
    ratios = []
    for seed in range(400):
        _, y = roundtrip(spec, x, seed=seed)
        ratios.append(float(((x - y) ** 2).sum() / (x**2).sum()))
    assert np.mean(ratios) == pytest.approx(1 - k / 999, abs=0.02)


# --------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("spec", ALL)
def test_same_input_and_seed_give_identical_bytes(spec):
    x = randn(3001, seed=7)
    a, b = get_codec(spec).encode(x, seed=42), get_codec(spec).encode(x.clone(), seed=42)
    assert a.meta == b.meta and a.parts.keys() == b.parts.keys()
    assert all(torch.equal(a.parts[k], b.parts[k]) for k in a.parts)


def test_randk_seed_matters_and_indices_are_a_fixed_function_of_it():
    c = get_codec("randk:0.05")
    x = randn(4000, seed=8)
    assert not torch.equal(c.decode(c.encode(x, seed=1), (4000,)), c.decode(c.encode(x, seed=2), (4000,)))
    # pinned values: the index stream must not change across library versions or peers
    assert c.indices(123, 1000, 5).tolist() == [75, 348, 440, 671, 922]
    assert c.indices(0, 10, 10).tolist() == list(range(10))
    assert c.indices(2**64 - 1, 2**31 - 1, 3).max() < 2**31 - 1
    with pytest.raises(CodecError, match="seed"):
        c.encode(x, seed=-1)
    with pytest.raises(CodecError, match="seed"):
        c.encode(x, seed=2**64)


@pytest.mark.parametrize("seed", [0, 1, 1234567, 2**63, 2**64 - 1])
def test_splitmix64_matches_the_scalar_reference(seed):
    from p2pfl.core.prng import splitmix64

    from .test_wire_spec import splitmix64 as scalar_splitmix64  # the spec's textbook recurrence

    assert splitmix64(seed, 50).tolist() == scalar_splitmix64(seed, 50)
    if seed == 0:
        assert splitmix64(0, 1).tolist() == [0xE220A8397B1DCDAF]  # widely published first output


# ------------------------------------------------------------------------------------- spec grammar


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("none", "none"),
        ("fp16", "fp16"),
        (" bf16 ", "bf16"),
        ("int8", "int8"),
        ("int8:256", "int8"),
        ("int8:64", "int8:64"),
        ("sign", "sign"),
        ("sign:128", "sign"),
        ("sign:tensor", "sign:tensor"),
        ("sign:64", "sign:64"),
        ("topk:0.1+sign:tensor", "topk:0.1+sign:tensor"),
        ("topk:0.1+sign:16", "topk:0.1+sign:16"),
        ("topk:0.05", "topk:0.05"),
        ("topk:.05", "topk:0.05"),
        ("topk:1", "topk:1.0"),
        ("topk:5e-2", "topk:0.05"),
        ("randk:0.1", "randk:0.1"),
        ("topk:0.05+int8", "topk:0.05+int8"),
        ("topk:0.05 + int8:128", "topk:0.05+int8:128"),
        ("topk:0.05+fp16", "topk:0.05+fp16"),
        ("randk:0.1+fp16", "randk:0.1+fp16"),
        ("randk:0.1+sign", "randk:0.1+sign"),
    ],
)
def test_spec_parses_to_canonical_form(spec, canonical):
    c = get_codec(spec)
    assert isinstance(c, Codec) and c.spec == canonical
    assert get_codec(c.spec).spec == canonical
    assert 0 < c.default_gamma <= 1


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("gzip", "'gzip'"),
        ("topk", "topk:0.05"),
        ("topk:", "fraction"),
        ("topk:0", "outside (0, 1]"),
        ("topk:1.5", "outside (0, 1]"),
        ("topk:-0.1", "'topk:-0.1'"),
        ("topk:nan", "'topk:nan'"),
        ("topk:inf", "'topk:inf'"),
        ("topk:1/3", "'topk:1/3'"),
        ("randk:1e-400", "outside"),
        ("int8:0", "block size"),
        ("int8:x", "'x'"),
        ("int8:1.5", "'1.5'"),
        ("fp16:3", "'fp16:3'"),
        ("sign:0", "block size"),
        ("sign:", "block size"),
        ("sign:-4", "'-4'"),
        ("sign:whole", "or 'tensor'"),
        ("int8:tensor", "'tensor'"),
        ("none+int8", "'none'"),
        ("sign+int8", "after 'sign'"),
        ("int8+fp16", "after 'int8'"),
        ("fp16+topk:0.1", "after 'fp16'"),
        ("topk:0.1+topk:0.2", "'topk:0.2'"),
        ("topk:0.1+none", "'none'"),
        ("topk:0.1+int8+fp16", "after 'int8'"),
        ("topk:0.1+", "empty stage"),
        ("+int8", "empty stage"),
        ("topk:0.1+gzip", "'gzip'"),
    ],
)
def test_bad_specs_are_rejected_naming_the_token(spec, names):
    with pytest.raises(CodecError) as e:
        get_codec(spec)
    assert names in str(e.value)


def test_get_codec_rejects_non_strings_with_codec_error():
    for bad in (None, 3, ["fp16"]):
        with pytest.raises(CodecError):
            get_codec(bad)  # type: ignore[arg-type]


def test_encode_refuses_nonfinite_and_nonfloat_input():
    for bad in (torch.tensor([1.0, float("nan")]), torch.tensor([float("inf")]), torch.arange(3)):
        for spec in ALL:
            with pytest.raises(CodecError):
                get_codec(spec).encode(bad)
    # float64 and half inputs are accepted and decoded as float32
    _, y = roundtrip("fp16", torch.ones(3, dtype=torch.float64))
    assert y.dtype == torch.float32 and y.tolist() == [1.0, 1.0, 1.0]


# ------------------------------------------------------------------------------------------- plans


def test_plan_default_overrides_first_match_wins():
    plan = CompressionPlan.parse("fp16, *lora_A*=none ,blocks.0.*=int8,*=sign")
    assert plan.spec == "fp16,*lora_A*=none,blocks.0.*=int8,*=sign"
    assert plan.codec_for("blocks.0.lora_A.weight").spec == "none"
    assert plan.codec_for("blocks.0.lora_B.weight").spec == "int8"
    assert plan.codec_for("blocks.1.lora_B.weight").spec == "sign"
    assert CompressionPlan.parse(plan.spec).spec == plan.spec
    plan = CompressionPlan.parse("topk:0.05+int8")
    assert plan.spec == "topk:0.05+int8" and plan.codec_for("anything").spec == "topk:0.05+int8"
    plan = CompressionPlan.parse("*lora_B*=sign")
    assert plan.codec_for("x.lora_B").spec == "sign" and plan.codec_for("x.lora_A").spec == "none"
    plan = CompressionPlan.parse("int8,BLOCKS.*=fp16")  # case-sensitive on every platform
    assert plan.codec_for("blocks.0").spec == "int8"


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ("", "empty"),
        ("fp16,int8", "two defaults"),
        ("fp16,", "malformed"),
        ("fp16,=int8", "malformed"),
        ("fp16,*A*=", "malformed"),
        ("fp16,*A*=gzip", "'gzip'"),
        ("topk:2", "outside"),
    ],
)
def test_bad_plans_are_rejected(spec, names):
    with pytest.raises(CodecError) as e:
        CompressionPlan.parse(spec)
    assert names in str(e.value)


# ------------------------------------------------------------------------------------ byte accounting


@pytest.mark.parametrize(
    ("spec", "nbytes"),
    [
        ("none", lambda n, k: 4 * n),
        ("fp16", lambda n, k: 2 * n),
        ("bf16", lambda n, k: 2 * n),
        ("int8", lambda n, k: n + 4 * -(-n // 256)),
        ("int8:64", lambda n, k: n + 4 * -(-n // 64)),
        ("sign", lambda n, k: -(-n // 8) + 4 * -(-n // 128)),
        ("sign:tensor", lambda n, k: -(-n // 8)),
        ("sign:64", lambda n, k: -(-n // 8) + 4 * -(-n // 64)),
        ("topk:0.05", lambda n, k: 8 * k),
        ("topk:0.05+int8", lambda n, k: 5 * k + 4 * -(-k // 256)),
        ("topk:0.05+fp16", lambda n, k: 6 * k),
        ("topk:0.1+sign", lambda n, k: 4 * k + -(-k // 8) + 4 * -(-k // 128)),
        ("topk:0.1+sign:tensor", lambda n, k: 4 * k + -(-k // 8)),
        ("randk:0.1", lambda n, k: 4 * k),
        ("randk:0.1+fp16", lambda n, k: 2 * k),
        ("randk:0.2+int8", lambda n, k: k + 4 * -(-k // 256)),
        ("randk:0.2+sign", lambda n, k: -(-k // 8) + 4 * -(-k // 128)),
    ],
)
def test_compression_ratio(spec, nbytes):
    for n in (1, 1000, 100_003):
        enc = get_codec(spec).encode(randn(n, seed=n))
        k = k_of(spec, n)
        assert encoded_nbytes(enc) == nbytes(n, k)
    # the headline ratios at a realistic size
    ratio = encoded_nbytes(get_codec(spec).encode(randn(1 << 20))) / (4 << 20)
    expected = {
        "sign": 1.25 / 32,
        "sign:tensor": 1 / 32,
        "sign:64": 1.5 / 32,
        "int8": 0.2539,
        "topk:0.05+int8": 0.05 * (5 + 4 / 256) / 4,
        "randk:0.2+sign": 0.2 * 1.25 / 32,
    }
    if spec in expected:
        assert ratio == pytest.approx(expected[spec], rel=1e-3)


def test_k_uses_exact_fractions():
    assert get_codec("topk:0.1").encode(randn(30)).meta["k"] == 3  # 0.1 * 30 in floats ceils to 4
    assert get_codec("randk:0.3").encode(randn(10)).meta["k"] == 3
    assert get_codec("topk:0.001").encode(randn(5)).meta["k"] == 1


# ------------------------------------------------------------------------------------ hostile decode


def tamper_cases(spec: str) -> list[tuple[str, dict, dict]]:
    """(what, parts, meta) variants of a valid 300-value encoding that must all be rejected."""
    enc = get_codec(spec).encode(randn(300, seed=11), seed=4)
    p, m = enc.parts, enc.meta
    cases = []
    for key, t in p.items():
        wrong = torch.float64 if t.dtype != torch.float64 else torch.float32
        cases.append((f"{key} dtype", {**p, key: t.to(wrong)}, m))
        if t.numel():
            cases.append((f"{key} truncated", {**p, key: t[:-1]}, m))
        cases.append((f"{key} too long", {**p, key: torch.cat([t, t[:1]])}, m))
        cases.append((f"{key} 2-d", {**p, key: t.reshape(1, -1)}, m))
        cases.append((f"{key} missing", {k: v for k, v in p.items() if k != key}, m))
        cases.append((f"{key} not a tensor", {**p, key: t.tolist()}, m))
        if t.is_floating_point():
            bad = t.clone()
            bad[0] = float("nan")
            cases.append((f"{key} NaN", {**p, key: bad}, m))
    cases.append(("extra part", {**p, "extra": torch.zeros(1)}, m))
    cases.append(("extra meta", p, {**m, "extra": 1}))
    for key, v in m.items():
        cases.append((f"{key} missing", p, {k: w for k, w in m.items() if k != key}))
        cases.append((f"{key} as string", p, {**m, key: str(v)}))
        cases.append((f"{key} as bool", p, {**m, key: True}))
        cases.append((f"{key} negative", p, {**m, key: -1}))
        if key in ("k", "seed"):
            cases.append((f"{key} as float", p, {**m, key: float(v)}))
        if key == "k":
            cases.append(("k mismatch", p, {**m, "k": v + 1}))
        if key == "scale":
            cases.append(("scale NaN", p, {**m, "scale": float("nan")}))
            cases.append(("scale inf", p, {**m, "scale": float("inf")}))
    if "indices" in p:
        idx = p["indices"]
        for what, val in (
            ("index out of range", 300),
            ("negative index", -1),
            ("duplicate index", int(idx[1])),
        ):
            bad = idx.clone()
            bad[0] = val
            cases.append((what, {**p, "indices": bad}, m))
    if "scales" in p:
        bad = p["scales"].clone()
        bad[0] = -1.0
        cases.append(("negative scale", {**p, "scales": bad}, m))
    return cases


@pytest.mark.parametrize("spec", ALL)
def test_decode_rejects_tampered_parts_with_codec_error_only(spec):
    c = get_codec(spec)
    cases = tamper_cases(spec)
    assert len(cases) >= 8
    for what, parts, meta in cases:
        with pytest.raises(CodecError):
            c.decode(Encoded(parts=parts, meta=meta), (300,))
            pytest.fail(f"{spec}: accepted {what}")
    good = c.encode(randn(300, seed=11), seed=4)
    # (a wrong shape whose part sizes happen to match, e.g. 299 for topk:0.05, is the caller's check)
    for shape in ((1000,), (30, 30), (-1,), ("3",), (True,), None):
        with pytest.raises(CodecError):
            c.decode(good, shape)  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        c.decode("not encoded", (300,))  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", ALL)
def test_decode_reads_read_only_wire_buffers_without_writing(spec):
    x = randn(1000, seed=12)
    enc = get_codec(spec).encode(x, seed=3)
    msg = wire.Message(
        wire.Kind.DELTA,
        sender=1,
        tensors={
            "w": wire.TensorPayload(codec=spec, shape=(1000,), parts=dict(enc.parts), meta=dict(enc.meta))
        },
    )
    frames = [bytes(f) for f in wire.encode(msg)]  # immutable, like zmq frames
    tp = wire.decode(frames).tensors["w"]
    y = get_codec(tp.codec).decode(Encoded(parts=tp.parts, meta=tp.meta), tuple(tp.shape))
    assert torch.equal(y, get_codec(spec).decode(enc, (1000,)))
    assert [bytes(f) for f in wire.encode(msg)] == frames


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32, torch.int64]
_META_VALUES = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
)


@st.composite
def fuzzed_encodings(draw):
    spec = draw(st.sampled_from(ALL))
    n = draw(st.integers(0, 70))
    good = get_codec(spec).encode(randn(n, seed=n), seed=draw(st.integers(0, 2**32)))
    parts = {}
    for key in draw(
        st.sets(st.sampled_from([*good.parts, "values", "indices", "scales", "data", "x"]), max_size=4)
    ):
        ref = good.parts.get(key)
        length = draw(st.integers(0, 80)) if ref is None or draw(st.booleans()) else ref.numel()
        dtype = draw(st.sampled_from(_DTYPES)) if ref is None or draw(st.booleans()) else ref.dtype
        if dtype.is_floating_point:
            raw = draw(arrays(np.float32, length, elements=st.floats(width=32)))
            parts[key] = torch.from_numpy(raw).to(dtype)
        else:
            info = torch.iinfo(dtype)
            vals = draw(
                st.lists(
                    st.integers(max(info.min, -(2**40)), min(info.max, 2**40)),
                    min_size=length,
                    max_size=length,
                )
            )
            parts[key] = torch.tensor(vals, dtype=dtype).reshape(-1)
    meta = {}
    for key in draw(st.sets(st.sampled_from([*good.meta, "k", "seed", "scale", "z"]), max_size=4)):
        meta[key] = good.meta[key] if key in good.meta and draw(st.booleans()) else draw(_META_VALUES)
    return spec, n, parts, meta


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=fuzzed_encodings())
def test_fuzzed_decode_raises_only_codec_error(case):
    spec, n, parts, meta = case
    try:
        y = get_codec(spec).decode(Encoded(parts=parts, meta=meta), (n,))
    except CodecError:
        return
    assert y.shape == (n,) and y.dtype == torch.float32 and bool(torch.isfinite(y).all())


@settings(max_examples=200, deadline=None)
@given(spec=st.text(alphabet="topkrandintfbsg0123456789.:+e-, ", max_size=20))
def test_fuzzed_specs_parse_or_raise_codec_error(spec):
    try:
        c = get_codec(spec)
    except CodecError:
        return
    assert get_codec(c.spec).spec == c.spec
