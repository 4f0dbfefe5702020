"""Differential privacy: per-sample gradients, the noise, the accountant, the budget, the refusals."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from p2pfl.host.files import read_jsonl
from p2pfl.learn import privacy as P
from p2pfl.learn.foundation import SHAPES_CLIP_RN
from p2pfl.learn.model import freeze_norm_statistics
from p2pfl.learn.trainer import Trainer, TrainerConfig
from p2pfl.ops.pages import summary_rows
from p2pfl.ops.report import summarize

from .conftest import make_topology, wait_all

FAST = dict(samples_per_peer=96, global_test_size=60, batch_size=16, local_steps=3)


def _loop_gradients(tr: Trainer, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each sample's gradient by an ordinary backward pass through peft's own forward, one at a time."""
    fixed = None if tr.model.spec.text else tr._head(tr.data.train).detach()
    out: dict[str, list[torch.Tensor]] = {k: [] for k in tr.model.travelling}
    for i in range(len(labels)):
        params = tr.model.trainable()
        head = tr._head(tr.data.train) if fixed is None else fixed  # the text tower's gradient flows through its head
        loss = F.cross_entropy(tr.model.logits(images[i : i + 1], head), labels[i : i + 1])
        for k, g in zip(tr.model.travelling, torch.autograd.grad(loss, params), strict=True):
            out[k].append(g)
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("kw", [{}, {"train_a": True}, {"text_lora": True}, {"model": SHAPES_CLIP_RN}],
                         ids=["ffa", "train_a", "text_lora", "resnet"])
def test_clipped_per_sample_gradients_equal_a_per_sample_loop(kw):
    """Fused attention (peft target_parameters), c_fc/c_proj, A and B, the text tower, ResNet convs."""
    cfg = TrainerConfig(seed=2, dp_noise=1.0, **{**FAST, **kw})
    tr = Trainer(cfg, 0, 2)
    images, labels = tr.data.train.images[:4], tr.data.train.labels[:4]
    freeze_norm_statistics(tr.model.clip.train())  # as in training: BatchNorm statistics are the foundation's
    head = None if tr.model.spec.text else tr._head(tr.data.train).detach()

    def run(x: torch.Tensor) -> torch.Tensor:
        return tr.model.logits(x, tr._head(tr.data.train) if head is None else head)

    with tr.model.bound():
        params = {k: tr.model.lora[k].detach() for k in tr.model.travelling}
        grads, losses, _ = P.per_sample_gradients(tr.dp.call, params, run, images, labels)
        loop = _loop_gradients(tr, images, labels)
    assert any(k.endswith("attn.lora_B") for k in grads) == (kw.get("model") != SHAPES_CLIP_RN)
    for k in tr.model.travelling:
        assert grads[k].shape == (4, *tr.model.lora[k].shape)
        torch.testing.assert_close(grads[k], loop[k], rtol=1e-4, atol=1e-5)
    assert losses.shape == (4,)
    norms = torch.sqrt(sum((g.flatten(1) ** 2).sum(1) for g in loop.values()))
    bound = float(norms.median())  # clipping binds for some samples and not for others
    summed, measured = P.clip_and_sum(grads, bound)
    torch.testing.assert_close(measured, norms, rtol=1e-4, atol=1e-6)
    for k, g in loop.items():
        expected = sum(g[i] * min(1.0, bound / float(norms[i])) for i in range(4))
        torch.testing.assert_close(summed[k], expected, rtol=1e-4, atol=1e-5)


def test_noise_scale_matches_the_accountants_noise_multiplier():
    cfg = TrainerConfig(dp_epsilon=3.0, dp_clip=0.5, batch_size=32)
    plan = P.make_plan(cfg, 200, rounds=20)
    assert plan.sample_rate == 32 / 200 and plan.delta == 1 / 400 and plan.expected_batch == pytest.approx(32)
    direct = get_noise_multiplier(target_epsilon=3.0, target_delta=1 / 400, sample_rate=32 / 200, steps=20 * cfg.local_steps)
    assert plan.noise == direct
    assert 2.95 <= P.epsilon_spent(plan.noise, plan.sample_rate, 20 * cfg.local_steps, plan.delta) <= 3.0
    zeros = {"w": torch.zeros(400, 500)}
    noise = P.noisy_mean(zeros, plan, torch.Generator().manual_seed(0))["w"] * plan.expected_batch
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(noise.std()) == pytest.approx(plan.noise * plan.clip, rel=0.01)


def test_noise_and_sampling_are_not_a_function_of_the_run_seed():
    a, b = P.secret_generator(torch.device("cpu")), P.secret_generator(torch.device("cpu"))
    assert not torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))


def test_spent_epsilon_grows_with_rounds_and_matches_the_accountant():
    tr = Trainer(TrainerConfig(seed=1, dp_noise=1.1, **FAST), 0, 2, rounds=3)
    spent = [tr.train_round()["dp_epsilon_spent"] for _ in range(3)]
    assert spent[0] < spent[1] < spent[2]
    acc = RDPAccountant()
    for _ in range(tr.step):
        acc.step(noise_multiplier=1.1, sample_rate=tr.dp.plan.sample_rate)
    assert tr.step == 9 and spent[-1] == pytest.approx(acc.get_epsilon(delta=1 / (2 * len(tr.data.train))), rel=1e-9)


