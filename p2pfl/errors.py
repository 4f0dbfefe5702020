"""The one base of every error p2pfl raises on purpose.

Each layer has its own error type (`TopologyError`, `WireError`, `ConfigError`, ...) that names
the offending field and value; all derive from `P2pflError`, so a caller that only needs to know
"p2pfl refused this, with a message a person can read" catches one type, and anything else that
escapes (a `KeyError`, a `TypeError`) is a bug rather than bad input. Errors about a bad value
also derive from `ValueError`, so callers that catch that keep working.
"""

from __future__ import annotations


class P2pflError(Exception):
    """A refusal with a message that names what was wrong; never a bug."""
