"""peft LoRA adapters on the frozen foundation (`p2pfl.learn.foundation`), and zero-shot heads.

Only adapters ever leave a peer. Under the default FFA-LoRA scheme every peer draws the same
frozen A matrices from a shared seed and trains B alone, so averaging B across peers averages the
adapters' weight deltas ``B @ A * scale`` exactly. The frozen model is loaded once per process and
device (`LoraHost`), and each peer binds its own adapter tensors to it.
"""

from __future__ import annotations

import hashlib
import math
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from open_clip.modified_resnet import ModifiedResNet
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import ParamWrapper
from torch import nn
from torch.nn.utils import parametrize

from p2pfl.config import TrainerConfig
from p2pfl.learn.foundation import Foundation, load_foundation
from p2pfl.learn.options import ModelError, check_lora_targets


@dataclass(frozen=True)
class LoraSpec:
    """Which weights get LoRA and how they are exchanged.

    ``train_a=False`` is FFA-LoRA: A from ``seed`` (shared by all peers) and frozen; B zero-init,
    trained and the only thing that travels, so averaging is exact. ``train_a=True`` trains and
    ships A and B; averaging them then only approximates averaging the adapters.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("in_proj", "c_fc", "c_proj")
    text: bool = False
    train_a: bool = False
    seed: int = 0
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def of(cls, cfg: TrainerConfig) -> LoraSpec:
        # A's seed is the run seed: the same frozen A on every peer is what makes FFA averaging exact.
        return cls(cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets), cfg.text_lora, cfg.train_a, cfg.seed)


def has_resnet_tower(clip: nn.Module) -> bool:
    """True for open_clip's ModifiedResNet image tower (BatchNorm with running statistics)."""
    return isinstance(getattr(clip, "visual", None), ModifiedResNet)


def resolve_targets(clip: nn.Module, spec: LoraSpec) -> LoraSpec:
    """On a ResNet image tower add "conv" (the ViT names exist there only in the text tower)."""
    if has_resnet_tower(clip) and "conv" not in spec.targets:
        return replace(spec, targets=(*spec.targets, "conv"))
    if not has_resnet_tower(clip) and "conv" in spec.targets:
        raise ModelError("lora targets: 'conv' needs a ModifiedResNet image tower (e.g. shapes-clip-rn); this one is a ViT")
    return spec


def _target_names(clip: nn.Module, spec: LoraSpec) -> tuple[list[str], list[str]]:
    """Module names (nn.Linear, nn.Conv2d) and parameter names (fused attention weights) to adapt."""
    check_lora_targets(spec.targets)
    towers = ["visual.transformer."] + (["transformer."] if spec.text else [])
    modules, params = [], []
    for name, mod in clip.named_modules():
        if "conv" in spec.targets and _is_bottleneck_conv(name, mod):
            modules.append(name)
        if not any(name.startswith(t) for t in towers):
            continue
        last = name.rsplit(".", 1)[-1]
        if isinstance(mod, nn.Linear) and last in ("c_fc", "c_proj") and last in spec.targets:
            modules.append(name)
        if isinstance(mod, nn.MultiheadAttention) and "in_proj" in spec.targets:
            params.append(f"{name}.in_proj_weight")  # fused q/k/v: peft's target_parameters
    if not modules and not params:
        raise ModelError(f"lora targets: nothing matched {spec.targets!r} in this model")
    return modules, params


def _is_bottleneck_conv(name: str, mod: nn.Module) -> bool:
    """``visual.layerK.i.convJ`` of a ModifiedResNet (not the stem, not the downsample 1x1s)."""
    parts = name.split(".")
    return (isinstance(mod, nn.Conv2d) and len(parts) == 4 and parts[0] == "visual"
            and parts[1].startswith("layer") and parts[3] in ("conv1", "conv2", "conv3"))


def _forget_fused_weight(wrapper: ParamWrapper) -> None:
    """After each forward of `wrapper`, drop the W + BA it left in torch's parametrization cache.

    peft's LoRA on the fused attention weight (`target_parameters`) runs each forward inside
    torch's `parametrize.cached()`, whose switch and cache are process-wide: the cache is emptied
    only when no thread holds the switch on. With two worker threads in forwards at once, one
    thread's cached W + BA outlives its forward while the other holds the switch, and its next
    step reads that stale weight: a freed graph in training ("backward through the graph a second
    time"), the previous adapter in evaluation. Dropping this module's entry from torch's private
    cache, keyed as torch keys it (the base module's id, the parameter's name), ends it with its
    forward and leaves the switch, and everyone else's caching, as they were; tests/test_model.py
    fails if torch's keying changes."""
    key = (id(wrapper.get_base_layer()), wrapper.parameter_name)

    def forget(module: nn.Module, args: tuple, out: object) -> None:  # returns None: the output stays the module's
        parametrize._cache.pop(key, None)

    wrapper.register_forward_hook(forget, always_call=True)


