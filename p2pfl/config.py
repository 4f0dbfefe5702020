"""A peer's settings, each default defined here once, and the parsers of the peer-set flags.

Pure and light (no torch): the CLI builds and validates a whole config with this module, trainer
options included, before it imports the model stack, so a typo costs no start-up time.
Precedence: the defaults below < a topology file's ``settings:`` < command-line flags; trainer
options: `TrainerConfig` < ``settings.trainer`` < ``--set KEY=VALUE``.
"""

from __future__ import annotations

import difflib
import json
import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union, get_args, get_origin, get_type_hints

import yaml

from p2pfl.errors import P2pflError

if TYPE_CHECKING:
    from p2pfl.model import LoraSpec


class ConfigError(P2pflError, ValueError):
    """A setting that cannot be used; the message names the flag or key and the value."""


@dataclass
class PeerConfig:
    topology: Path
    id: int
    rounds: int = 50
    run_dir: Path = Path("runs/default")
    seed: int = 0
    no_train: bool = False
    dim: int = 131072  # --no-train state size (floats)
    compress: str = "none"  # exact by default, as a library call expects; the shipped topologies choose a codec
    gamma: float | None = None
    sketch_dim: int = 1024
    estimator: str = "auto"  # consensus estimate: flood (every sketch to every peer), gossip (averaged), auto
    heartbeat: float = 1.0  # seconds between heartbeats
    peer_timeout: float = 10.0  # silent this long => marked down
    min_wait: float = 2.0  # floor of the adaptive round deadline
    round_timeout: float = 120.0  # ceiling of the adaptive round deadline
    startup_timeout: float = 60.0
    max_frame: int = 256 * 1024 * 1024
    keep_memory: bool = True  # fixed glibc malloc thresholds: received messages reuse freed pages (p2pfl.alloc)
    # A crash loses at most this many rounds (besides the checkpoint at exit). A checkpoint is one
    # safetensors write plus a checksum, both fsynced, far below a training round, and only the last
    # two are kept, so a short period costs little time and no disk; 0 writes only at exit.
    checkpoint_every: int = 5
    resume: bool = False
    robust: str = "off"  # off, clip[:TAU], trimmed:B, median
    norm_factor: float = 0.0  # reject deltas this many times the recent median norm (0: off, the default)
    byzantine: str = "off"  # fault injection for experiments (this peer misbehaves): p2pfl.robust.USAGE
    metrics_port: int = 0  # serve Prometheus metrics on 127.0.0.1:PORT (0: off)
    metrics_host: str = "127.0.0.1"
    secret_key: Path | None = None  # CurveZMQ secret key file; default <topology dir>/keys/peer-<id>.key_secret
    round_period: float = 0.0  # a round lasts at least this long (paced gossip)
    max_lag: int = 10  # neighbours more rounds behind than this are neither waited for nor mixed
    window: int = 8  # deltas buffered per neighbour, and rounds a delta may lead what was applied
    claim_ahead: int = 16  # a neighbour's round claim may lead ours and our other neighbours' by this much (at least 2x max-lag)
    strikes: int = 20  # refused messages (halved each round) that mark a neighbour misbehaving
    cooloff: float = 60.0  # seconds a misbehaving neighbour is ignored, its weight on self
    clusters: str = "off"  # PPFM meta-levels: off, auto, or a fixed number of clusters
    recluster_every: int = 5  # R: rounds between cluster evaluations
    global_every: int = 5  # K: rounds between global-level gossip among representatives
    global_lambda: float = 0.05  # pull of each cluster model toward the global model
    cluster_beta: float = 1.0  # Reptile step of the cluster model toward its members' task models
    cluster_margin: float = 0.1  # hysteresis: silhouette gain a new clustering needs
    fingerprint_dim: int = 256  # rows of the fingerprint sketch
    threads: int = 0  # training worker threads (each its own model copy); 0: one per core, at most one per peer
    trainer: dict[str, Any] = field(default_factory=dict)  # TrainerConfig keys, checked and typed (`trainer_options`)


