"""Peer-set flags: --id lists and ranges, the launcher's blocks, worker counts."""

import pytest

from p2pfl.config import ConfigError, parse_ids, worker_threads
from p2pfl.launch import spread
from p2pfl.peer import local_ids
from p2pfl.topology import PeerSpec, generate


def test_ids_ranges_lists_and_local():
    ids = list(range(16))
    assert parse_ids("3", ids) == [3]
    assert parse_ids("0-3", ids) == [0, 1, 2, 3]
    assert parse_ids("9,1,5-6", ids) == [1, 5, 6, 9]
    assert parse_ids("local", ids, {4, 2}) == [2, 4]
    for bad, why in [("5-2", "empty range"), ("1,x", "not an id"), ("14-17", r"\[16, 17\] are not in the topology"),
                     ("1,1", "names a peer twice"), ("local", "no peer of the topology")]:
        with pytest.raises(ConfigError, match=why):
            parse_ids(bad, ids, set())


def test_local_ids_are_the_peers_on_this_machine():
    topo = generate("ring", 3)
    topo.peers[2] = PeerSpec(2, "192.0.2.7", 29502)  # TEST-NET-1: never this machine
    assert local_ids(topo) == {0, 1}


def test_spread_gives_contiguous_even_blocks_and_never_an_empty_one():
    assert spread(list(range(8)), 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert spread(list(range(10)), 4) == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
    assert spread([0, 1], 8) == [[0], [1]]
    blocks = spread(list(range(256)), 3)
    assert [p for b in blocks for p in b] == list(range(256)) and {len(b) for b in blocks} <= {85, 86}


def test_worker_threads():
    assert worker_threads(0, 1, 2) == 1  # one peer: one worker
    assert worker_threads(0, 64, 2) == 2  # one per core
    assert worker_threads(3, 2, 16) == 2  # never more than peers
    with pytest.raises(ConfigError, match="--threads"):
        worker_threads(-1, 4, 2)
