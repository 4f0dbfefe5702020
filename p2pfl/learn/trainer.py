"""Local training and evaluation of one peer's LoRA adapter.

The daemon calls a ``Trainer`` from a worker thread: ``train_round`` runs ``local_steps``
optimizer steps from the current adapter, gossip then replaces the travelling tensors through
``load_adapter_state`` and training continues from the mixed adapter with the same optimizer.
Everything a peer does is a function of (run seed, peer id, number of peers, step count).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from p2pfl.config import TrainerConfig, dataset_key, dataset_name
from p2pfl.learn import augment, options, privacy, shapes, tasks
from p2pfl.learn.data import (
    PeerData,
    Split,
    composition_test,
    flipped_labels,
    global_test,
    load_peer_data,
    rng_for,
)
from p2pfl.learn.foundation import Foundation, load_foundation, zero_shot_accuracy
from p2pfl.learn.model import AdaptedClip, LoraHost, LoraSpec, freeze_norm_statistics, shared_host
from p2pfl.learn.options import TrainerError, parse_lr_schedule


def resolve_device(spec: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` -> a device that exists here, else TrainerError."""
    kind, index = options.parse_device(spec)
    if kind == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainerError(f"trainer config: device {spec!r} asked for but CUDA is not available here")
    index = torch.cuda.current_device() if index is None else index
    if index >= torch.cuda.device_count():
        raise TrainerError(f"trainer config: device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device("cuda", index)


class Trainer:
    """One peer's adapter, data and optimizer.

    Trainers in one process with the same model, weights, LoRA spec and device share one frozen
    foundation and its LoRA layers (`p2pfl.learn.model.LoraHost`) and the data every peer computes
    alike (global test set, pool, partition); each owns its travelling tensors, optimizer state,
    data share and step. ``share=False`` gives a trainer private copies of everything.
    ``label_flip`` poisons the peer's training labels (a Byzantine peer, `--byzantine labelflip`).
    ``datasets``: the run's datasets (`config.run_datasets`); with more than one, global
    evaluation also covers each of them (``dataset_accuracy``).
    ``rounds``: the rounds this peer will train, which differential privacy (``dp_epsilon``)
    calibrates its noise to and checks the budget against at start (`p2pfl.learn.privacy`).
    """

    def __init__(self, cfg: TrainerConfig, peer_id: int, n_peers: int, share: bool = True, replica: int = 0,
                 label_flip: bool = False, datasets: Sequence[tuple[str, str, str]] = (), rounds: int | None = None) -> None:
        self.tau = options.check_trainer(cfg)  # the effective logit adjustment
        self.cfg, self.peer_id, self.n_peers = cfg, peer_id, n_peers
        self.device = resolve_device(cfg.device)
        if share:
            host = shared_host(cfg.model, cfg.pretrained, LoraSpec.of(cfg), self.device, replica)
        else:
            fm = load_foundation(cfg.model, cfg.pretrained)
            fm.clip.to(self.device)
            host = LoraHost(fm, LoraSpec.of(cfg))
        self.foundation: Foundation = host.foundation
        self.model = AdaptedClip(self.foundation, LoraSpec.of(cfg), host)
        self.data: PeerData = load_peer_data(
            cfg.dataset, cfg.task, cfg.domain, cfg.partition, peer_id, n_peers, cfg.seed,
            cfg.samples_per_peer, cfg.test_fraction, cfg.global_test_size, self.foundation.image_size, cache=share,
            kind=cfg.data_kind,
        )
        if label_flip:
            self.data = flipped_labels(self.data)
        self.heads = host.heads  # frozen text prototypes: the same for every adapter unless the text tower adapts
        self.dp = privacy.DpSgd(privacy.make_plan(cfg, len(self.data.train), rounds), self.model, self.device, peer_id) if options.dp_enabled(cfg) else None
        params = self.model.trainable()
        if cfg.optimizer == "adamw":
            self.opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
        self.step = 0  # optimizer steps taken; also positions the batch stream
        self.decay_steps = parse_lr_schedule(cfg.lr_schedule) * cfg.local_steps
        n_classes = len(self.data.train.class_names)
        prior = torch.bincount(self.data.train.labels, minlength=n_classes).float() / max(1, len(self.data.train))
        self.unseen_classes = [c for c in range(n_classes) if prior[c] == 0]  # never in this peer's training data
        self.label_prior = prior.to(self.device)
        self.logit_offset = self._logit_offset(self.label_prior)
        self.augment_classes: list[int] = []
        self.synthesis = augment.SynthesisConfig()
        method = augment.METHOD_DEFAULTS[augment.method_of(self.foundation)]
        self.augment_claim = method.claim if cfg.augment_claim is None else cfg.augment_claim
        if cfg.augment == "zero-shot":  # the values were checked above (`options.check_trainer`)
            self.synthesis = augment.SynthesisConfig(
                per_class=cfg.augment_per_class,
                steps=method.steps if cfg.augment_steps is None else cfg.augment_steps,
                confidence=method.confidence if cfg.augment_confidence is None else cfg.augment_confidence,
            )
            self.augment_classes = augment.under_represented(self.data.train.labels, n_classes, cfg.augment_threshold)
        self.synthetic: augment.SyntheticSet | None = None  # this round's cache
        self.teachers: list[dict[str, torch.Tensor]] = []  # neighbours' public adapters (set_teachers)
        self.teacher_of: dict[int, int] = {}  # class -> index into teachers used in the last synthesis
        self.drift: dict[str, torch.Tensor] = {}  # gradient tracking: moved off every step (set_correction)
        own = dataset_key(cfg.dataset, self.data.task, self.data.domain)
        self.identity = {"data_kind": cfg.data_kind, "dataset": dataset_name(own), "task": self.data.task}
        self.eval_sets: dict[str, Split] = {}  # the run's datasets by name (this peer's own global test among them)
        keys = sorted(set(datasets) | {own}) if not cfg.partition.startswith("groups:") else []  # groups: planted tasks, group-local tests
        for k in keys if len(keys) > 1 else ():
            split = self.data.global_test if k == own else global_test(*k, cfg.seed, cfg.global_test_size, self.foundation.image_size)
            if split is not None:  # a folder without test/: nothing to evaluate others on
                self.eval_sets[dataset_name(k)] = split

    # -- exchange

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The travelling tensors (B only under FFA): float32 contiguous CPU copies."""
        return self.model.adapter_state()

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Install mixed tensors; same names and shapes, else ValueError naming the key."""
        self.model.load_adapter_state(state)

    def set_teachers(self, states: list[dict[str, torch.Tensor]]) -> None:
        """Neighbours' public adapters (their CHOCO replicas ``xhat_j``, already local: no extra
        traffic) to synthesise this peer's under-represented classes with from the next round on.
        Copied; names and shapes must be this adapter's, else TrainerError naming the key."""
        own = self.adapter_state()
        for st in states:
            for k, v in own.items():
                if k not in st or st[k].shape != v.shape:
                    raise TrainerError(f"set_teachers: adapter tensor {k!r} missing or of another shape")
        self.teachers = [{k: st[k].detach().to(torch.float32).clone() for k in own} for st in states]

    def set_correction(self, correction: dict[str, torch.Tensor]) -> None:
        """Gradient tracking (K-GT): the next round's local steps also move the adapter by
        ``-correction`` in all, ``1/local_steps`` of it after each optimizer step, which is K-GT's
        corrected step ``-lr (g + c)`` written as a displacement; applying it outside the optimizer
        keeps it one and the same whatever the optimizer. Names and shapes must be this adapter's."""
        own = self.adapter_state()
        if {k: v.shape for k, v in correction.items()} != {k: v.shape for k, v in own.items()}:
            raise TrainerError("set_correction: tensors differ from the adapter's names or shapes")
        steps = max(1, self.cfg.local_steps)
        self.drift = {k: (v.to(self.device, torch.float32) / steps) for k, v in correction.items()}

    # -- local work

    def _logit_offset(self, prior: torch.Tensor) -> torch.Tensor | None:
        """``tau * log(prior)``, added to the training logits (never at evaluation).

        Logit adjustment (Menon et al., ICLR 2021) trains for the balanced error rather than the
        label prior of what the peer trains on; in federated learning under label skew this is
        FedLC's calibration (Zhang et al., ICML 2022). A class with no local data gets ``-inf``,
        which leaves it out of the local softmax (FedRS's restricted softmax, Li & Zhan, KDD 2021):
        local steps then never push images away from the text embedding of a class the peer has
        no data for. Synthetic samples count in the prior (see `_round_prior`)."""
        if self.tau == 0 or len(self.data.train) == 0:
            return None
        return self.tau * prior.log()

    def _batch(self, step: int, n: int) -> np.ndarray:
        """Indices of batch ``step`` of ``n`` samples: epochs of seeded permutations, so a restart
        resumes exactly (an unlabelled peer's pseudo-labels are a function of its model)."""
        bs = self.cfg.batch_size
        epoch, pos = divmod(step, max(1, n // bs))
        return rng_for(self.cfg.seed, "batches", self.peer_id, epoch).permutation(n)[pos * bs : (pos + 1) * bs]

    def _head(self, split: Split) -> torch.Tensor:
        head = self.heads.get(self.model, split.class_names, split.templates or self.foundation.templates)
        # Self-training adapts the image tower to fixed class prototypes, as SHOT keeps the source
        # classifier fixed: prototypes that moved toward the pseudo-labels would confirm them.
        return head.detach() if self.cfg.data_kind == "unlabelled" else head

    def lr_at(self, step: int) -> float:
        """Cosine decay (Loshchilov & Hutter, 2017) to 0 at the end of the schedule, then 0.

        Constant-step decentralized SGD stalls at a distance from the optimum that grows with the
        step size and with how different the peers' data are; decaying the step removes it."""
        if not self.decay_steps:
            return self.cfg.lr
        return self.cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, self.decay_steps) / self.decay_steps))

    def train_round(self) -> dict[str, Any]:
        """``local_steps`` optimizer steps; mean training loss and accuracy over them, and the
        peer's data kind, dataset and task. An unlabelled peer first labels its images anew."""
        train, out = self.data.train, dict(self.identity)
        if len(train) and self.cfg.local_steps and self.cfg.data_kind == "unlabelled":
            with self.model.bound():
                train, pseudo = self._pseudo_labelled(train)
            out.update(pseudo)
        if len(train) == 0 or self.cfg.local_steps == 0:
            return {"train_loss": float("nan"), "train_accuracy": float("nan"), "steps": 0.0, **out}
        with self.model.bound():
            return {**(self._train_round(train) if self.dp is None else self._dp_train_round(train)), **out}

    @torch.no_grad()
    def _pseudo_labelled(self, train: Split) -> tuple[Split, dict[str, float]]:
        """The images that the current (mixed) model labels confidently, with those labels
        (`tasks.select_pseudo_labels`), and how right they are: the hidden labels are read for
        that figure alone."""
        self.model.clip.eval()
        head = self._head(train)
        probs = torch.cat([self.model.logits(train.images[i : i + 256], head).softmax(-1) for i in range(0, len(train), 256)])
        idx, labels = tasks.select_pseudo_labels(probs, self.cfg.pseudo_threshold, self.cfg.pseudo_fraction)
        hidden = train.labels.numpy()
        metrics = {"pseudo_label_accuracy": float((labels == hidden[idx]).mean()) if len(idx) else float("nan"),
                   "pseudo_label_coverage": len(idx) / len(train),
                   "pseudo_argmax_accuracy": float((probs.argmax(1).cpu().numpy() == hidden).mean())}
        t = torch.from_numpy(idx)
        return Split(train.images[t], torch.from_numpy(labels), train.class_names, train.templates), metrics

    def _train_round(self, train: Split) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.augment_classes:
            self.synthetic = self._synthesize()
            self.logit_offset = self._logit_offset(self._round_prior())
            out.update(synthetic_samples=float(len(self.synthetic)), synth_seconds_per_sample=self.synthetic.seconds_per_sample,
                       augment_teachers=float(len(self.teachers)), taught_classes=float(len(self.teacher_of)))
        freeze_norm_statistics(self.model.clip.train())
        losses, correct, seen = [], 0, 0
        for _ in range(self.cfg.local_steps):
            idx = torch.from_numpy(self._batch(self.step, len(train)))
            images, labels = train.images[idx].to(self.device), train.labels[idx].to(self.device)
            if self.data.captions:  # image-text pairs: CLIP's contrastive loss, scored by in-batch retrieval
                loss, logits, labels = tasks.caption_loss(self.foundation, images, [self.data.captions[i] for i in idx.tolist()])
            else:
                logits = self.model.logits(images, self._head(train))
                loss = F.cross_entropy(logits if self.logit_offset is None else logits + self.logit_offset, labels)
            if self.synthetic is not None and len(self.synthetic) and self.cfg.augment_weight > 0:
                loss = self._mixed_loss(loss, len(labels), train)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(self.step)
            self.opt.step()
            with torch.no_grad():
                for k, d in self.drift.items():
                    self.model.lora[k].sub_(d)
            self.step += 1
            losses.append(loss.item())
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
        self.opt.zero_grad(set_to_none=True)  # every step starts from none: no need to hold them between rounds
        self.model.clip.eval()
        return {"train_loss": float(np.mean(losses)), "train_accuracy": correct / seen, "steps": float(len(losses)), **out}

    def _dp_train_round(self, train: Split) -> dict[str, float]:
        """DP-SGD steps (`p2pfl.learn.privacy`) with this trainer's optimizer, schedule and step count."""
        assert self.dp is not None
        fixed = None if self.model.spec.text else self._head(train).detach()  # computed outside the per-sample transforms

        def run(images: torch.Tensor) -> torch.Tensor:
            return self.model.logits(images, self._head(train) if fixed is None else fixed)

        freeze_norm_statistics(self.model.clip.train())
        try:
            out, self.step = self.dp.train_round(self.opt, train.images, train.labels, run, self.lr_at, self.step, self.cfg.local_steps)
        finally:
            self.model.clip.eval()
        return out

    # -- zero-shot data augmentation (p2pfl/learn/augment.py)

    def _augment_seed(self) -> int:
        return int(rng_for(self.cfg.seed, "augment", self.peer_id, self.step).integers(2**62))

    def _synthesize(self) -> augment.SyntheticSet:
        """This round's synthetic samples, cached for its local steps: from the current (mixed)
        model, or with ``augment_teachers=neighbours`` and teachers set, each class from the
        neighbour model that claims it most (data-free knowledge transfer from neighbours)."""
        self.model.clip.eval()
        train = self.data.train
        head = self._head(train).detach()
        seed = self._augment_seed()
        self.teacher_of = {}
        if self.cfg.augment_teachers == "self" or not self.teachers:
            return augment.synthesize(self.foundation, head, self.augment_classes, self.synthesis, seed, train.images, train.labels)
        own = self.adapter_state()

        @torch.no_grad()
        def claims() -> torch.Tensor:  # mean class probabilities over the peer's own images
            return torch.cat([self.model.logits(train.images[i : i + 256], head).softmax(-1) for i in range(0, len(train), 256)]).mean(0)

        own_claims = claims()
        try:
            scores = []
            for st in self.teachers:
                self.model.load_adapter_state(st)
                scores.append(claims())
            groups = augment.assign_teachers(torch.stack(scores), self.augment_classes, own_claims, self.augment_claim)
            sets = []
            for t, classes in sorted(groups.items()):
                self.model.load_adapter_state(self.teachers[t])
                self.teacher_of.update({c: t for c in classes})
                sets.append(augment.synthesize(self.foundation, head, classes, self.synthesis, seed + t, train.images, train.labels))
        finally:
            self.model.load_adapter_state(own)
        if not sets:  # no neighbour knows any of these classes better than this peer: nothing this round
            return augment.SyntheticSet("feature", torch.zeros(0, device=self.device), torch.zeros(0, dtype=torch.long, device=self.device), 0.0, {})
        return augment.concat_sets(sets)

    def _round_prior(self) -> torch.Tensor:
        """Label prior of this round's training mix: each batch holds ``batch_size`` real samples
        and ``augment_batch`` synthetic ones of weight ``augment_weight``, drawn uniformly from the
        synthetic set."""
        syn = self.synthetic
        if syn is None or not len(syn) or self.cfg.augment_weight == 0:
            return self.label_prior
        syn_prior = torch.bincount(syn.labels, minlength=len(self.label_prior)).float() / len(syn)
        w = self.cfg.augment_weight * min(self.cfg.augment_batch, len(syn))
        return (self.cfg.batch_size * self.label_prior + w * syn_prior) / (self.cfg.batch_size + w)

    def _mixed_loss(self, real_loss: torch.Tensor, n_real: int, train: Split) -> torch.Tensor:
        """Per-sample weighted mean: real samples weigh 1, synthetic ones ``augment_weight``."""
        syn = self.synthetic
        assert syn is not None
        n = len(syn)
        pos = rng_for(self.cfg.seed, "augment-batches", self.peer_id, self.step).permutation(n)[: self.cfg.augment_batch]
        idx = torch.from_numpy(pos).to(self.device)
        logits = augment.synthetic_logits(self.foundation, syn, idx, self._head(train))
        if self.logit_offset is not None:
            logits = logits + self.logit_offset
        target = F.one_hot(syn.labels[idx], logits.shape[1]).float()
        d = self.cfg.augment_distill
        if d > 0 and syn.probs is not None:
            target = (1 - d) * target + d * syn.probs[idx]
        logp = logits.log_softmax(-1)
        if self.logit_offset is not None:  # classes outside the softmax (-inf): no target mass, no 0 * -inf
            inside = torch.isfinite(self.logit_offset)
            target = target * inside
            target = target / target.sum(-1, keepdim=True)
            logp = logp.masked_fill(~inside, 0.0)
        syn_loss = -(target * logp).sum(-1).mean()
        w = self.cfg.augment_weight * len(idx)
        return (real_loss * n_real + syn_loss * w) / (n_real + w)

    @torch.no_grad()
    def _accuracy(self, split: Split) -> tuple[float, float]:
        if len(split) == 0:
            return float("nan"), float("nan")
        protos = self._head(split)
        correct, loss = 0, 0.0
        for i in range(0, len(split), 256):
            logits = self.model.logits(split.images[i : i + 256], protos)
            labels = split.labels[i : i + 256].to(self.device)
            loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(1) == labels).sum())
        return correct / len(split), loss / len(split)

    def evaluate(self, global_eval: bool = False) -> dict[str, Any]:
        """Local held-out accuracy (and loss); with ``global_eval`` also on the global test set."""
        with self.model.bound():
            self.model.clip.eval()
            acc, loss = self._accuracy(self.data.test)
            out = {"accuracy": acc, "test_loss": loss}
            if global_eval:
                out["global_accuracy"], out["global_loss"] = self._accuracy(self.data.global_test)
                out["unseen_accuracy"] = self._unseen_accuracy()
                out.update(self._other_tasks(out["global_accuracy"]))
        return out

    def _other_tasks(self, own: float) -> dict[str, Any]:
        """Accuracy on every dataset of a run with several (``dataset_accuracy``: name -> accuracy)
        and, for a shapes peer whose text tower adapts, the 64-way pair task on held-out and seen pairs."""
        out: dict[str, Any] = {}
        if self.eval_sets:
            out["dataset_accuracy"] = {name: own if split is self.data.global_test else self._accuracy(split)[0]
                                       for name, split in self.eval_sets.items()}
        if self.model.spec.text and self.cfg.dataset == "shapes":
            for key, pairs in (("composition_accuracy", "unseen"), ("composition_seen_accuracy", "seen")):
                out[key] = self._accuracy(composition_test(self.data.domain, self.cfg.seed, self.cfg.global_test_size, pairs))[0]
        return out

    def _unseen_accuracy(self) -> float:
        """Global-test accuracy on the classes this peer never saw locally (NaN if it saw them all)."""
        g = self.data.global_test
        if not self.unseen_classes or len(g) == 0:
            return float("nan")
        mask = torch.isin(g.labels, torch.tensor(self.unseen_classes))
        if not mask.any():
            return float("nan")
        idx = torch.nonzero(mask).squeeze(1)
        return self._accuracy(Split(g.images[idx], g.labels[idx], g.class_names, g.templates))[0]

    # -- checkpoints: flat tensors + JSON-able metadata, no pickle

    def optimizer_state(self) -> dict:
        """``{"tensors": {name: Tensor}, "meta": plain data}``; names are adapter keys, not indices."""
        sd = self.opt.state_dict()
        names = self.model.travelling
        tensors: dict[str, torch.Tensor] = {}
        meta_state: dict[str, dict] = {}
        for i, st in sd["state"].items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"{names[i]}/{k}"] = v.detach().cpu().clone().contiguous()
                else:
                    meta_state.setdefault(names[i], {})[k] = v
        groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
        meta = {"step": self.step, "optimizer": self.cfg.optimizer, "param_groups": groups, "state": meta_state}
        return {"tensors": tensors, "meta": meta}

    def load_optimizer_state(self, d: dict) -> None:
        """Inverse of ``optimizer_state``; ValueError naming the first bad key."""
        meta, tensors = d.get("meta", {}), d.get("tensors", {})
        if meta.get("optimizer") != self.cfg.optimizer:
            raise TrainerError(f"optimizer state: optimizer {meta.get('optimizer')!r} != {self.cfg.optimizer!r}")
        names = self.model.travelling
        index = {n: i for i, n in enumerate(names)}
        state: dict[int, dict] = {}
        for key, v in tensors.items():
            name, _, entry = key.rpartition("/")
            if name not in index:
                raise TrainerError(f"optimizer state: unknown tensor {key!r}")
            state.setdefault(index[name], {})[entry] = v.clone()
        for name, extra in meta.get("state", {}).items():
            if name not in index:
                raise TrainerError(f"optimizer state: unknown parameter {name!r}")
            state.setdefault(index[name], {}).update(extra)
        current = self.opt.state_dict()
        groups = [{**g, "params": cg["params"]} for g, cg in zip(meta["param_groups"], current["param_groups"], strict=True)]
        self.opt.load_state_dict({"state": state, "param_groups": groups})
        self.step = int(meta["step"])


