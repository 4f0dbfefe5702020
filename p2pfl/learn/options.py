"""The values of a peer's trainer options, and the errors that name them; no torch.

`p2pfl.config` checks a trainer option's key and type; this module checks its value, wherever the
value needs no model: optimizer, learning-rate schedule, device, dataset, task, domain, partition,
data kind, augmentation, DP and LoRA targets. The trainer and the data, augmentation, privacy and
model modules parse and check with the functions here, and the CLI runs `check_trainer` on every
peer's options before it imports torch, so a bad value is refused in a second, by the same rule.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from p2pfl.config import DATA_KINDS, TrainerConfig
from p2pfl.errors import P2pflError
from p2pfl.learn import shapes


class TrainerError(P2pflError, ValueError):
    """Bad trainer config or optimizer state (names the offending key/value)."""


class DataError(P2pflError, ValueError):
    """Bad dataset, task, domain or partition spec (names the offending value)."""


class AugmentError(P2pflError, ValueError):
    """Bad augmentation option (names the offending value)."""


class PrivacyError(P2pflError, ValueError):
    """DP settings that cannot be met or that would leak; the message names the option."""


class ModelError(P2pflError, ValueError):
    """Bad model name, checkpoint or adapter state (names the offending key/value)."""


OPTIMIZERS = ("adamw", "sgd")
AUGMENT_MODES = ("off", "zero-shot")
TEACHER_MODES = ("self", "neighbours")
# Not "out_proj": nn.MultiheadAttention reads out_proj.weight without calling out_proj, so peft's
# wrapper there is silently inert, and LoRA on the whole attention module applies out_proj twice.
VIT_LORA_TARGETS = ("in_proj", "c_fc", "c_proj")
# A ModifiedResNet image tower: peft Conv2d LoRA on its bottleneck convs. Not its attention pool:
# AttentionPool2d hands q/k/v/c_proj.weight straight to F.multi_head_attention_forward, so peft's
# wrappers there are inert (checked in tests/test_augment.py), as with out_proj above.
RESNET_LORA_TARGETS = ("conv",)
LORA_TARGETS = VIT_LORA_TARGETS + RESNET_LORA_TARGETS
_DEVICE = re.compile(r"auto|cpu(:0)?|cuda(:\d+)?")


# ------------------------------------------------------------------------------ training


def parse_lr_schedule(spec: str) -> int:
    """Rounds of a ``cosine:R`` schedule; 0 for ``constant``."""
    if spec == "constant":
        return 0
    kind, _, rounds = spec.partition(":")
    if kind != "cosine" or not rounds.isdigit() or int(rounds) < 1:
        raise TrainerError(f"trainer config: lr_schedule {spec!r} is not 'constant' or 'cosine:ROUNDS'")
    return int(rounds)


def parse_device(spec: str) -> tuple[str, int | None]:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` -> (kind, index or None); whether the device
    exists here is `p2pfl.learn.trainer.resolve_device`'s question."""
    if not _DEVICE.fullmatch(spec):
        raise TrainerError(f"trainer config: device {spec!r} is not cpu, cuda, cuda:N or auto")
    kind, _, index = spec.partition(":")
    return kind, int(index) if index else None


def logit_adjust(cfg: TrainerConfig) -> float:
    """The effective tau of the label-prior logit adjustment. Augmentation and adjustment are one
    method: the adjusted prior counts the synthetic samples, so augmentation turns it on."""
    return (1.0 if cfg.augment == "zero-shot" else 0.0) if cfg.logit_adjust is None else cfg.logit_adjust


def check_lora_targets(targets: tuple[str, ...]) -> None:
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad or not targets:
        raise ModelError(f"lora targets: {bad or targets!r} not a non-empty subset of {LORA_TARGETS}")


def check_synthesis(per_class: int, steps: int | None, confidence: float | None) -> None:
    """The synthesis knobs a config sets (None: the method's default, valid by construction)."""
    if per_class < 1 or (steps is not None and steps < 0):
        raise AugmentError(f"synthesis: per_class {per_class} / steps {steps} invalid")
    if confidence is not None and not 0 < confidence <= 1:
        raise AugmentError(f"augment_confidence: {confidence} not in (0, 1]")


