"""Differential privacy of what leaves a peer: DP-SGD on its trainable adapter tensors.

A peer's data never travel, but the adapter deltas it gossips are computed from them, and
gradient-inversion and membership-inference attacks recover training data from such updates.
DP-SGD (Abadi et al., CCS 2016) bounds what any one training sample can change in them: every step
draws a Poisson sample of the peer's training set (each sample in with probability
``q = batch_size / n``), computes each sample's gradient of the trainable adapter tensors (B alone
under FFA-LoRA, A and B with ``train_a``), clips each to L2 norm ``dp_clip``, sums them, adds
Gaussian noise of standard deviation ``dp_noise * dp_clip`` per coordinate and divides by the
expected batch size ``q n``. The optimizer then steps on that gradient as on any other. Everything
the peer sends (deltas, resync states, consensus sketches, estimator payloads, PPFM fingerprints)
is a function of the trained adapter and of what it received, so by post-processing it keeps the
guarantee: ``(epsilon, delta)``-DP with respect to adding or removing one of the peer's training
samples, against anyone who sees all of it, neighbours included.

The accountant is opacus's RDP accountant (Mironov, CSF 2017; subsampled Gaussian: Mironov, Talwar
and Zhang, 2019), and `calibrate` is opacus's noise search: given ``dp_epsilon`` the noise
multiplier is the one that spends exactly that budget over the planned ``rounds x local_steps``
steps. The spent epsilon is a function of the steps taken alone, so a resumed peer (its step count
restored from the checkpoint) goes on from what it had spent.

Per-sample gradients come from ``torch.func`` (``vmap`` of ``grad``) with the adapter tensors as
inputs. opacus's GradSampleModule sees only modules it can hook: peft's LoRA on open_clip's fused
attention (``target_parameters=["in_proj_weight"]``) adds ``B @ A * scale`` to the weight through a
parametrisation registered at every forward, never calling ``lora_B`` as a module, so opacus leaves
those tensors without per-sample gradients; and ``torch.func`` cannot run that registration (it
mutates a captured tensor). `AdapterCall` therefore switches those wrappers off for the call and
substitutes the adapted weight ``W + B @ A * scale`` itself; the c_fc / c_proj (and ResNet conv)
LoRA layers run as peft wrote them. tests/test_privacy.py checks the result against a loop of
ordinary single-sample backward passes.

Sampling and noise draw from the operating system's entropy, never from the run seed: the run
seed is shared with every peer, and a neighbour who could regenerate the noise could subtract it.
DP runs are therefore not bit-reproducible. Paths that touch raw data outside DP-SGD are refused
(`p2pfl.learn.options.check_privacy`); docs/privacy.md lists what was audited.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from peft.tuners.lora.layer import ParamWrapper
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from p2pfl.config import TrainerConfig
from p2pfl.learn.model import AdaptedClip
from p2pfl.learn.options import PrivacyError

# vmap runs scaled_dot_product_attention one sample at a time on CPU (no batching rule yet) and
# says so on every first call; the result is exact, the message only noise in every peer's log.
warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented the batching rule")

Run = Callable[[torch.Tensor], torch.Tensor]  # images -> class logits through the bound adapter


# ---------------------------------------------------------------- the plan and its accountant


@dataclass(frozen=True)
class DpPlan:
    """What one peer's DP-SGD runs with: noise multiplier, clip, Poisson rate, delta, budget."""

    noise: float
    clip: float
    sample_rate: float
    delta: float
    budget: float  # epsilon at which training stops; inf with dp_noise alone
    expected_batch: float  # q n: the divisor of the noisy sum


