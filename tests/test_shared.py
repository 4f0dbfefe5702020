"""Co-hosted trainers: one foundation and LoRA host per process, results identical to private trainers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from p2pfl.learn import data
from p2pfl.learn.model import clear_shared_hosts
from p2pfl.learn.trainer import Trainer, TrainerConfig, TrainerError, resolve_device

FAST = dict(samples_per_peer=96, global_test_size=120, batch_size=16, local_steps=4)
PLAIN = TrainerConfig(task="shape", partition="dirichlet:0.5", seed=3, **FAST)
# synthesis swaps neighbours' adapters in and out of the shared layers mid-round
AUGMENT = TrainerConfig(task="shape", partition="dirichlet:0.05", seed=4, augment="zero-shot", augment_steps=3, **FAST)


@pytest.fixture(autouse=True)
def fresh_process_state():
    clear_shared_hosts()
    data.clear_caches()
    yield
    clear_shared_hosts()
    data.clear_caches()


def same_metrics(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run(cfg: TrainerConfig, share: bool, rounds: int = 2) -> tuple[list[Trainer], list]:
    """Peers 0..3 take turns: train, gossip-mix (mean of all), evaluate; returns what they report."""
    peers = [Trainer(cfg, p, 4, share=share) for p in range(4)]
    log = []
    for _ in range(rounds):
        for tr in peers:
            if cfg.augment != "off":
                tr.set_teachers([o.adapter_state() for o in peers if o is not tr])
            stats = tr.train_round()
            stats.pop("synth_seconds_per_sample", None)  # wall time
            log.append(stats)
        states = [tr.adapter_state() for tr in peers]
        log.append(states)
        mean = {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}
        for tr in peers[::2]:  # half the peers mix, so the adapters stay different
            tr.load_adapter_state(mean)
        log.extend(tr.evaluate(global_eval=True) for tr in peers)
    return peers, log


@pytest.mark.parametrize("cfg", [PLAIN, AUGMENT], ids=["plain", "augment"])
def test_shared_trainers_are_bit_identical_to_private_ones(cfg):
    shared, got = run(cfg, share=True)
    private, want = run(cfg, share=False)
    host = shared[0].model.host
    assert all(t.model.host is host and t.foundation is host.foundation for t in shared)
    assert all(t.data.global_test is shared[0].data.global_test for t in shared)
    assert len({id(t.model.host) for t in private}) == 4 and len({id(t.data.global_test) for t in private}) == 4
    if cfg.augment != "off":
        assert any(t.teacher_of for t in shared)  # synthesis really ran with neighbours' adapters
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if isinstance(g, list):
            assert all(same_tensors(a, b) for a, b in zip(g, w, strict=True))
        else:
            assert same_metrics(g, w), (g, w)
    for s, p in zip(shared, private, strict=True):
        assert same_tensors(s.optimizer_state()["tensors"], p.optimizer_state()["tensors"])
        assert s.step == p.step


def test_cohosted_trainers_do_not_leak_state_into_each_other():
    a, b = Trainer(PLAIN, 0, 2), Trainer(PLAIN, 1, 2)
    assert a.model.host is b.model.host
    b.train_round()
    before = b.adapter_state(), b.optimizer_state()["tensors"], b.evaluate(True), b.step
    for _ in range(2):
        a.train_round()
    assert not same_tensors(a.adapter_state(), before[0])
    after = b.adapter_state(), b.optimizer_state()["tensors"], b.evaluate(True), b.step
    assert same_tensors(after[0], before[0]) and same_tensors(after[1], before[1])
    assert same_metrics(after[2], before[2]) and after[3] == before[3]
    assert all(p.grad is None for p in b.model.trainable())  # a's gradients landed in a's tensors only
    # the frozen A is the host's one tensor; B is each peer's own
    key = next(k for k in a.model.lora if k.endswith("lora_A"))
    assert a.model.lora[key] is b.model.lora[key]
    assert all(a.model.lora[k] is not b.model.lora[k] for k in a.model.travelling)


def test_direct_model_use_binds_its_own_adapter():
    a, b = Trainer(PLAIN, 0, 2), Trainer(PLAIN, 1, 2)
    a.train_round()
    images, head = b.data.test.images[:8], b._head(b.data.test)
    b_logits = b.model.logits(images, head)  # binds b although a ran last
    ref = Trainer(PLAIN, 1, 2, share=False)
    assert torch.equal(b_logits, ref.model.logits(images, head))
    assert not torch.equal(a.model.logits(images, head), b_logits)


def test_optimizer_checkpoint_round_trip_with_shared_trainers():
    a, b = Trainer(PLAIN, 0, 2), Trainer(PLAIN, 1, 2)
    for tr in (a, b):
        tr.train_round()
    adapter, opt = a.adapter_state(), a.optimizer_state()
    assert {k.rpartition("/")[0] for k in opt["tensors"]} == set(a.model.travelling)  # keyed by adapter names
    meta = json.loads(json.dumps(opt["meta"]))
    a.train_round()
    expected = a.adapter_state()

    resumed = Trainer(PLAIN, 0, 2)  # a third trainer on the same host
    assert resumed.model.host is a.model.host
    resumed.load_adapter_state(adapter)
    resumed.load_optimizer_state({"tensors": opt["tensors"], "meta": meta})
    b.train_round()  # another peer runs in between
    resumed.train_round()
    assert same_tensors(resumed.adapter_state(), expected)
    with pytest.raises(TrainerError, match="bogus"):
        resumed.load_optimizer_state({"tensors": {"bogus/exp_avg": torch.zeros(1)}, "meta": meta})


def test_device_choice_and_errors(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cuda:x", "cpu:3", ""):
        with pytest.raises(TrainerError, match="is not cpu, cuda, cuda:N or auto"):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for asked in ("cuda", "cuda:1"):
        with pytest.raises(TrainerError, match="CUDA is not available"):
            Trainer(TrainerConfig(device=asked, **FAST), 0, 1)
    tr = Trainer(TrainerConfig(device="auto", **FAST), 0, 1)
    assert tr.device == torch.device("cpu") and tr.foundation.device == torch.device("cpu")
    assert all(v.device.type == "cpu" for v in tr.adapter_state().values())
    assert TrainerConfig.from_dict(TrainerConfig(device="auto").to_dict()).device == "auto"


def test_a_forward_in_another_worker_thread_leaves_no_stale_fused_weight():
    """Two worker threads, two model replicas. peft's LoRA on the fused attention weight runs each
    forward inside torch's `parametrize.cached()`, whose switch and cache are process-wide: while
    one thread is inside a forward, the other's cached W + BA outlived its own forward, and its next
    step read that freed, stale weight. Thread b is held inside such a forward while a trains."""
    import threading

    a, b = Trainer(PLAIN, 0, 2, replica=0), Trainer(PLAIN, 1, 2, replica=1)
    solo = Trainer(PLAIN, 0, 2, share=False)
    attention = next(m for m in b.model.foundation.clip.modules() if isinstance(m, torch.nn.MultiheadAttention))
    inside, release = threading.Event(), threading.Event()

    def hold(module, args):
        inside.set()
        release.wait(60)

    hook = attention.register_forward_pre_hook(hold)
    other = threading.Thread(target=b.evaluate)
    other.start()
    try:
        assert inside.wait(60), "thread b never reached the fused-weight forward"
        got = a.train_round()
    finally:
        release.set()
        other.join(60)
        hook.remove()
    assert same_metrics(got, solo.train_round()) and same_tensors(a.adapter_state(), solo.adapter_state())
