"""`python -m p2pfl ...` is `p2pfl-peer ...` (the launcher and the tests start peers this way)."""

import sys

from p2pfl.ops.cli import peer_main

if __name__ == "__main__":
    sys.exit(peer_main())