def test_training_stops_at_the_budget_and_the_peer_keeps_its_model(caplog):
    cfg = TrainerConfig(seed=1, dp_noise=1.1, dp_epsilon=2.0, **FAST)  # no planned rounds: it trains until the budget
    tr = Trainer(cfg, 0, 2)
    caplog.set_level(logging.INFO, logger="p2pfl.peer.0")
    records = []
    for _ in range(30):
        records.append(tr.train_round())
        if records[-1]["steps"] == 0:
            break
    before = tr.adapter_state()
    again = tr.train_round()
    assert again["steps"] == 0 and all(torch.equal(v, tr.adapter_state()[k]) for k, v in before.items())
    spent = [r["dp_epsilon_spent"] for r in records]
    assert spent == sorted(spent) and spent[-1] <= 2.0 and records[-1]["dp_budget_reached"] == 1.0
    assert tr.dp.spent(tr.step + 1) > 2.0  # one more step would have passed it
    assert sum("budget reached" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize(("kw", "named"), [
    ({"dp_clip": 0.0, "dp_epsilon": 3.0}, "dp_clip"),
    ({"dp_clip": -1.0}, "dp_clip"),
    ({"dp_epsilon": 0.0}, "dp_epsilon"),
    ({"dp_noise": -1.0}, "dp_noise"),
    ({"dp_epsilon": 3.0, "dp_delta": 1.5}, "dp_delta"),
    ({"dp_epsilon": 3.0, "augment": "zero-shot"}, "augment"),
    ({"dp_noise": 1.0, "logit_adjust": 1.0}, "logit_adjust"),
    ({"dp_noise": 1.0, "data_kind": "captions", "text_lora": True}, "data_kind"),
    ({"dp_noise": 1.0, "data_kind": "unlabelled"}, "data_kind"),
])
def test_refused_settings_name_the_option(kw, named):
    with pytest.raises(P.PrivacyError, match=named):
        Trainer(TrainerConfig(**{**FAST, **kw}), 0, 2)


def test_a_plan_over_its_budget_is_refused_with_the_epsilon_it_would_spend():
    cfg = TrainerConfig(dp_noise=2.0, dp_epsilon=1.0, batch_size=32, local_steps=10)
    planned = P.epsilon_spent(2.0, 32 / 200, 50 * 10, 1 / 400)
    with pytest.raises(P.PrivacyError, match=rf"dp_noise 2.0 would spend epsilon {planned:.3f} > dp_epsilon 1.0 in 50 rounds"):
        P.make_plan(cfg, 200, rounds=50)
    assert P.make_plan(cfg, 200, rounds=1).noise == 2.0  # the same settings fit one round
    with pytest.raises(P.PrivacyError, match="rounds"):
        P.make_plan(replace(cfg, dp_noise=None), 200, rounds=None)  # nothing to calibrate the noise to


def test_the_report_shows_each_peers_spent_epsilon():
    recs = {p: [{"round": r, "train_loss": 1.0, "dp_epsilon_spent": (r + 1) * (p + 1.0), "dp_delta": 0.002,
                 "dp_budget_reached": float(p == 1 and r == 1)} for r in range(2)] for p in range(2)}
    s = summarize(recs, None)
    assert s["dp_epsilon_spent"] == {0: 2.0, 1: 4.0} and s["dp_budget_reached_peers"] == 1 and s["dp_delta_max"] == 0.002
    rows = dict(summary_rows(s, "t", 2))
    assert rows["differential privacy: epsilon spent per peer"] == "0: 2, 1: 4"
    assert "dp_epsilon_spent" not in summarize({0: [{"round": 0, "train_loss": 1.0}]}, None)  # no DP, no rows


@pytest.mark.slow
def test_a_multi_process_run_with_dp_finishes_and_records_epsilon(tmp_path, cluster_dir, spawn):
    topo, path = make_topology(tmp_path, "ring", 3)
    sets = ["--set", "dp_epsilon=8", "--set", "local_steps=2", "--set", "samples_per_peer=64", "--set", "global_test_size=60"]
    blocks = ["0-1", "2"]  # peer 2's edges are TCP; two training processes keep the learning stack's load down
    procs = {b: spawn(path, b, cluster_dir, "--rounds", "3", "--min-wait", "30", *sets) for b in blocks}
    assert wait_all(procs, timeout=300) == {b: 0 for b in blocks}
    for p in topo.ids:
        recs = read_jsonl(cluster_dir / "metrics" / f"peer-{p}.jsonl")
        spent = [r["dp_epsilon_spent"] for r in recs]
        assert [r["round"] for r in recs] == [0, 1, 2] and spent == sorted(spent) and 0 < spent[-1] <= 8.0
