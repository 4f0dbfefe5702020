"""A peer's contact payload in an open network: where to dial it and the certificate that says
which CurveZMQ key to expect there. It rides in view entries (`messages.Entry`) unchanged, so a
peer that learns another's id learns how to reach and authenticate it; the certificate is
verified when it is used (`p2pfl.net.gatekeeper.Gatekeeper.learn`), never trusted as relayed.

Encoding: a msgpack array ``[host, port, certificate]`` (str, int, bin), canonical, at most
`ViewConfig.max_payload` bytes (docs/wire.md, section 10).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from p2pfl.core.membership.messages import ViewWireError

MAX_HOST = 253  # characters of a DNS name


@dataclass(frozen=True)
class Contact:
    host: str
    port: int
    cert: bytes

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"


def encode_contact(c: Contact) -> bytes:
    check(c.host, c.port)
    return msgpack.packb([c.host, c.port, c.cert], use_bin_type=True)


def check(host: str, port: int) -> None:
    """`ViewWireError` for an address no peer can dial (an IPv6 host is written in brackets)."""
    bad = not isinstance(host, str) or not 0 < len(host) <= MAX_HOST or not host.isascii() \
        or any(ch in host for ch in "/ \t\n") or (":" in host and not host.startswith("["))
    if bad:
        raise ViewWireError(f"contact: host must be 1 to {MAX_HOST} ASCII characters without '/' or spaces, got {host!r}"[:200])
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ViewWireError(f"contact: port must be a TCP port, got {port!r}"[:200])


def decode_contact(payload: bytes) -> Contact:
    """The contact a payload holds; `ViewWireError` naming what is wrong."""
    try:
        obj = msgpack.unpackb(payload, raw=False, max_array_len=3, max_map_len=0, max_ext_len=0)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ViewWireError(f"contact: not msgpack ({type(e).__name__})") from None
    if not (isinstance(obj, list) and len(obj) == 3 and type(obj[0]) is str and type(obj[1]) is int and type(obj[2]) is bytes):
        raise ViewWireError("contact: expected [host, port, certificate]")
    c = Contact(obj[0], obj[1], obj[2])
    check(c.host, c.port)
    return c
