"""`python peer.py ...` is `p2pfl-peer ...`."""

import sys

from p2pfl.ops.cli import peer_main

if __name__ == "__main__":
    sys.exit(peer_main())
