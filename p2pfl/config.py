"""A peer's settings, each default defined here once, and the parsers of the peer-set flags.

Pure and light (no torch): the CLI builds and validates a whole config with this module, trainer
options included, before it imports the model stack, so a typo costs no start-up time.
Precedence: the defaults below < a topology file's ``settings:`` < command-line flags; trainer
options: `TrainerConfig` < ``settings.trainer`` < a peer entry's own ``trainer:`` < ``--set KEY=VALUE``
(`peer_trainers`).
"""

from __future__ import annotations

import difflib
import json
import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from p2pfl.errors import P2pflError

# Shift applied when a config leaves ``domain`` empty: shapes peers start away from pretraining.
DEFAULT_DOMAIN = {"shapes": "contrast+clutter", "digits": "clean", "folder": "clean"}
DATA_KINDS = ("labelled", "captions", "unlabelled")


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
    algorithm: str = "dsgd"  # dsgd: decentralized SGD; gt: gradient tracking with local steps (K-GT; p2pfl/node/node.py)
    sketch_dim: int = 1024
    estimator: str = "auto"  # consensus estimate: flood (every sketch to every peer), gossip (averaged), auto
    monitor_share: float = 0.25  # the estimate's bytes per message, at most this share of a delta's (fewer, smaller sketches); 0: no cap
    heartbeat: float = 1.0  # seconds between heartbeats
    peer_timeout: float = 10.0  # silent this long => marked down
    min_wait: float = 2.0  # floor of the adaptive round deadline
    round_timeout: float = 120.0  # ceiling of the adaptive round deadline
    startup_timeout: float = 60.0
    max_frame: int = 256 * 1024 * 1024
    keep_memory: bool = True  # fixed glibc malloc thresholds: received messages reuse freed pages (p2pfl.net.alloc)
    # A crash loses at most this many rounds (besides the checkpoint at exit). A checkpoint is one
    # safetensors write plus a checksum, both fsynced, far below a training round, and only the last
    # two are kept, so a short period costs little time and no disk; 0 writes only at exit.
    checkpoint_every: int = 5
    resume: bool = False
    robust: str = "off"  # off, clip[:TAU], trimmed:B, median
    norm_factor: float = 0.0  # reject deltas this many times the recent median norm (0: off, the default)
    byzantine: str = "off"  # fault injection for experiments (this peer misbehaves): p2pfl.core.specs.USAGE
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
    trainer_sets: dict[str, Any] = field(default_factory=dict)  # the --set part of `trainer`: it beats peer entries too


@dataclass(frozen=True)
class TrainerConfig:
    """Everything that decides a peer's model, data and local optimisation: per peer
    (`peer_trainers`), the keys of `MUST_AGREE` the same on every peer.

    Value ranges and choices are checked where they are used (`p2pfl.learn.trainer.Trainer`); keys and
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
    domain: str = ""  # "" = the dataset's default shift (DEFAULT_DOMAIN); e.g. "rotation+noise"
    partition: str = "iid"  # "iid" | "dirichlet:0.1" | "classes:2" | "groups:task=shape,colour"
    data_kind: str = "labelled"  # DATA_KINDS: "labelled" | "captions" (contrastive) | "unlabelled" (self-training)
    pseudo_threshold: float = 0.5  # unlabelled: a pseudo-label is kept when the model gives it at least this probability
    pseudo_fraction: float = 0.5  # unlabelled: each class keeps at most this fraction of a uniform share (class balance)
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
    # zero-shot data augmentation for under-represented classes (p2pfl/learn/augment.py)
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
    # differential privacy of everything the peer sends: DP-SGD on the trainable adapter tensors (p2pfl/learn/privacy.py);
    # on when dp_epsilon or dp_noise is set
    dp_epsilon: float | None = None  # budget over the planned rounds; alone, the noise is calibrated to spend it
    dp_delta: float | None = None  # None: 1 / (2 x the peer's training samples)
    dp_clip: float = 1.0  # L2 bound of each sample's gradient
    dp_noise: float | None = None  # noise multiplier (std / dp_clip) instead of calibrating it; with dp_epsilon, must fit it

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "trainer config") -> TrainerConfig:
        """From plain data (YAML/JSON/CLI): an unknown key or a value of the wrong type is a
        `ConfigError` naming the key (with the closest known one) and the expected type."""
        return cls(**trainer_options(d, where))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d


# ------------------------------------------------------------------ keys and typed values

FIXED = ("topology", "id", "trainer_sets")  # PeerConfig fields that come from the command line only
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


def parse_pairs(items: Sequence[str], flag: str) -> dict[str, str]:
    """Repeatable `flag KEY=VALUE` options as text (the last one of a key wins), for options that
    are not trainer keys (`p2pfl-topology generate --param`); `parse_sets` types trainer keys."""
    out: dict[str, str] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"{flag}: expected KEY=VALUE, got {item!r}")
        out[key] = text
    return out


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` options (repeatable; the last one of a key wins), typed by `TrainerConfig`."""
    out: dict[str, Any] = {}
    for key, text in parse_pairs(items, "--set").items():
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
    and where each value that is not a default came from (key, or ``trainer.KEY`` -> origin).
    `sets` are also kept apart (``trainer_sets``): they beat a peer entry's own trainer: too."""
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
    return PeerConfig(topology=topology, id=peer_id, **values, trainer=trainer, trainer_sets=overrides), origin