@dataclass(frozen=True)
class TrainerConfig:
    """Everything that decides a peer's model, data and local optimisation (shared by all peers).

    Value ranges and choices are checked where they are used (`p2pfl.trainer.Trainer`); keys and
    types are checked here, by `from_dict`."""

    model: str = "shapes-clip"
    pretrained: str | None = None
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("in_proj", "c_fc", "c_proj")
    train_a: bool = False  # False = FFA-LoRA (exact averaging); True = ship A and B (approximate)
    text_lora: bool = False
    dataset: str = "shapes"  # "shapes" | "digits" | "folder:PATH"
    task: str = "shape"  # shapes: shape | colour | size | position | background
    domain: str = ""  # "" = the dataset's default shift (data.DEFAULT_DOMAIN); e.g. "rotation+noise"
    partition: str = "iid"  # "iid" | "dirichlet:0.1" | "classes:2" | "groups:task=shape,colour"
    local_steps: int = 10
    batch_size: int = 32
    lr: float = 3e-3
    lr_schedule: str = "constant"  # "constant" | "cosine:R" (decay to 0 over R rounds of local_steps)
    optimizer: str = "adamw"  # "adamw" | "sgd"
    weight_decay: float = 0.0
    logit_adjust: float | None = None  # tau of the label-prior logit adjustment of training logits (0 = plain CE; None: 1 with augment, else 0)
    eval_every: int = 1
    seed: int = 0
    samples_per_peer: int = 256
    test_fraction: float = 0.25
    global_test_size: int = 500
    # zero-shot data augmentation for under-represented classes (p2pfl/augment.py)
    augment: str = "off"  # "off" | "zero-shot"
    augment_threshold: float = 0.5  # a class is under-represented below this fraction of the uniform share
    augment_per_class: int = 4  # synthetic samples per under-represented class, re-synthesised every round
    augment_weight: float = 1.0  # loss weight of a synthetic sample relative to a real one
    augment_batch: int = 16  # synthetic samples mixed into each batch
    augment_steps: int | None = None  # optimisation steps of each round's synthesis (None: the method's, augment.METHOD_DEFAULTS)
    augment_confidence: float | None = None  # a synthetic sample stops once its class has this probability (None: the method's)
    augment_teachers: str = "neighbours"  # synthesise with: "self" | "neighbours" (replicas set by set_teachers)
    augment_distill: float = 0.0  # synthetic targets: (1 - d) * one-hot + d * the teacher's soft labels
    augment_claim: float | None = None  # neighbours: skip a class unless a teacher claims it >= this x the peer's own model (0 = never skip; None: the method's)
    device: str = "cpu"  # "cpu" | "cuda" | "cuda:N" | "auto" (cuda if available); adapters travel as CPU tensors either way

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "trainer config") -> TrainerConfig:
        """From plain data (YAML/JSON/CLI): an unknown key or a value of the wrong type is a
        `ConfigError` naming the key (with the closest known one) and the expected type."""
        return cls(**trainer_options(d, where))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    def lora_spec(self) -> LoraSpec:
        # Imported here, not above: only a trainer calls this, and this module stays free of torch.
        from p2pfl.model import LoraSpec

        # A's seed is the run seed: the same frozen A on every peer is what makes FFA averaging exact.
        return LoraSpec(self.lora_rank, self.lora_alpha, tuple(self.lora_targets), self.text_lora, self.train_a, self.seed)


# ------------------------------------------------------------------ keys and typed values

FIXED = ("topology", "id")  # PeerConfig fields that come from the command line only
SETTINGS_KEYS = tuple(f.name for f in fields(PeerConfig) if f.name not in FIXED)
TRAINER_KEYS = tuple(f.name for f in fields(TrainerConfig))
_PEER_TYPES = get_type_hints(PeerConfig)
_TRAINER_TYPES = get_type_hints(TrainerConfig)
_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
_NONE = ("none", "null", "~", "")