def epsilon_spent(noise: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon after `steps` subsampled Gaussian steps, by opacus's RDP accountant."""
    if steps <= 0:
        return 0.0
    acc = RDPAccountant()
    acc.history = [(noise, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def calibrate(epsilon: float, sample_rate: float, steps: int, delta: float) -> float:
    """The noise multiplier that spends at most `epsilon` in `steps` steps (opacus's search)."""
    with warnings.catch_warnings():  # the search probes tiny noise, where opacus warns that its RDP orders run out
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=max(1, steps), accountant="rdp"))


def make_plan(cfg: TrainerConfig, n_train: int, rounds: int | None) -> DpPlan:
    """The plan of a peer with `n_train` training samples that will train `rounds` rounds (None:
    not known, e.g. a library caller); `PrivacyError` naming the option, with the numbers, when
    the settings cannot meet the budget in the planned steps."""
    n = max(1, n_train)
    q = min(1.0, cfg.batch_size / n)
    delta = 1.0 / (2 * n) if cfg.dp_delta is None else cfg.dp_delta
    steps = None if rounds is None else rounds * cfg.local_steps
    budget = math.inf if cfg.dp_epsilon is None else cfg.dp_epsilon
    plan_text = f"{rounds} rounds x {cfg.local_steps} local steps at sample rate {q:.4g} (batch_size / {n} samples), delta {delta:.3g}"
    if cfg.dp_noise is None:
        if steps is None:
            raise PrivacyError("trainer config: dp_epsilon without dp_noise: calibrating the noise needs the planned rounds "
                               "(Trainer(..., rounds=R)); give dp_noise instead")
        try:
            noise = calibrate(budget, q, steps, delta)
        except ValueError:
            raise PrivacyError(f"trainer config: dp_epsilon {budget} cannot be met by any noise in {plan_text}") from None
    else:
        noise = cfg.dp_noise
        if steps is not None and (planned := epsilon_spent(noise, q, steps, delta)) > budget:
            raise PrivacyError(
                f"trainer config: dp_noise {noise} would spend epsilon {planned:.3f} > dp_epsilon {budget} in {plan_text}; "
                f"raise dp_noise to {calibrate(budget, q, steps, delta):.3f} or plan fewer steps")
    return DpPlan(noise=noise, clip=cfg.dp_clip, sample_rate=q, delta=delta, budget=budget, expected_batch=q * n)


# ---------------------------------------------------------------- per-sample gradients


class _Forward(nn.Module):
    """The CLIP as the one submodule of a module whose forward is any function of it, so that
    ``functional_call`` can swap adapter tensors in for a call of e.g. ``encode_image``."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor, run: Run) -> torch.Tensor:
        return run(images)


class AdapterCall:
    """Runs a peer's model with its adapter tensors given as function inputs (for ``torch.func``).

    Built from the `model.AdaptedClip` whose keys it takes; the tensor names are those of the
    host's LoRA layers, the same for every adapter bound in that host."""

    def __init__(self, adapter: AdaptedClip) -> None:
        self.module = _Forward(adapter.clip)
        self.scale = adapter.spec.scale
        name_of = {id(m): n for n, m in self.module.named_modules()}
        self.keys = list(adapter.travelling)
        self.paths = {k: f"{name_of[id(adapter.host.slots[k])]}.weight" for k in self.keys}
        # peft wrappers of fused attention weights: (wrapper, name of the weight it adapts, adapter key prefix)
        self.fused: list[tuple[ParamWrapper, str, str]] = []
        for name, m in self.module.named_modules():
            if isinstance(m, ParamWrapper):
                prefix = name.removeprefix("clip.")
                self.fused.append((m, f"{name_of[id(m.get_base_layer())]}.{m.parameter_name}", prefix))
        self.frozen = {k: v for k, v in adapter.lora.items() if k not in self.keys}

    def substitutes(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Module tensor name -> value for one call: the adapter tensors, and each fused weight
        with its LoRA update ``W + B @ A * scale`` added (what peft's parametrisation computes)."""
        out = {self.paths[k]: params[k] for k in self.keys}
        for wrapper, weight, prefix in self.fused:
            a = params.get(f"{prefix}.lora_A", self.frozen.get(f"{prefix}.lora_A"))
            b = params[f"{prefix}.lora_B"]
            out[weight] = getattr(wrapper.get_base_layer(), wrapper.parameter_name) + (b @ a) * self.scale
        return out

    @contextmanager
    def fused_off(self) -> Iterator[None]:
        """peft's fused-weight wrappers pass straight through to their base layer for the block
        (`substitutes` adds their update instead). The caller holds the host's lock."""
        for wrapper, _, _ in self.fused:
            wrapper._disable_adapters = True
        try:
            yield
        finally:
            for wrapper, _, _ in self.fused:
                wrapper._disable_adapters = False


def per_sample_gradients(call: AdapterCall, params: Mapping[str, torch.Tensor], run: Run, images: torch.Tensor,
                         labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(gradient of each sample's cross-entropy by adapter key, each of shape (b, *tensor shape);
    the per-sample losses (b,); the logits (b, classes)), at the adapter tensors `params`."""

    def one(p: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = functional_call(call.module, call.substitutes(p), (x[None], run))
        return F.cross_entropy(logits, y[None]), logits[0]

    with call.fused_off():
        grads, (losses, logits) = vmap(grad_and_value(one, has_aux=True), in_dims=(None, 0, 0))(dict(params), images, labels)
    return grads, losses, logits


def clip_and_sum(grads: Mapping[str, torch.Tensor], bound: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each sample's gradient (over all tensors together) scaled to L2 norm at most `bound`, summed
    over the samples; and the per-sample norms before clipping."""
    norms = torch.sqrt(sum((g.flatten(1).double() ** 2).sum(1) for g in grads.values())).to(torch.float32)
    factor = (bound / (norms + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("i,i...->...", factor, g) for k, g in grads.items()}, norms


def noisy_mean(summed: Mapping[str, torch.Tensor], plan: DpPlan, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The Gaussian mechanism on a sum of clipped gradients: N(0, (noise * clip)^2) added to
    every coordinate, then divided by the expected batch size."""
    std = plan.noise * plan.clip
    return {k: (s + torch.normal(0.0, std, s.shape, generator=generator, device=s.device, dtype=s.dtype)) / plan.expected_batch
            for k, s in summed.items()}


def secret_generator(device: torch.device) -> torch.Generator:
    """A generator seeded from the OS's entropy: noise and sampling no other peer can regenerate."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


# ---------------------------------------------------------------- one peer's DP-SGD


class DpSgd:
    """One peer's DP-SGD: Poisson batches, noisy clipped gradients, and the budget it spends.

    The trainer keeps its optimizer, learning-rate schedule and step count; `train_round` uses
    them. The step count is the accountant's only input."""

    def __init__(self, plan: DpPlan, adapter: AdaptedClip, device: torch.device, peer_id: int) -> None:
        self.plan, self.adapter, self.device = plan, adapter, device
        self.call = AdapterCall(adapter)
        self.generator = secret_generator(device)
        self.log = logging.getLogger(f"p2pfl.peer.{peer_id}")
        self.peer_id = peer_id
        self.stop_logged = False

    def spent(self, steps: int) -> float:
        return epsilon_spent(self.plan.noise, self.plan.sample_rate, steps, self.plan.delta)

    def affords(self, steps: int) -> bool:
        """Whether `steps` steps in all stay within the budget."""
        return self.spent(steps) <= self.plan.budget

    def metrics(self, steps: int) -> dict[str, float]:
        """What every record carries: the epsilon spent so far (at the plan's delta), and whether
        the budget stops the next step."""
        return {"dp_epsilon_spent": self.spent(steps), "dp_delta": self.plan.delta,
                "dp_noise_multiplier": self.plan.noise, "dp_budget_reached": float(not self.affords(steps + 1))}

    def batch(self, n: int) -> torch.Tensor:
        """Poisson sampling: each of the `n` samples independently with probability q."""
        return torch.nonzero(torch.rand(n, generator=self.generator, device=self.device) < self.plan.sample_rate).squeeze(1).cpu()

    def gradients(self, run: Run, images: torch.Tensor, labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """(the private gradient by adapter key, per-sample losses, logits) of one Poisson batch
        (possibly empty: the gradient is then noise alone, as the mechanism requires)."""
        params = {k: self.adapter.lora[k].detach() for k in self.call.keys}
        if len(labels):
            grads, losses, logits = per_sample_gradients(self.call, params, run, images, labels)
            summed, _ = clip_and_sum(grads, self.plan.clip)
        else:
            summed = {k: torch.zeros_like(v) for k, v in params.items()}
            losses, logits = torch.zeros(0, device=self.device), torch.zeros(0, 0, device=self.device)
        return noisy_mean(summed, self.plan, self.generator), losses, logits

    def train_round(self, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, run: Run,
                    lr_at: Callable[[int], float], step: int, local_steps: int) -> tuple[dict[str, float], int]:
        """Up to `local_steps` DP-SGD steps from optimizer step `step` on the training set
        (`images`, `labels`); stops before a step that would exceed the budget (logged once: the
        peer keeps gossiping, and mixing spends no privacy). Returns (metrics, the new step)."""
        losses: list[float] = []
        correct = seen = taken = 0
        for _ in range(local_steps):
            if not self.affords(step + 1):
                if not self.stop_logged:
                    self.stop_logged = True
                    self.log.info("peer %d: privacy budget reached (epsilon %.3f of %.3f at delta %.3g after %d steps): "
                                  "training stops, gossip goes on", self.peer_id, self.spent(step), self.plan.budget, self.plan.delta, step)
                break
            idx = self.batch(len(labels))
            y = labels[idx].to(self.device)
            noisy, batch_losses, logits = self.gradients(run, images[idx].to(self.device), y)
            for k, g in noisy.items():
                self.adapter.lora[k].grad = g
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            opt.step()
            step += 1
            taken += 1
            if len(y):
                losses.append(float(batch_losses.mean()))
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
        opt.zero_grad(set_to_none=True)
        out = {"train_loss": sum(losses) / len(losses) if losses else float("nan"),
               "train_accuracy": correct / seen if seen else float("nan"), "steps": float(taken)}
        return {**out, **self.metrics(step)}, step