# Trainer keys that every peer of a run must share, and why; a peer entry's trainer: may not set them.
MUST_AGREE = {
    "model": "every peer adapts the same frozen foundation",
    "pretrained": "every peer adapts the same frozen foundation",
    "lora_rank": "all peers average their adapters, which must have the same shapes",
    "lora_alpha": "averaging B averages the adapters only at one shared scale alpha / rank",
    "lora_targets": "all peers average their adapters, which must adapt the same weights",
    "train_a": "it decides which tensors travel (B alone, or A and B)",
    "text_lora": "all peers must carry the same adapter tensors (it is on for the whole run when any peer has captions)",
    "seed": "the run seed draws the shared frozen LoRA A and every peer's share of the data",
}
_TRAINER_DEFAULTS = {f.name: f.default for f in fields(TrainerConfig)}


def entry_trainers(entries: Mapping[int, Mapping[str, Any]], source: str) -> dict[int, dict[str, Any]]:
    """The ``trainer:`` options of each topology peer entry that has one (peer id -> entry's
    extra keys), checked and typed like ``settings.trainer``; a key of `MUST_AGREE` is refused."""
    out: dict[int, dict[str, Any]] = {}
    for p, entry in entries.items():
        if "trainer" not in entry:
            continue
        where = f"{source}: peer {p}: trainer"
        own = trainer_options(entry["trainer"] or {}, where)
        for k in own:
            if k in MUST_AGREE:
                raise ConfigError(f"{where}: {k} cannot differ between peers: {MUST_AGREE[k]}; set it in settings.trainer or with --set")
        out[p] = own
    return out


def peer_trainers(cfg: PeerConfig, entries: Mapping[int, Mapping[str, Any]], source: str) -> dict[int, dict[str, Any]]:
    """Every peer's trainer options: defaults < settings.trainer < its entry's ``trainer:`` < --set.

    ``cfg.trainer`` holds the file's settings with --set applied, ``cfg.trainer_sets`` the --set
    options alone, so an entry goes between the two. Pure and light, for the CLI's checks before
    any model is loaded and for the host that builds the trainers. ``text_lora`` is turned on for
    every peer when any peer has captions: those train the text tower, and peers can only average
    adapters made of the same tensors."""
    own = entry_trainers(entries, source)
    out = {p: {**cfg.trainer, **own.get(p, {}), **cfg.trainer_sets} for p in entries}
    captions = []
    for p, options in out.items():
        kind = options.get("data_kind", _TRAINER_DEFAULTS["data_kind"])
        if kind not in DATA_KINDS:
            raise unknown_key(kind, DATA_KINDS, "data_kind", f"{source}: peer {p}: trainer")
        if kind == "captions":
            captions.append(p)
    if captions:
        if cfg.trainer.get("text_lora") is False:
            raise ConfigError(f"{source}: text_lora is off, but peers {sorted(captions)} have data_kind captions, "
                              "which train the text tower: every peer must carry it; leave text_lora unset or true")
        for options in out.values():
            options["text_lora"] = True
    return out


