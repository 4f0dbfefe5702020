"""One peer's rounds as a sans-IO state machine, built from parts: a neighbourhood (who, with which
weights, alive or not) and a mixer (what to send, what a message does, how to mix). Pure: every
driver (the daemon, the simulator, the tests) feeds it events and carries out its actions."""
