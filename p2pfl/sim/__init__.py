"""Drivers without sockets or clocks: many nodes on a virtual clock, and the bare-engine harness
that tests and benches share."""