def dataset_key(dataset: str, task: str, domain: str) -> tuple[str, str, str]:
    """A dataset of a run, as peers are evaluated on it: (dataset, task, domain), the dataset's
    default domain filled in; only shapes has tasks (digits and folders have one label space)."""
    return dataset, task if dataset == "shapes" else "", domain or DEFAULT_DOMAIN.get(dataset.split(":")[0], "clean")


def dataset_name(key: tuple[str, str, str]) -> str:
    """``shapes/shape@contrast+clutter``, ``digits@clean``: how records and reports name a dataset."""
    dataset, task, domain = key
    return f"{dataset}{'/' + task if task else ''}@{domain}"


def run_datasets(trainers: Mapping[int, Mapping[str, Any]]) -> tuple[tuple[str, str, str], ...]:
    """The distinct `dataset_key`s of a run's peers (their `peer_trainers`), sorted."""
    d = _TRAINER_DEFAULTS
    return tuple(sorted({dataset_key(t.get("dataset", d["dataset"]), t.get("task", d["task"]), t.get("domain", d["domain"]))
                         for t in trainers.values()}))


def render(cfg: PeerConfig, origin: Mapping[str, str], ids: Sequence[int],
           entries: Mapping[int, Mapping[str, Any]] | None = None) -> str:
    """`--print-config`: the effective settings as YAML a topology's ``settings:`` accepts, each
    value that is not a default marked with where it came from. The trainer is the first peer's,
    with its topology entry (`entries`: peer id -> entry keys) applied; a line per other peer
    lists where its trainer differs."""

    def line(key: str, value: Any, where: str | None, indent: str = "") -> str:
        plain = list(value) if isinstance(value, tuple) else str(value) if isinstance(value, Path) else value
        text = indent + yaml.safe_dump({key: plain}, default_flow_style=True, sort_keys=False, width=1 << 16).strip()[1:-1]
        return text + (f"  # {where}" if where else "")

    source = str(cfg.topology)
    entries = entries or {p: {} for p in ids}
    trainers = peer_trainers(cfg, entries, source)
    own = entry_trainers(entries, source)
    configs = {p: TrainerConfig.from_dict({"seed": cfg.seed, **trainers[p]}) for p in ids}
    first = configs[ids[0]]
    base = first.to_dict()
    out = [f"# p2pfl-peer: effective settings of peers {list(ids)} of {cfg.topology}",
           "# (defaults < the topology's settings: < command line; trainer: defaults < settings.trainer"
           " < the peer's trainer: entry < --set)"]
    out += [line(k, getattr(cfg, k), origin.get(k)) for k in SETTINGS_KEYS if k != "trainer"]
    out.append(f"trainer:  # peer {ids[0]}")
    seed_origin = origin.get("seed") and f"{origin['seed']} (the run seed)"

    def where(k: str) -> str | None:
        if k in own.get(ids[0], {}) and k not in cfg.trainer_sets:
            return f"peer {ids[0]}'s entry in {source}"
        if k == "text_lora" and first.text_lora and "text_lora" not in cfg.trainer:
            return "on for every peer: the run has caption peers"
        return origin.get(f"trainer.{k}", seed_origin if k == "seed" else None)

    out += [line(k, getattr(first, k), where(k), "  ") for k in TRAINER_KEYS]
    for p in ids[1:]:
        diff = {k: v for k, v in configs[p].to_dict().items() if v != base[k]}
        if diff:
            out.append(f"# peer {p}'s trainer differs: " + yaml.safe_dump(diff, default_flow_style=True, width=1 << 16).strip())
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