def unknown_key(key: object, known: Sequence[str], what: str, where: str) -> ConfigError:
    """The error for a key that is not one of `known`, with the closest known key if one is near."""
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
    return ConfigError(f"{where}: unknown {what} {key!r}; {hint}")


def _base(hint: Any) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of an annotation `T` or `T | None`."""
    if isinstance(hint, types.UnionType) or get_origin(hint) is Union:
        rest = [a for a in get_args(hint) if a is not type(None)]
        return rest[0], len(rest) < len(get_args(hint))
    return hint, False


def _describe(base: Any, optional: bool) -> str:
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", Path: "a path"}
    return names.get(base, "a list of names (a,b,c)") + (" or none" if optional else "")


def _convert(value: Any, base: Any) -> Any:
    """`value` as `base`; text (from --set, or a YAML scalar YAML left a string) is parsed.
    ValueError or TypeError if it is not one."""
    text = value.strip() if isinstance(value, str) else None
    if base is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _BOOLS:
            return _BOOLS[text.lower()]
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text is not None:
            return int(text)
    elif base is float:
        number = float(text) if text is not None else value
        if isinstance(number, int | float) and not isinstance(number, bool) and math.isfinite(number):
            return float(number)
    elif base is str:
        if text is not None:  # a JSON string literal, as `--set task="shape"`, means its contents
            return json.loads(text) if len(text) >= 2 and text[0] == text[-1] == '"' else value
        if isinstance(value, int | float) and not isinstance(value, bool):  # `clusters: 2` in YAML
            return str(value)
    elif base is Path:
        if isinstance(value, str | Path) and str(value):
            return Path(value)
    elif get_origin(base) is tuple:
        items = (json.loads(text) if text.startswith("[") else text.split(",")) if text is not None else value
        if isinstance(items, list | tuple) and items and all(isinstance(s, str) and s.strip() for s in items):
            return tuple(s.strip() for s in items)
    raise ValueError(value)


def coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` checked and converted to the annotation `hint`; `ConfigError` naming `where` and
    the expected type otherwise. Text `none`/`null` (or empty) means None where None is allowed."""
    base, optional = _base(hint)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE):
        if optional:
            return None
    else:
        try:
            return _convert(value, base)
        except (TypeError, ValueError):
            pass
    raise ConfigError(f"{where}: expected {_describe(base, optional)}, got {value!r}")


