"""An open network's file: its name, the admission authority's public key, the bootstrap peers to
contact first, and the settings every peer shares. It lists no other peer: who is in the network
is whatever the authority has certified, and a new site needs no edit here.

    name: demo
    authority: 9f0c...  # the authority's Ed25519 public key, 64 hex digits (p2pfl-topology authority init)
    bootstrap:          # like a topology file's peer entries; any admitted peers will do
      - {id: 0, host: 10.0.0.1, port: 29500, public_key: "Z85 CurveZMQ key of peer 0"}
    settings: {...}     # exactly a topology file's settings: (p2pfl.config)
    membership: {...}   # optional: the view protocol's parameters, the same at every peer (ViewConfig)

Pure: `p2pfl.host.files.load_network` reads the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pfl.config import ConfigError, resolve, unknown_key
from p2pfl.core.admission import MAX_NAME, Z85_KEY, network_id
from p2pfl.core.topology import TopologyError, _need, load_yaml

if TYPE_CHECKING:  # the view protocol's module imports the wire, and with it torch: the CLI reads this file before torch
    from p2pfl.core.membership.messages import ViewConfig

TOP_LEVEL_KEYS = ("name", "authority", "bootstrap", "settings", "membership")
BOOTSTRAP_KEYS = ("id", "host", "port", "public_key")


@dataclass(frozen=True)
class Bootstrap:
    """A peer to contact first: its id, address and CurveZMQ public key (Z85)."""

    id: int
    host: str
    port: int
    public_key: str

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"


@dataclass(frozen=True)
class Network:
    name: str
    authority: bytes  # Ed25519 public key, 32 bytes
    bootstrap: tuple[Bootstrap, ...]
    settings: dict[str, Any] = field(default_factory=dict)
    views: ViewConfig | None = None  # None: ViewConfig's defaults

    @property
    def id(self) -> int:
        """`net`: the digest of the name and the authority key (`p2pfl.core.admission.network_id`)."""
        return network_id(self.name, self.authority)


def _bootstrap(entry: Any, where: str) -> Bootstrap:
    if not isinstance(entry, dict):
        raise TopologyError(f"{where}: expected a mapping with id/host/port/public_key, got {entry!r}")
    for key in entry:
        if key not in BOOTSTRAP_KEYS:
            raise TopologyError(str(unknown_key(key, BOOTSTRAP_KEYS, "key", where)))
    pid, host, port = _need(entry, "id", int, where), _need(entry, "host", str, where), _need(entry, "port", int, where)
    key = _need(entry, "public_key", str, where)
    if pid < 0:
        raise TopologyError(f"{where}.id: a peer id is a non-negative integer, got {pid}")
    if not 0 < port < 65536:
        raise TopologyError(f"{where}.port: {port} is not a TCP port")
    if len(key) != Z85_KEY or not key.isascii():
        raise TopologyError(f"{where}.public_key: expected a {Z85_KEY}-character Z85 CurveZMQ key, got {key!r}")
    return Bootstrap(pid, host, port, key)


def from_dict(doc: Any, source: str = "<network>") -> Network:
    if not isinstance(doc, dict):
        raise TopologyError(f"{source}: top level must be a mapping with name, authority and bootstrap, got {type(doc).__name__}")
    for key in doc:
        if key not in TOP_LEVEL_KEYS:
            raise TopologyError(str(unknown_key(key, TOP_LEVEL_KEYS, "top-level key", source)))
    name = _need(doc, "name", str, source)
    if not 0 < len(name) <= MAX_NAME:
        raise TopologyError(f"{source}.name: a network name has 1 to {MAX_NAME} characters, got {name!r}")
    text = _need(doc, "authority", str, source)
    try:
        authority = bytes.fromhex(text)
    except ValueError:
        authority = b""
    if len(authority) != 32:
        raise TopologyError(f"{source}.authority: expected the Ed25519 public key as 64 hex digits, got {text!r}")
    raw = _need(doc, "bootstrap", list, source)
    if not raw:
        raise TopologyError(f"{source}.bootstrap: list at least one peer to contact first")
    boot = tuple(_bootstrap(e, f"{source}: bootstrap[{k}]") for k, e in enumerate(raw))
    for what, values in (("id", [b.id for b in boot]), ("address", [f"{b.host}:{b.port}" for b in boot])):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise TopologyError(f"{source}.bootstrap: two entries have the {what} {twice[0]}")
    settings = doc.get("settings") or {}
    resolve(Path(source), boot[0].id, settings, {}, [], source)  # unknown keys and bad values, named now
    from p2pfl.core.membership.messages import ViewConfig

    try:
        views = ViewConfig.from_dict(doc.get("membership") or {}, f"{source}: membership")
    except ConfigError as e:
        raise TopologyError(str(e)) from None
    return Network(name, authority, boot, dict(settings), views)


def parse(text: str, source: str = "<network>") -> Network:
    """A network from the text of its YAML file."""
    return from_dict(load_yaml(text, source), source)