def _short(peft_name: str) -> str:
    """peft parameter name -> stable adapter key, e.g. ``visual.transformer.resblocks.0.attn.lora_B``."""
    name = peft_name.removeprefix("base_model.model.")
    return name.replace(".default.weight", "").replace(".default", "")


def _seeded_uniform(seed: int, name: str, shape: torch.Size, bound: float) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound


class LoraHost:
    """A foundation CLIP wrapped by peft once, whose LoRA layers the peers' adapters take turns in.

    peft injects LoRA into the CLIP in place, so the frozen weights, the frozen A matrices (the
    same seeded tensors on every peer under FFA-LoRA) and the frozen text prototypes (``heads``)
    can exist once per process however many peers it hosts. Each peer's travelling tensors are its
    own Parameters (see `AdaptedClip`), swapped into the LoRA layers by pointer before the model
    runs, so gradients land in the peer's tensors and nothing is copied. ``lock`` serialises
    co-hosted peers: the bound adapter is process state.
    """

    def __init__(self, foundation: Foundation, spec: LoraSpec) -> None:
        self.requested = spec
        spec = resolve_targets(foundation.clip, spec)
        self.foundation, self.spec = foundation, spec
        modules, params = _target_names(foundation.clip, spec)
        cfg = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=modules or None,
            target_parameters=params or None,
            bias="none",
        )
        self.peft = get_peft_model(foundation.clip, cfg)
        self.clip = self.peft.base_model.model
        for m in self.peft.modules():
            if isinstance(m, ParamWrapper):
                _forget_fused_weight(m)
        # adapter key -> the nn.Linear / nn.Conv2d of peft's whose ``weight`` that tensor is
        self.slots: dict[str, nn.Module] = {
            _short(f"{n}.weight"): m for n, m in self.peft.named_modules() if n.endswith((".lora_A.default", ".lora_B.default"))
        }
        self.travelling = sorted(k for k in self.slots if spec.train_a or k.endswith("lora_B"))
        self.frozen: dict[str, nn.Parameter] = {}
        for key in sorted(set(self.slots) - set(self.travelling)):
            self.frozen[key] = nn.Parameter(self.initial(key), requires_grad=False)
            self.slots[key].weight = self.frozen[key]
        self.heads = HeadCache()
        self.lock = threading.RLock()
        self._owner: weakref.ref[AdaptedClip] | None = None

    @property
    def device(self) -> torch.device:
        return self.foundation.device

    def initial(self, key: str) -> torch.Tensor:
        """A tensor's starting value: A from the spec's seed (kaiming-uniform bound), B zero."""
        shape = self.slots[key].weight.shape
        if key.endswith("lora_A"):  # same A on every peer, from the shared seed
            return _seeded_uniform(self.spec.seed, key, shape, 1.0 / math.sqrt(shape[1:].numel())).to(self.device)
        return torch.zeros(shape, device=self.device)

    def bind(self, adapter: AdaptedClip) -> None:
        """Make ``adapter``'s travelling tensors the ones the LoRA layers use (no copy)."""
        with self.lock:
            if self._owner is not None and self._owner() is adapter:
                return
            for key in self.travelling:
                self.slots[key].weight = adapter.lora[key]
            self._owner = weakref.ref(adapter)


_HOSTS: dict[tuple, LoraHost] = {}
_HOSTS_LOCK = threading.Lock()


def shared_host(model: str, pretrained: str | None, spec: LoraSpec, device: torch.device, replica: int = 0) -> LoraHost:
    """The process's `LoraHost` for (model, weights, LoRA spec, device), built on first use;
    `replica` > 0 gives another copy, so several worker threads can train at once."""
    key = (model, pretrained, spec, str(device), replica)
    with _HOSTS_LOCK:
        if key not in _HOSTS:
            fm = load_foundation(model, pretrained)
            fm.clip.to(device)
            _HOSTS[key] = LoraHost(fm, spec)
        return _HOSTS[key]