def check_kind(cfg: TrainerConfig, tau: float) -> None:
    """Keys of the data kinds (`p2pfl.learn.tasks`). Peers without labels must not use the hidden
    labels in training: augmentation and logit adjustment (effective `tau`) read the label prior."""
    if cfg.data_kind not in DATA_KINDS:
        raise TrainerError(f"trainer config: data_kind {cfg.data_kind!r} is not one of {DATA_KINDS}")
    if cfg.data_kind != "labelled" and (cfg.augment != "off" or tau > 0):
        raise TrainerError(f"trainer config: data_kind {cfg.data_kind}: augment and logit_adjust need labels")
    if cfg.data_kind == "captions" and not cfg.text_lora:
        raise TrainerError("trainer config: data_kind captions trains the text tower: it needs text_lora true")
    if not (0 <= cfg.pseudo_threshold <= 1 and 0 < cfg.pseudo_fraction <= 1):
        raise TrainerError(f"trainer config: pseudo_threshold {cfg.pseudo_threshold} (in [0, 1]) / "
                           f"pseudo_fraction {cfg.pseudo_fraction} (in (0, 1]) invalid")


def dp_enabled(cfg: TrainerConfig) -> bool:
    """DP-SGD is on when a budget or a noise multiplier is given."""
    return cfg.dp_epsilon is not None or cfg.dp_noise is not None


def check_privacy(cfg: TrainerConfig, tau: float) -> None:
    """Refuse bad DP values and the options that let raw data reach an output outside DP-SGD.

    ``tau`` is the effective logit adjustment (`logit_adjust`). A label prior in the loss makes
    every sample's gradient depend on the whole label histogram, so one sample's removal moves all
    the others' clipped gradients: the sensitivity is no longer ``dp_clip``. Zero-shot
    augmentation synthesises from statistics of the peer's own images (feature moments, the
    modality gap, class claims) and trains on the result without clipping or noise. Caption peers
    train CLIP's contrastive loss, in which every sample of a batch is the others' negative, so a
    sample's gradient is not its own; unlabelled peers train on the images their model labels most
    confidently, a selection that ranks each image against all the others."""
    if not (cfg.dp_clip > 0):
        raise PrivacyError(f"trainer config: dp_clip {cfg.dp_clip} must be > 0 (the per-sample gradient norm bound)")
    if not dp_enabled(cfg):
        return
    if cfg.dp_epsilon is not None and not cfg.dp_epsilon > 0:
        raise PrivacyError(f"trainer config: dp_epsilon {cfg.dp_epsilon} must be > 0")
    if cfg.dp_noise is not None and not cfg.dp_noise > 0:
        raise PrivacyError(f"trainer config: dp_noise {cfg.dp_noise} must be > 0 (the noise multiplier)")
    if cfg.dp_delta is not None and not 0 < cfg.dp_delta < 1:
        raise PrivacyError(f"trainer config: dp_delta {cfg.dp_delta} must be in (0, 1)")
    if cfg.augment != "off":
        raise PrivacyError(f"trainer config: augment {cfg.augment!r} with DP (dp_epsilon / dp_noise): synthesis reads the "
                           "peer's own images outside DP-SGD (feature statistics, modality gap, class claims); use augment=off")
    if cfg.data_kind != "labelled":
        raise PrivacyError(f"trainer config: data_kind {cfg.data_kind!r} with DP (dp_epsilon / dp_noise): its loss couples "
                           "samples (in-batch negatives, or pseudo-labels ranked over the whole set); DP needs data_kind labelled")
    if tau > 0:
        raise PrivacyError(f"trainer config: logit_adjust {tau} with DP (dp_epsilon / dp_noise): the label prior of "
                           "the peer's data enters every sample's loss, so one sample moves every gradient; use logit_adjust=0")


# ---------------------------------------------------------------------------------- data


def dataset_kind(dataset: str) -> str:
    """``shapes``, ``digits`` or ``folder`` (for ``folder:PATH``)."""
    if dataset in ("shapes", "digits") or (dataset.startswith("folder:") and dataset != "folder:"):
        return dataset.split(":")[0]
    raise DataError(f"dataset: {dataset!r} is not shapes, digits or folder:PATH")


def parse_partition(scheme: str) -> tuple[str, float]:
    """``iid``, ``dirichlet:A`` or ``classes:K`` -> (kind, A or K; 0 for iid)."""
    kind, _, arg = scheme.partition(":")
    if kind == "iid":
        return kind, 0.0
    if kind not in ("dirichlet", "classes"):
        raise DataError(f"partition: unknown scheme {scheme!r} (iid, dirichlet:A, classes:K, groups:KEY=V1,V2)")
    try:
        value = float(arg) if kind == "dirichlet" else int(arg)
    except ValueError:
        raise DataError(f"partition: bad parameter in {scheme!r}") from None
    if not value > 0:
        raise DataError(f"partition: parameter in {scheme!r} must be > 0")
    return kind, value


def parse_groups(scheme: str) -> tuple[str, list[str]]:
    """``"groups:task=shape,colour"`` -> ("task", ["shape", "colour"])."""
    body = scheme.removeprefix("groups:")
    key, _, values = body.partition("=")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if key not in ("task", "domain") or not vals:
        raise DataError(f"partition: {scheme!r} must look like groups:task=shape,colour or groups:domain=clean,noise")
    return key, vals


