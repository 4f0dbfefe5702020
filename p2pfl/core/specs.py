"""The grammar of a peer's spec strings and the checks of its settings that need no model.

Pure and light (no torch): the CLI runs `check_peer` right after resolving the config,
so a bad ``--compress``, ``--robust``, ``--byzantine`` or ``--clusters`` value, or a combination
of settings the node refuses, costs no start-up time. The modules that act on the specs build on
what is parsed here (`p2pfl.core.compress` makes codecs of `CodecSpec`s, `p2pfl.core.robust` runs
`RobustSpec`s and `ByzantineSpec`s), so each rule is written once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from fractions import Fraction
from typing import TYPE_CHECKING, Generic, Literal, Protocol, TypeVar

from p2pfl.config import ConfigError, PeerConfig
from p2pfl.errors import P2pflError

if TYPE_CHECKING:
    from p2pfl.core.topology import Topology

# ------------------------------------------------------------------------------------ codec specs


class CodecError(P2pflError, ValueError):
    """A bad codec spec, bad input to encode, or encoded parts/meta that do not fit together."""


QUANTIZERS = ("fp16", "bf16", "int8", "sign")
SPARSIFIERS = ("topk", "randk")
KNOWN_CODECS = ("none", *QUANTIZERS, *SPARSIFIERS)
DEFAULT_BLOCKS = {"int8": 256, "sign": 128}  # what plain ``int8`` and ``sign`` mean
MAX_BLOCK = 2**24
_NUMBER = re.compile(r"(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def dense_spec(name: str, block: int | None) -> str:
    """The canonical spec of a dense codec: ``int8``, ``int8:64``, ``sign``, ``sign:tensor``, ``fp16``."""
    if name == "sign" and block is None:
        return "sign:tensor"
    return name if block is None or block == DEFAULT_BLOCKS.get(name) else f"{name}:{block}"


def sparse_spec(name: str, fraction: Fraction, values: str) -> str:
    """The canonical spec of a sparsifier whose kept values travel as `values` (a dense spec)."""
    return f"{name}:{float(fraction)!r}" + ("" if values == "none" else f"+{values}")


@dataclass(frozen=True)
class DenseSpec:
    """A dense codec: ``none``, ``fp16``, ``bf16``, ``int8`` or ``sign``; `block` is the values per
    scale of int8 and sign (sign: None for one scale per tensor), None for the others."""

    name: str
    block: int | None = None

    @property
    def spec(self) -> str:
        return dense_spec(self.name, self.block)


@dataclass(frozen=True)
class CodecSpec:
    """A parsed codec spec: a dense codec alone, or a sparsifier (``topk``/``randk``) keeping a
    `fraction` of the values, which `values` then compresses."""

    values: DenseSpec
    sparsifier: str | None = None
    fraction: Fraction = Fraction(1)

    @property
    def spec(self) -> str:
        return self.values.spec if self.sparsifier is None else sparse_spec(self.sparsifier, self.fraction, self.values.spec)


def _parse_stage(token: str) -> CodecSpec:
    name, sep, arg = token.strip().partition(":")
    name, arg = name.strip(), arg.strip()
    if name not in KNOWN_CODECS:
        raise CodecError(f"unknown codec {name!r} in {token!r}; known: {', '.join(KNOWN_CODECS)}")
    if name in SPARSIFIERS:
        if not sep or not _NUMBER.fullmatch(arg):
            raise CodecError(f"{name}: needs a fraction in (0, 1], e.g. {name}:0.05; got {token!r}")
        f = float(arg)
        if not 0 < f <= 1:
            raise CodecError(f"{name}: fraction {arg} is outside (0, 1]")
        # Canonical value: the double's shortest decimal, exactly, so k agrees on every peer.
        return CodecSpec(DenseSpec("none"), name, Fraction(repr(f)))
    if name in DEFAULT_BLOCKS:
        if not sep:
            return CodecSpec(DenseSpec(name, DEFAULT_BLOCKS[name]))
        if name == "sign" and arg == "tensor":
            return CodecSpec(DenseSpec("sign"))
        if not arg.isdigit() or not 1 <= int(arg) <= MAX_BLOCK:
            also = " or 'tensor'" if name == "sign" else ""
            raise CodecError(f"{name}: block size must be an integer in [1, 2^24]{also}, got {arg!r}")
        return CodecSpec(DenseSpec(name, int(arg)))
    if sep:
        raise CodecError(f"{name}: takes no parameter, got {token!r}")
    return CodecSpec(DenseSpec(name))


def parse_codec(spec: object) -> CodecSpec:
    """``SPEC`` or ``SPARSIFIER+QUANTIZER`` (`p2pfl.core.compress` lists them); `CodecError`
    names the bad token."""
    if not isinstance(spec, str) or not spec.strip():
        raise CodecError(f"empty codec spec {spec!r}")
    tokens = spec.split("+")
    if any(not t.strip() for t in tokens):
        raise CodecError(f"codec spec {spec!r}: empty stage around '+'")
    stages = [_parse_stage(t) for t in tokens]
    first = stages[0]
    if len(stages) == 1:
        return first
    if first.sparsifier is None:
        why = "it is lossless already" if first.values.name == "none" else "only topk/randk may be followed by a quantizer"
        raise CodecError(f"codec spec {spec!r}: nothing can be composed after {first.spec!r} ({why})")
    if len(stages) > 2:
        raise CodecError(f"codec spec {spec!r}: nothing can be composed after {stages[1].spec!r} (at most SPARSIFIER+QUANTIZER)")
    second = stages[1]
    if second.sparsifier is not None or second.values.name == "none":
        raise CodecError(f"codec spec {spec!r}: {second.spec!r} cannot compress the kept values; use one of {', '.join(QUANTIZERS)}")
    return CodecSpec(second.values, first.sparsifier, first.fraction)


class _Named(Protocol):
    @property
    def spec(self) -> str: ...


C = TypeVar("C", bound=_Named)


@dataclass(frozen=True)
class Plan(Generic[C]):
    """Which codec each named tensor uses: a default and (fnmatch pattern, codec) overrides, the
    first match winning. `parse_plan` gives one of `CodecSpec`s; `p2pfl.core.compress.CompressionPlan`
    is one of codecs."""

    default: C
    overrides: tuple[tuple[str, C], ...] = ()

    @property
    def spec(self) -> str:
        return ",".join([self.default.spec, *(f"{p}={c.spec}" for p, c in self.overrides)])

    def codecs(self) -> tuple[C, ...]:
        return (self.default, *(c for _, c in self.overrides))

    def codec_for(self, tensor_name: str) -> C:
        for pattern, codec in self.overrides:
            if fnmatchcase(tensor_name, pattern):
                return codec
        return self.default


def parse_plan(spec: object) -> Plan[CodecSpec]:
    """``"topk:0.05+int8"`` or ``"fp16,*lora_A*=none,blocks.0.*=int8"``; a plan with only
    overrides sends everything else uncompressed (``none``)."""
    if not isinstance(spec, str) or not spec.strip():
        raise CodecError(f"empty compression plan {spec!r}")
    default: CodecSpec | None = None
    overrides: list[tuple[str, CodecSpec]] = []
    for item in spec.split(","):
        pattern, eq, codec = item.rpartition("=")
        pattern, codec = pattern.strip(), codec.strip()
        if not codec or (eq and not pattern):
            raise CodecError(f"compression plan {spec!r}: malformed entry {item!r} (want SPEC or PATTERN=SPEC)")
        if eq:
            overrides.append((pattern, parse_codec(codec)))
        elif default is not None:
            raise CodecError(f"compression plan {spec!r}: two defaults, {default.spec!r} and {codec!r}")
        else:
            default = parse_codec(codec)
    return Plan(default or parse_codec("none"), tuple(overrides))


# ------------------------------------------------------------------------------ robust and attacks


class RobustError(P2pflError, ValueError):
    """A robust-aggregation or fault-injection spec that cannot be used."""


@dataclass(frozen=True)
class RobustSpec:
    """A checked ``--robust`` rule (`p2pfl.core.robust` says what each does)."""

    kind: str  # "off", "clip", "trimmed", "median"
    tau: float | None = None
    trim: int = 0

    @classmethod
    def parse(cls, spec: str | None) -> RobustSpec:
        if spec in (None, "", "off", "none"):
            return cls("off")
        name, _, arg = str(spec).partition(":")
        try:
            if name == "clip":
                tau = float(arg) if arg else None
                if tau is not None and not (tau > 0 and math.isfinite(tau)):
                    raise RobustError(f"robust: clip threshold must be positive, got {arg!r}")
                return cls("clip", tau=tau)
            if name == "trimmed":
                b = int(arg or 1)
                if b < 1:
                    raise RobustError(f"robust: trimmed needs B >= 1, got {arg!r}")
                return cls("trimmed", trim=b)
            if name == "median" and not arg:
                return cls("median")
        except ValueError as e:
            if isinstance(e, RobustError):
                raise
            raise RobustError(f"robust: bad number in {spec!r}") from None
        raise RobustError(f"robust: unknown spec {spec!r}; use off, clip[:TAU], trimmed:B or median")


def _positive(v: float) -> bool:
    return v > 0 and math.isfinite(v)


def _non_negative(v: float) -> bool:
    return v >= 0 and math.isfinite(v)


@dataclass(frozen=True)
class AttackForm:
    """How a ``--byzantine`` attack is written: its usage (as error messages list it), whether it
    takes a parameter ("required", "optional" or "none"), and what that parameter must be."""

    usage: str
    param: str = "none"
    expect: str = ""
    valid: Callable[[float], bool] = math.isfinite


ATTACKS: dict[str, AttackForm] = {
    "scale": AttackForm("scale:F", "required", "a finite factor F"),
    "noise": AttackForm("noise:S", "required", "a finite standard deviation S >= 0", _non_negative),
    "labelflip": AttackForm("labelflip"),
    "signflip": AttackForm("signflip[:F]", "optional", "a finite factor F > 0 (default 1)", _positive),
    "alie": AttackForm("alie[:Z]", "optional", "a finite z (default: the paper's z_max)"),
    "ipm": AttackForm("ipm[:EPS]", "optional", "a finite epsilon > 0 (default 0.1)", _positive),
    # protocol abuse (floods of resyncs and hellos, far-future sequence numbers): p2pfl.core.abuse
    "abuse": AttackForm("abuse[:RATE]", "optional", "a positive rate of messages per second", _positive),
}
USAGE = ", ".join(["off", *(f.usage for f in ATTACKS.values())])


@dataclass(frozen=True)
class ByzantineSpec:
    """A checked ``--byzantine`` spec: the attack and its parameter (None: none given)."""

    name: str  # "off" or a key of ATTACKS
    value: float | None = None

    @classmethod
    def parse(cls, spec: str | None) -> ByzantineSpec:
        if spec in (None, "", "off", "none"):
            return cls("off")
        name, colon, arg = str(spec).partition(":")
        if name not in ATTACKS:
            raise RobustError(f"--byzantine: unknown attack {spec!r}; use {USAGE}")
        form = ATTACKS[name]
        if form.param == "none":
            if colon:
                raise RobustError(f"--byzantine: {name} takes no parameter, got {spec!r}")
            return cls(name)
        if not colon and form.param == "optional":
            return cls(name)
        try:
            value = float(arg)
        except ValueError:
            value = math.nan
        if not form.valid(value):
            raise RobustError(f"--byzantine: {form.usage} needs {form.expect}, got {spec!r}")
        return cls(name, value)


# ------------------------------------------------------------------------------- a peer's settings

ALGORITHMS = ("dsgd", "gt")
ESTIMATORS = ("auto", "flood", "gossip")
PPFM_MAX_PEERS = 64  # PPFM floods every peer's fingerprint: O(n) per message, so bounded
WHOLE_MODEL_CODECS = ("none", "fp16", "bf16")  # codecs a whole model may travel with: no replica corrects them


def parse_clusters(spec: str | int) -> int | Literal["auto"] | None:
    """`--clusters`: "off" -> None, "auto", or a positive number of clusters."""
    text = str(spec).strip().lower()
    if text == "off":
        return None
    if text == "auto":
        return "auto"
    try:
        k = int(text)
    except ValueError:
        raise ConfigError(f"--clusters: expected off, auto or a positive integer, got {spec!r}") from None
    if k < 1:
        raise ConfigError(f"--clusters: expected a positive number of clusters, got {k}")
    return k


def check_algorithm(cfg: PeerConfig, scheduled: bool) -> bool:
    """Whether this peer tracks gradients; refuses the combinations that have no meaning.

    Gradient tracking relies on the corrections summing to zero over the peers, which linear
    mixing keeps and robust rules do not; PPFM mixes other models than the one tracked. Schedules
    have a handful of peers a round, too few for robust rules, and no fixed neighbours for PPFM
    overlays or the gossip estimator."""
    if cfg.algorithm not in ALGORITHMS:
        raise ConfigError(f"--algorithm: expected one of {', '.join(ALGORITHMS)}, got {cfg.algorithm!r}")
    tracking = cfg.algorithm == "gt"
    gt, sched = "docs/algorithms.md#gradient-tracking", "docs/algorithms.md#time-varying-schedules"
    refused = [(tracking and cfg.robust != "off", "--algorithm gt with --robust", gt),
               (tracking and cfg.clusters != "off", "--algorithm gt with --clusters", gt),
               (scheduled and cfg.robust != "off", "a schedule with --robust", sched),
               (scheduled and cfg.clusters != "off", "a schedule with --clusters", sched),
               (scheduled and cfg.estimator == "gossip", "a schedule with --estimator gossip (use flood)", sched)]
    for bad, what, doc in refused:
        if bad:
            raise ConfigError(f"{what}: not supported ({doc})")
    return tracking


def check_estimator(kind: str) -> None:
    if kind not in ESTIMATORS:
        raise ConfigError(f"--estimator: expected auto, flood or gossip, got {kind!r}")


def check_monitor_share(share: float) -> None:
    if not share >= 0:  # NaN too
        raise ConfigError(f"--monitor-share: expected a number >= 0, got {share}")


def check_clusters(cfg: PeerConfig, n: int) -> int | Literal["auto"] | None:
    """`parse_clusters` of ``--clusters``, refused beyond `PPFM_MAX_PEERS` peers."""
    k = parse_clusters(cfg.clusters)
    if k is not None and n > PPFM_MAX_PEERS:
        raise ConfigError(f"--clusters: PPFM floods every peer's fingerprint, so at most {PPFM_MAX_PEERS} peers; this topology has {n}")
    return k


def check_ppfm(cfg: PeerConfig) -> None:
    """The PPFM knobs of a peer with ``--clusters`` on (`p2pfl.ppfm.levels.PpfmConfig`)."""
    for flag, count in (("--recluster-every", cfg.recluster_every), ("--global-every", cfg.global_every),
                        ("--fingerprint-dim", cfg.fingerprint_dim)):
        if count < 1:
            raise ConfigError(f"{flag}: expected an integer >= 1 with --clusters, got {count}")
    for flag, share in (("--global-lambda", cfg.global_lambda), ("--cluster-beta", cfg.cluster_beta)):
        if not 0 <= share <= 1:
            raise ConfigError(f"{flag}: expected a number in [0, 1] with --clusters, got {share:g}")
    if not cfg.cluster_margin >= 0:
        raise ConfigError(f"--cluster-margin: expected a number >= 0 with --clusters, got {cfg.cluster_margin:g}")


def check_schedule_codecs(plan: Plan[CodecSpec], schedule: str, recurring: bool) -> None:
    """A schedule that draws fresh edges sends whole models: no replica corrects a lossy codec."""
    lossy = sorted({c.spec for c in plan.codecs()} - set(WHOLE_MODEL_CODECS))
    if not recurring and lossy:
        raise ConfigError(f"--compress {plan.spec}: {schedule} draws fresh edges, so no replica corrects a lossy codec "
                          f"({', '.join(lossy)}); whole models travel as {', '.join(WHOLE_MODEL_CODECS)}")


def check_peer_basics(cfg: PeerConfig) -> Plan[CodecSpec]:
    """The checks of any peer's settings, topology or open network: codec plan, robust rule,
    attack, estimator, monitoring share."""
    try:
        plan = parse_plan(cfg.compress)
    except CodecError as e:
        raise ConfigError(f"--compress {cfg.compress!r}: {e}") from None
    RobustSpec.parse(cfg.robust)
    ByzantineSpec.parse(cfg.byzantine)
    check_estimator(cfg.estimator)
    check_monitor_share(cfg.monitor_share)
    return plan


def check_peer(cfg: PeerConfig, topo: Topology) -> None:
    """Every check of a peer's settings that needs no model, each naming the option and the value:
    codec plan, robust rule, attack, clusters and their knobs, estimator, and the combinations the
    node refuses."""
    plan = check_peer_basics(cfg)
    check_algorithm(cfg, topo.schedule is not None)
    if check_clusters(cfg, topo.n) is not None:
        check_ppfm(cfg)
    if topo.schedule is not None:
        check_schedule_codecs(plan, str(topo.schedule), topo.schedule_for(cfg.seed).recurring)


def check_open(cfg: PeerConfig) -> None:
    """What an open network's peer does not do yet, named (`node.build.make_open_node`)."""
    check_peer_basics(cfg)
    unsupported = {"--algorithm gt": cfg.algorithm != "dsgd", "--byzantine": cfg.byzantine != "off",
                   "--clusters": parse_clusters(cfg.clusters) is not None,
                   "--resume (its links changed while it was down)": cfg.resume}
    for option, used in unsupported.items():
        if used:
            raise ConfigError(f"{option}: not available in an open network yet (docs/membership.md)")
