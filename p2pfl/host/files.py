"""The run directory's text files: topology files and JSONL records.

The core never opens a file; what reads or writes one lives here, and tensors (adapters,
checkpoints) in `p2pfl.host.checkpoint`. No torch here: the command line reads topologies before
it imports the learning stack.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from pathlib import Path
from typing import Any

import yaml

from p2pfl.core import netfile
from p2pfl.core.admission import MALFORMED, AdmissionError
from p2pfl.core.topology import Topology, TopologyError, parse


def _text(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise TopologyError(f"{path}: cannot read {what} file ({e.strerror})") from e


def load_topology(path: str | Path) -> Topology:
    """A topology file, checked (`p2pfl.core.topology.parse`); a missing or unreadable file is a `TopologyError`."""
    return parse(_text(Path(path), "topology"), str(path))


def load_network(path: str | Path) -> netfile.Network:
    """An open network's file, checked (`p2pfl.core.netfile.parse`); unreadable: a `TopologyError`."""
    return netfile.parse(_text(Path(path), "network"), str(path))


def load_blobs(path: str | Path, what: str = "certificate") -> list[bytes]:
    """The certificates or revocations of a file written by `p2pfl-topology authority`: base64,
    one a line; a line that is not base64 is an `AdmissionError` naming it."""
    out = []
    for k, line in enumerate(_text(Path(path), what).splitlines(), 1):
        if line.strip():
            try:
                out.append(base64.b64decode(line.strip(), validate=True))
            except binascii.Error:
                raise AdmissionError(MALFORMED, f"{path}: line {k} is not a base64 {what}") from None
    return out


def dump_topology(topo: Topology, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(topo.to_dict(), sort_keys=False, default_flow_style=None))


class JsonlWriter:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # a crash can leave a torn last line; appending after it would glue two records
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                self.path.write_bytes(data[: data.rfind(b"\n") + 1])
        self._f = self.path.open("a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: str | Path, last: int | None = None) -> list[dict[str, Any]]:
    """Records of a JSONL file, or only its `last` ones (a live run's progress, without parsing
    every round again); a torn final line (a peer killed mid-write, or writing now) is ignored."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    if last is not None:
        lines = lines[-(last + 1):]  # one more, in case the final one is torn
    out = []
    for k, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if k != len(lines) - 1:
                raise
    return out if last is None else out[max(len(out) - last, 0):]