def shapes_zero_shot_report(
    fm: Foundation, n: int = 1000, seed: int = 20240, domain: str = "clean", attrs: tuple[str, ...] = shapes.ATTRIBUTES
) -> dict[str, float]:
    """Zero-shot accuracy per attribute on held-out scenes, and on unseen shape x colour pairs."""
    rng = np.random.default_rng(seed)
    dom = shapes.parse_domain(domain)
    out: dict[str, float] = {}
    for split in ("seen", "unseen"):
        scenes = shapes.sample_scenes(rng, n, split, dom)
        images = torch.from_numpy(shapes.render(scenes, dom, seed=seed))
        labels = torch.from_numpy(scenes.attrs)
        for attr in attrs if split == "seen" else ("shape", "colour"):
            k = shapes.ATTRIBUTES.index(attr)
            acc = zero_shot_accuracy(fm, images, labels[:, k], shapes.VALUES[attr], shapes.TEMPLATES[attr])
            out[attr if split == "seen" else f"unseen_{attr}"] = acc
        pair = labels[:, 0] * len(shapes.COLOURS) + labels[:, 1]
        out[f"{split}_pair"] = zero_shot_accuracy(fm, images, pair, shapes.PAIR_NAMES, shapes.TEMPLATES["shape"])
    return out