def clear_shared_hosts() -> None:
    """Forget the process's hosts: later trainers load their own foundation (peers still holding
    an old host keep it)."""
    with _HOSTS_LOCK:
        _HOSTS.clear()


class AdaptedClip:
    """One peer's LoRA adapter on a foundation CLIP (image tower, optionally the text tower).

    The peer owns its travelling tensors (``lora`` holds them and the host's frozen ones); the
    CLIP and its LoRA layers belong to ``host``, private unless one is passed to share it.
    Everything here that runs the model binds this adapter first; code running ``clip`` or
    ``foundation`` directly calls `bind` (or holds `bound`) itself.
    """

    def __init__(self, foundation: Foundation, spec: LoraSpec, host: LoraHost | None = None) -> None:
        if host is None:
            host = LoraHost(foundation, spec)
        elif host.foundation is not foundation or host.requested != spec:
            raise ModelError("adapter: the host was built from another foundation or LoRA spec")
        self.host, self.foundation, self.spec = host, host.foundation, host.spec
        self.travelling = host.travelling
        self.lora: dict[str, nn.Parameter] = {**host.frozen, **{k: nn.Parameter(host.initial(k)) for k in host.travelling}}
        self.tokenizer = foundation.tokenizer
        self.bind()

    @property
    def clip(self) -> nn.Module:
        """The host's peft-wrapped CLIP (shared; bind before running it)."""
        return self.host.clip

    def bind(self) -> None:
        self.host.bind(self)

    @contextmanager
    def bound(self) -> Iterator[None]:
        """Hold the host and keep this adapter bound in it for the block."""
        with self.host.lock:
            self.bind()
            yield

    def trainable(self) -> list[nn.Parameter]:
        return [self.lora[k] for k in self.travelling]

    def class_embeddings(self, class_names: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        with self.bound():
            return self.foundation.class_embeddings(class_names, templates)

    def logits(self, images: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        with self.bound():
            return self.foundation.logits(images, class_emb)

    # -- adapter state: what travels between peers

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Travelling tensors (B only under FFA) as float32 contiguous CPU copies, sorted names."""
        return {k: self.lora[k].detach().to("cpu", torch.float32).clone().contiguous() for k in self.travelling}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the travelling LoRA tensors (CPU or device tensors); names and shapes must match."""
        expected = self.travelling
        missing = [k for k in expected if k not in state]
        extra = [k for k in state if k not in expected]
        if missing or extra:
            raise ModelError(f"adapter state: {'missing' if missing else 'unexpected'} key {(missing or extra)[0]!r}")
        for k in expected:
            v = state[k]
            if not isinstance(v, torch.Tensor) or v.shape != self.lora[k].shape:
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ModelError(f"adapter state: key {k!r} has shape {got}, expected {tuple(self.lora[k].shape)}")
            if not torch.isfinite(v).all():
                raise ModelError(f"adapter state: key {k!r} has non-finite values")
        with torch.no_grad():
            for k in expected:
                self.lora[k].copy_(state[k])

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """The adapters' weight updates ``B @ A * scale`` keyed by the adapted weight's module."""
        out = {}
        for k in sorted(self.lora):
            if k.endswith("lora_A"):
                base = k.removesuffix(".lora_A")
                a, b = self.lora[k].detach(), self.lora[base + ".lora_B"].detach()
                delta = b.flatten(1) @ a.flatten(1) * self.spec.scale  # conv: (out, r, 1, 1) x (r, in, kh, kw)
                out[base] = delta.view(b.shape[0], *a.shape[1:]) if a.ndim == 4 else delta
        return out


def freeze_norm_statistics(module: nn.Module) -> nn.Module:
    """Put every BatchNorm in eval mode: its running statistics belong to the frozen foundation.

    In train mode BN would normalise with batch statistics and overwrite the stored ones, so peers'
    frozen backbones would drift apart (breaking exact adapter averaging) and the statistics that
    DeepInversion-style synthesis matches would be lost.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return module


@dataclass
class HeadCache:
    """Frozen class prototypes per (class names, templates); recomputed only if the text tower adapts."""

    entries: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def get(self, model: AdaptedClip, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        if model.spec.text:
            return model.class_embeddings(names, templates)
        key = (tuple(names), tuple(templates))
        if key not in self.entries:
            with torch.no_grad():
                self.entries[key] = model.class_embeddings(names, templates)
        return self.entries[key]