def trainer_options(d: Any, where: str) -> dict[str, Any]:
    """Trainer options checked against `TrainerConfig`: known keys, typed values."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping of trainer options, got {d!r}")
    out = {}
    for k, v in d.items():
        if k not in _TRAINER_TYPES:
            raise unknown_key(k, TRAINER_KEYS, "trainer key", where)
        out[k] = coerce(v, _TRAINER_TYPES[k], f"{where}: {k}")
    return out


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` options (repeatable; the last one of a key wins), typed by `TrainerConfig`."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"--set: expected KEY=VALUE, got {item!r}")
        if key not in _TRAINER_TYPES:
            raise unknown_key(key, TRAINER_KEYS, "trainer key", "--set")
        out[key] = coerce(text, _TRAINER_TYPES[key], f"--set {key}")
    return out


FLAG, SET = "command line", "--set"  # where an effective value came from (else: the topology file)
_AT_LEAST = {"rounds": 0, "dim": 1, "sketch_dim": 0, "checkpoint_every": 0, "max_lag": 0, "max_frame": 1}  # counts checked nowhere else


def resolve(topology: Path, peer_id: int, settings: Any, flags: Mapping[str, Any], sets: Sequence[str],
            source: str) -> tuple[PeerConfig, dict[str, str]]:
    """The effective config, defaults < `settings` (a topology file's, read from `source`) <
    `flags` (PeerConfig field -> value) and trainer options < ``settings.trainer`` < `sets`;
    and where each value that is not a default came from (key, or ``trainer.KEY`` -> origin)."""
    if not isinstance(settings, Mapping):
        raise ConfigError(f"{source}: settings: expected a mapping, got {settings!r}")
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    trainer: dict[str, Any] = {}
    for k, v in settings.items():
        if k == "trainer":
            trainer = trainer_options(v or {}, f"{source}: settings.trainer")
            origin.update({f"trainer.{t}": source for t in trainer})
        elif k in SETTINGS_KEYS:
            values[k] = coerce(v, _PEER_TYPES[k], f"{source}: settings.{k}")
            origin[k] = source
        else:
            raise unknown_key(k, SETTINGS_KEYS, "setting", f"{source}: settings")
    for k, v in flags.items():
        values[k], origin[k] = v, FLAG
    for k, lo in _AT_LEAST.items():
        if k in values and values[k] < lo:
            raise ConfigError(f"{k}: expected an integer >= {lo}, got {values[k]} (from the {origin[k]})")
    overrides = parse_sets(sets)
    trainer.update(overrides)
    origin.update({f"trainer.{t}": SET for t in overrides})
    TrainerConfig.from_dict(trainer)  # everything the trainer will be built from is checked now
    return PeerConfig(topology=topology, id=peer_id, **values, trainer=trainer), origin


def render(cfg: PeerConfig, origin: Mapping[str, str], ids: Sequence[int]) -> str:
    """`--print-config`: the effective settings as YAML a topology's ``settings:`` accepts, each
    value that is not a default marked with where it came from."""

    def line(key: str, value: Any, where: str | None, indent: str = "") -> str:
        plain = list(value) if isinstance(value, tuple) else str(value) if isinstance(value, Path) else value
        text = indent + yaml.safe_dump({key: plain}, default_flow_style=True, sort_keys=False, width=1 << 16).strip()[1:-1]
        return text + (f"  # {where}" if where else "")

    trainer = TrainerConfig.from_dict({"seed": cfg.seed, **cfg.trainer})
    out = [f"# p2pfl-peer: effective settings of peers {list(ids)} of {cfg.topology}",
           "# (defaults < the topology's settings: < command line; trainer: defaults < settings.trainer < --set)"]
    out += [line(k, getattr(cfg, k), origin.get(k)) for k in SETTINGS_KEYS if k != "trainer"]
    out.append("trainer:")
    seed_origin = origin.get("seed") and f"{origin['seed']} (the run seed)"
    out += [line(k, getattr(trainer, k), origin.get(f"trainer.{k}", seed_origin if k == "seed" else None), "  ")
            for k in TRAINER_KEYS]
    return "\n".join(out) + "\n"


def worker_threads(threads: int, peers: int, cores: int) -> int:
    """Training workers of a process. Each trains its share of the co-hosted peers one at a time
    on its own copy of the frozen model, with single-threaded torch ops: small-batch steps gain
    little from intra-op threads, and separate workers keep every core busy."""
    if threads < 0:
        raise ConfigError(f"--threads: expected 0 (auto) or a positive count, got {threads}")
    return max(1, min(peers, threads or cores))


def parse_ids(spec: str, ids: list[int], local: set[int] | None = None) -> list[int]:
    """`--id`: one id, a range `0-63`, a list `1,5,7-9`, or `local` (the ids in `local`)."""
    text = spec.strip()
    if text == "local":
        if not local:
            raise ConfigError("--id local: no peer of the topology has a host address of this machine")
        return sorted(local)
    out: list[int] = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            a = int(lo)
            b = int(hi) if dash else a
        except ValueError:
            raise ConfigError(f"--id: {part.strip()!r} is not an id, a range A-B or 'local'") from None
        if b < a:
            raise ConfigError(f"--id: empty range {part.strip()!r}")
        out.extend(range(a, b + 1))
    unknown = sorted(set(out) - set(ids))
    if unknown:
        raise ConfigError(f"--id: peers {unknown[:8]} are not in the topology (ids {ids[0]}..{ids[-1]})")
    if len(set(out)) != len(out):
        raise ConfigError(f"--id: {spec!r} names a peer twice")
    return sorted(out)