def check_task(task: str) -> None:
    """A task of the shapes world (the other datasets have one label space)."""
    if task not in shapes.ATTRIBUTES:
        raise DataError(f"task: {task!r} is not one of {shapes.ATTRIBUTES}")


def parse_domain(domain: str, dataset: str = "shapes") -> shapes.Domain:
    """A domain shift of `dataset`; digits take only pixel shifts (noise, contrast, blur)."""
    try:
        dom = shapes.parse_domain(domain)
    except ValueError as e:
        raise DataError(str(e)) from None
    if dataset == "digits" and (dom.full_rotation or dom.clutter):
        raise DataError(f"domain: {domain!r}; digits support only pixel shifts (noise, contrast, blur)")
    return dom


def check_data(cfg: TrainerConfig) -> None:
    """Dataset, partition, and the task and domain each peer of a ``groups:`` partition gets."""
    kind = dataset_kind(cfg.dataset)
    tasks, domains = [cfg.task], [cfg.domain]
    if cfg.partition.startswith("groups:"):
        key, values = parse_groups(cfg.partition)
        tasks, domains = (values, domains) if key == "task" else (tasks, values)
    else:
        parse_partition(cfg.partition)
    if kind == "folder":
        return
    for task in tasks if kind == "shapes" else ():
        check_task(task)
    for domain in domains:
        parse_domain(domain, kind)


# ------------------------------------------------------------------------------ the whole


def check_trainer(cfg: TrainerConfig) -> float:
    """Every value of `cfg` that needs no model, each error naming the option and the value;
    returns the effective logit adjustment (`logit_adjust`)."""
    if cfg.optimizer not in OPTIMIZERS:
        raise TrainerError(f"trainer config: optimizer {cfg.optimizer!r} is not adamw or sgd")
    tau = logit_adjust(cfg)
    if not (tau >= 0 and math.isfinite(tau)):
        raise TrainerError(f"trainer config: logit_adjust {tau} is not a finite number >= 0")
    if cfg.local_steps < 0 or cfg.batch_size < 1:
        raise TrainerError(f"trainer config: local_steps {cfg.local_steps} / batch_size {cfg.batch_size} invalid")
    parse_lr_schedule(cfg.lr_schedule)
    parse_device(cfg.device)
    if cfg.lora_rank < 1:
        raise TrainerError(f"trainer config: lora_rank {cfg.lora_rank} must be >= 1")
    check_lora_targets(cfg.lora_targets)
    if cfg.augment not in AUGMENT_MODES:
        raise TrainerError(f"trainer config: augment {cfg.augment!r} is not one of {AUGMENT_MODES}")
    if cfg.augment_teachers not in TEACHER_MODES:
        raise TrainerError(f"trainer config: augment_teachers {cfg.augment_teachers!r} is not one of {TEACHER_MODES}")
    if not 0 <= cfg.augment_distill <= 1:
        raise TrainerError(f"trainer config: augment_distill {cfg.augment_distill} not in [0, 1]")
    if cfg.augment_claim is not None and cfg.augment_claim < 0:
        raise TrainerError(f"trainer config: augment_claim {cfg.augment_claim} < 0")
    if not 0 <= cfg.augment_threshold <= 1 or cfg.augment_weight < 0 or cfg.augment_batch < 1:
        raise TrainerError(
            f"trainer config: augment_threshold {cfg.augment_threshold} (in [0, 1]) / augment_weight "
            f"{cfg.augment_weight} (>= 0) / augment_batch {cfg.augment_batch} (>= 1) invalid"
        )
    if cfg.augment == "zero-shot":
        try:
            check_synthesis(cfg.augment_per_class, cfg.augment_steps, cfg.augment_confidence)
        except AugmentError as e:
            raise TrainerError(f"trainer config: {e}") from None
    check_kind(cfg, tau)
    check_privacy(cfg, tau)
    check_data(cfg)
    return tau


def check_trainers(trainers: Mapping[int, Mapping[str, Any]], seed: int, entries: Mapping[int, Mapping[str, Any]],
                   source: str) -> None:
    """`check_trainer` of every peer's options (`p2pfl.config.peer_trainers`) as the host builds
    its trainer from them, with the run `seed`; the error of a peer whose topology entry has its
    own ``trainer:`` (`entries`) names that peer."""
    for p, own in trainers.items():
        try:
            check_trainer(TrainerConfig.from_dict({"seed": seed, **own}))
        except P2pflError as e:
            if "trainer" not in entries.get(p, {}):
                raise
            raise type(e)(f"{source}: peer {p}: {e}") from None
