#!/usr/bin/env bash
# Start every peer of a topology on this machine, one process each; see `p2pfl/ops/launch.py`.
# With --ray [ADDRESS], on a Ray cluster's nodes instead (`p2pfl/ops/ray_launch.py`, docs/operations.md#cluster).
# With --open N, an open network of N peers joining through peer 0; --join RUN_DIR adds a site to
# it (`p2pfl/ops/open_launch.py`, docs/membership.md).
# usage: scripts/launch.sh TOPOLOGY [--rounds N] [--run-dir DIR] [--ray [ADDRESS] ...] [-- EXTRA PEER ARGS]
#        scripts/launch.sh --open N [--rounds R] [--run-dir DIR] [--processes P] [-- EXTRA PEER ARGS]
#        scripts/launch.sh --join RUN_DIR [--count K] [-- EXTRA PEER ARGS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${P2PFL_PYTHON:-}
if [[ -z $py ]]; then
  if [[ -x $root/.venv/bin/python ]]; then py=$root/.venv/bin/python; else py=python3; fi
fi
exec "$py" -m p2pfl.ops.launch "$@"
