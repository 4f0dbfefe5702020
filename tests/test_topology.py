import math

import numpy as np
import pytest

from p2pfl.core import topology as T
from p2pfl.host.files import dump_topology, load_topology


@pytest.mark.parametrize("kind,n", [("ring", 8), ("torus", 16), ("exponential", 16), ("complete", 8), ("star", 9), ("erdos_renyi", 20), ("small_world", 20), ("path", 5)])
def test_mixing_matrix_is_symmetric_doubly_stochastic(kind, n):
    t = T.generate(kind, n)
    w = t.mixing_matrix()
    assert np.abs(w - w.T).max() < 1e-12
    assert np.abs(w.sum(0) - 1).max() < 1e-12 and np.abs(w.sum(1) - 1).max() < 1e-12
    assert (w >= 0).all()
    assert 0 <= t.mixing_lambda() < 1


@pytest.mark.parametrize("n", [8, 16, 32])
def test_ring_gap_matches_closed_form(n):
    t = T.generate("ring", n)
    exact = 1 - (1 / 3 + 2 / 3 * math.cos(2 * math.pi / n))  # MH weights 1/3 on a ring
    assert t.spectral_gap() == pytest.approx(exact, rel=1e-9)
    assert t.spectral_gap() == pytest.approx(T.closed_form_gap("ring", n), rel=0.15 if n == 8 else 0.03)


def test_torus_gap_matches_closed_form():
    t = T.generate("torus", 64)  # 8x8
    exact = 1 - (1 / 5 + 2 / 5 * (1 + math.cos(2 * math.pi / 8)))
    assert t.spectral_gap() == pytest.approx(exact, rel=1e-9)
    assert t.spectral_gap() == pytest.approx(T.closed_form_gap("torus", 64), rel=0.1)


def test_gap_ordering_and_rounds():
    gaps = {k: T.generate(k, 16).spectral_gap() for k in ("ring", "torus", "exponential", "complete")}
    assert gaps["ring"] < gaps["torus"] <= gaps["exponential"] < gaps["complete"] == pytest.approx(1.0)
    ring = T.generate("ring", 16)
    r = ring.rounds_to(1e-3)
    assert ring.mixing_lambda() ** r <= 1e-3 < ring.mixing_lambda() ** (r - 1)


def test_roundtrip_through_yaml(tmp_path):
    t = T.generate("small_world", 12, base_port=31000, seed=3)
    path = tmp_path / "sw.yaml"
    dump_topology(t, path)
    back = load_topology(path)
    assert sorted(map(sorted, back.graph.edges)) == sorted(map(sorted, t.graph.edges))
    assert back.peers[5].port == 31005
    assert np.allclose(back.mixing_matrix(), t.mixing_matrix())


def test_generator_section(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("peers:\n" + "".join(f"  - {{id: {i}, host: 127.0.0.1, port: {30000 + i}}}\n" for i in range(6)) + "generator: {kind: ring}\n")
    t = load_topology(path)
    assert t.neighbors(0) == [1, 5]


BAD = {
    "peers: [}": "invalid YAML at line 1",
    "- 1\n- 2\n": "top level must be a mapping",
    "peers: []\nedges: []": "non-empty list",
    "peers:\n  - {id: 0, host: a, port: 1}\n  - {id: 0, host: a, port: 2}\nedges: []": "duplicate peer id 0",
    "peers:\n  - {id: 0, host: a, port: 1}\n  - {id: 1, host: a, port: 1}\nedges: [[0, 1]]": "both use a:1",
    "peers:\n  - {id: 0, host: a, port: 1}\n  - {id: 1, host: a, port: 2}\nedges: [[0, 0]]": "self-loop on peer 0",
    "peers:\n  - {id: 0, host: a, port: 1}\n  - {id: 1, host: a, port: 2}\nedges: [[0, 7]]": "unknown peer id 7",
    "peers:\n  - {id: 0, host: a, port: 1}\n  - {id: 1, host: a, port: 2}\n  - {id: 2, host: a, port: 3}\nedges: [[0, 1]]": "not connected",
    "peers:\n  - {id: 0, host: a}\nedges: []": "missing field 'port'",
    "peers:\n  - {id: x, host: a, port: 1}\nedges: []": "peers[0].id: expected int",
    "peers:\n  - {id: 0, host: a, port: 70000}\nedges: []": "not a TCP port",
    "peers:\n  - {id: 0, host: a, port: 1}\n": "needs an 'edges' list",
    "peers:\n  - {id: 0, host: a, port: 1}\ngenerator: {kind: moebius}": "unknown topology kind",
    "peers:\n  - {id: 0, host: a, port: 1}\nedges: []\nsetings: {rounds: 3}": "unknown top-level key 'setings'; did you mean 'settings'?",
}


@pytest.mark.parametrize("text,needle", list(BAD.items()))
def test_bad_files_name_the_problem(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(T.TopologyError, match=None) as e:
        load_topology(path)
    assert needle in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(T.TopologyError, match="cannot read"):
        load_topology(tmp_path / "nope.yaml")


def test_shipped_topologies_load():
    from pathlib import Path

    files = sorted(p for p in Path(__file__).parent.parent.glob("topologies/*.yaml") if p.name != "network.yaml")  # test_admission's
    assert len(files) >= 7
    for f in files:
        t = load_topology(f)
        assert t.n >= 2 and 0 < t.spectral_gap() <= 1
