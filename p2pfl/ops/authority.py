"""`p2pfl-topology authority`: an open network's admission authority (docs/security.md).

Its directory holds ``authority.key`` (the Ed25519 secret seed, hex, mode 0600), ``authority.pub``
(the public key, hex, for the network file) and ``issued.jsonl`` (a line per certificate issued),
from which a revocation learns until when the certificates it revokes stay valid, so that peers
can forget it then. Certificates and revocations are written as base64 text, one per line.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import time
from pathlib import Path

from nacl.signing import SigningKey

from p2pfl.config import ConfigError
from p2pfl.core import admission
from p2pfl.host.files import read_jsonl

SECRET, PUBLIC, LEDGER = "authority.key", "authority.pub", "issued.jsonl"


def add_parser(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("authority", help="an open network's admission authority: key pair, certificates, revocations")
    cmds = a.add_subparsers(dest="authority_cmd", required=True)
    i = cmds.add_parser("init", help="make the authority's Ed25519 key pair in --dir and print its public key")
    i.add_argument("--dir", type=Path, required=True)
    m = cmds.add_parser("admit", help="certify a peer id and its CurveZMQ public key (made here if not given)")
    m.add_argument("--dir", type=Path, required=True)
    m.add_argument("--id", type=int, required=True, help="the peer id")
    m.add_argument("--network", required=True, help="the network's name, as in its network file")
    m.add_argument("--public-key", help="the peer's CurveZMQ public key (Z85); without it a key pair is made in --keys-dir")
    m.add_argument("--keys-dir", type=Path, help="where a new key pair goes (default: keys/ beside --output)")
    m.add_argument("--days", type=float, default=30.0, help=f"validity (default 30, at most {admission.MAX_VALIDITY // 86400})")
    m.add_argument("-o", "--output", type=Path, required=True, help="the certificate file to write")
    m.add_argument("--append", action="store_true", help="add a line to --output (a file of several certificates: co-hosted peers)")
    r = cmds.add_parser("revoke", help="revoke every certificate issued so far for a peer id")
    r.add_argument("--dir", type=Path, required=True)
    r.add_argument("id", type=int, help="the peer id")
    r.add_argument("--network", help="the network's name (default: the one its certificates were issued for)")
    r.add_argument("-o", "--output", type=Path, required=True, help="revocation list file to append to")


def _secret(d: Path) -> bytes:
    try:
        seed = bytes.fromhex((d / SECRET).read_text().strip())
    except OSError as e:
        raise ConfigError(f"--dir: cannot read the authority key {d / SECRET} ({e.strerror}); run 'authority init --dir {d}'") from e
    except ValueError:
        seed = b""
    if len(seed) != 32:
        raise ConfigError(f"--dir: {d / SECRET} is not an Ed25519 secret key (64 hex digits)")
    return seed


def _write_line(path: Path, blob: bytes, append: bool) -> None:
    with path.open("a" if append else "w") as f:
        f.write(base64.b64encode(blob).decode() + "\n")


def init(d: Path) -> int:
    d.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(d / SECRET, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"--dir: {d / SECRET} exists; an authority key is never overwritten") from None
    key = SigningKey.generate()
    with os.fdopen(fd, "w") as f:
        f.write(bytes(key).hex() + "\n")
    public = bytes(key.verify_key).hex()
    (d / PUBLIC).write_text(public + "\n")
    print(public)
    return 0


def _curve_key(public_key: str | None, keys_dir: Path, peer: int) -> tuple[bytes, str]:
    """The peer's CurveZMQ public key: given, or of a key pair made in `keys_dir`; and what was done."""
    if public_key is not None:
        key = public_key.strip().encode()
        if len(key) != admission.Z85_KEY or not key.isascii():
            raise ConfigError(f"--public-key: expected a {admission.Z85_KEY}-character Z85 CurveZMQ key, got {public_key!r}")
        return key, ""
    import zmq.auth

    keys_dir.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(str(keys_dir), f"peer-{peer}")
    os.chmod(secret_file, 0o600)
    return zmq.auth.load_certificate(public_file)[0], f"made CurveZMQ key pair {secret_file} (keep it private) and {public_file}"


def certify(d: Path, network: str, peer: int, output: Path, days: float = 30.0, public_key: str | None = None,
            keys_dir: Path | None = None, append: bool = False) -> str:
    """Certify `peer` (and its key pair, made in `keys_dir`, default keys/ beside `output`, unless
    `public_key` is given) into `output`; what was done, to print."""
    secret = _secret(d)
    if not 0 < days <= admission.MAX_VALIDITY / 86400:
        raise ConfigError(f"--days: expected more than 0 and at most {admission.MAX_VALIDITY // 86400}, got {days:g}")
    if peer < 0:
        raise ConfigError(f"--id: a peer id is a non-negative integer, got {peer}")
    key, made = _curve_key(public_key, keys_dir or output.parent / "keys", peer)
    issued = int(time.time())
    expires = issued + int(days * 86400)
    blob = admission.issue(secret, network, peer, key, issued, expires)
    _write_line(output, blob, append=append)
    record = {"peer": peer, "network": network, "issued": issued, "expires": expires, "key": key.decode()}
    with (d / LEDGER).open("a") as f:
        f.write(json.dumps(record) + "\n")
    return (made + "\n" if made else "") + (f"{'appended to' if append else 'wrote'} {output}: peer {peer} of network {network!r}, "
                                             f"key {key.decode()}, valid until {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(expires))} "
                                             f"({len(blob)} bytes)")


def admit(args: argparse.Namespace) -> int:
    print(certify(args.dir, args.network, args.id, args.output, args.days, args.public_key, args.keys_dir, args.append))
    return 0


def revoke(args: argparse.Namespace) -> int:
    secret = _secret(args.dir)
    ledger = args.dir / LEDGER
    issued_to = [r for r in (read_jsonl(ledger) if ledger.exists() else []) if r["peer"] == args.id]
    networks = sorted({r["network"] for r in issued_to})
    network = args.network or (networks[0] if len(networks) == 1 else None)
    if network is None:
        raise ConfigError(f"--network: give the network (peer {args.id}'s certificates in {ledger}: {networks or 'none'})")
    now = int(time.time())
    expiries = [r["expires"] for r in issued_to if r["network"] == network]
    until = max(expiries) if expiries else now + admission.MAX_VALIDITY  # certificates issued elsewhere: the longest
    blob = admission.revoke(secret, network, args.id, now, until)
    _write_line(args.output, blob, append=True)
    print(f"appended to {args.output}: revocation of peer {args.id} of network {network!r}, every certificate issued "
          f"up to now; peers may forget it after {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(until))}")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.authority_cmd == "init":
        return init(args.dir)
    return admit(args) if args.authority_cmd == "admit" else revoke(args)
