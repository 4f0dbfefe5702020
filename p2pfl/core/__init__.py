"""The pure core: topologies and schedules, the wire format, codecs, CHOCO gossip, consensus
estimates, robust mixing and conduct rules. Deterministic, time as an input; no sockets, threads,
clocks or files (tests/test_layers.py walks its imports)."""
