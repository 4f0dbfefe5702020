"""`python -m p2pfl.cli_peer` == `p2pfl-peer` (used by the launcher and the tests)."""

import sys

from p2pfl.cli import peer_main

if __name__ == "__main__":
    sys.exit(peer_main())
