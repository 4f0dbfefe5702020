"""Admission to an open network: certificates, revocations, the network file, the authority's
command line, and the gatekeeper over real loopback TCP with CurveZMQ (transports, no node)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import zmq
import zmq.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from p2pfl.core import admission as A
from p2pfl.core import netfile
from p2pfl.core.topology import PeerSpec, TopologyError
from p2pfl.errors import P2pflError
from p2pfl.host.files import load_blobs, load_network
from p2pfl.net.gatekeeper import Gatekeeper
from p2pfl.net.transport import CurveKeys, Transport, admitted_keys
from p2pfl.ops.cli import topology_main

from .conftest import free_base_port
from .test_transport import until

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_800_000_000  # "now" of the pure tests, unix seconds
DAY = 86400
NET = "demo"
SECRET = hashlib.sha256(b"test authority").digest()  # the authority's Ed25519 seed
PUBLIC = A.public_key(SECRET)
KEY = b"rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # a peer's CurveZMQ public key (Z85)


def cert(peer: int = 5, key: bytes = KEY, issued: int = T0 - DAY, expires: int = T0 + DAY, network: str = NET,
         secret: bytes = SECRET) -> bytes:
    return A.issue(secret, network, peer, key, issued, expires)


def reason(blob: bytes | None, **claims) -> str | None:
    try:
        A.verify(blob, PUBLIC, NET, claims.pop("now", T0), **claims)
    except A.AdmissionError as e:
        return e.reason
    return None


# ------------------------------------------------------------------ certificates and revocations

def test_a_certificate_binds_id_key_network_and_expiry_in_about_136_bytes():
    blob = cert()
    c = A.verify(blob, PUBLIC, NET, T0, 5, KEY)
    assert (c.peer, c.key, c.network, c.issued, c.expires, c.blob) == (5, KEY, NET, T0 - DAY, T0 + DAY, blob)
    assert c.authority == A.key_id(PUBLIC) == hashlib.blake2b(PUBLIC, digest_size=8).digest()
    assert len(blob) == 132 + len(NET)  # docs/security.md: 132 bytes and the name, for ids below 128
    assert len(cert(peer=1000)) == 134 + len(NET)
    fields = msgpack.unpackb(blob)  # the documented layout, field by field
    assert fields[:7] == [A.CERTIFICATE, A.key_id(PUBLIC), NET, 5, KEY, T0 - DAY, T0 + DAY] and len(fields[7]) == 64
    SigningKey(SECRET).verify_key.verify(msgpack.packb(fields[:7]), fields[7])  # an Ed25519 signature of the fields before it


def test_every_refusal_has_its_reason():
    good = cert()
    forged = bytearray(good)
    forged[-1] ^= 1
    stranger = hashlib.sha256(b"another authority").digest()
    impostor = A.issue(stranger, NET, 5, KEY, T0 - DAY, T0 + DAY)  # another key, naming ours: a forgery
    impostor = impostor.replace(A.key_id(A.public_key(stranger)), A.key_id(PUBLIC))
    non_canonical = good.replace(b"\xa4demo\x05", b"\xa4demo\xcc\x05")  # the id as a uint8: same value, other bytes
    revocations = A.Revocations(PUBLIC, NET)
    assert revocations.add(A.revoke(SECRET, NET, 5, T0 - 10, T0 + DAY), T0)
    cases = {
        "no-certificate": [reason(None), reason(b"")],
        "malformed": [reason(b"\x93\x01\x02\x03"), reason(b"\xff" * 40), reason(good[:-3]), reason(good + b"\x00"),
                      reason(non_canonical), reason(A.revoke(SECRET, NET, 5, T0, T0 + DAY)), reason(bytes(600))],
        "expired": [reason(good, now=T0 + DAY), reason(cert(issued=T0 - 9 * DAY, expires=T0 - DAY))],
        "revoked": [reason(good, revoked=revocations)],
        "wrong-id": [reason(good, claimed_id=6)],
        "wrong-key": [reason(good, claimed_key=b"x" * 40)],
        "bad-signature": [reason(bytes(forged)), reason(impostor)],
        "other-authority": [reason(A.issue(stranger, NET, 5, KEY, T0 - DAY, T0 + DAY))],
        "other-network": [reason(cert(network="elsewhere"))],
    }
    assert sorted(cases) == sorted(A.REASONS)
    for want, got in cases.items():
        assert got == [want] * len(got), (want, got)
    assert reason(good, now=T0 + DAY - 1, claimed_id=5, claimed_key=KEY, revoked=A.Revocations(PUBLIC, NET)) is None
    assert reason(cert(issued=T0), revoked=revocations) is None  # issued after the revocation: the id re-admitted
    with pytest.raises(A.AdmissionError, match="Z85"):
        A.issue(SECRET, NET, 5, b"short", T0, T0 + DAY)
    with pytest.raises(A.AdmissionError, match="366 days"):
        A.issue(SECRET, NET, 5, KEY, T0, T0 + 400 * DAY)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700))
def test_arbitrary_bytes_are_refused_with_a_reason_never_an_exception(blob):
    assert reason(blob) in A.REASONS
    with pytest.raises(A.AdmissionError):
        A.verify_revocation(blob, PUBLIC, NET)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 135), st.integers(1, 255))
def test_no_changed_byte_of_a_certificate_is_accepted(at, flip):
    blob = bytearray(cert())
    blob[at] ^= flip
    assert reason(bytes(blob)) in A.REASONS


def test_revocations_merge_keep_one_per_peer_and_are_bounded():
    r = A.Revocations(PUBLIC, NET, capacity=3)
    rev = lambda peer, issued, until: A.revoke(SECRET, NET, peer, issued, until)  # noqa: E731
    assert r.add(rev(1, T0, T0 + 10 * DAY), T0)
    assert not r.add(rev(1, T0, T0 + 10 * DAY), T0)  # gossiped again: not news
    assert not r.add(rev(1, T0 - 5, T0 + 10 * DAY), T0)  # older: covered by the newer one
    assert r.add(rev(1, T0 + 5, T0 + 11 * DAY), T0)  # newer: replaces it
    assert len(r) == 1 and r.revokes(1, T0 + 5) and not r.revokes(1, T0 + 6) and not r.revokes(2, 0)
    assert not r.add(rev(2, T0, T0 - 1), T0)  # every certificate it revokes has expired: moot
    assert r.add(rev(2, T0, T0 + 3 * DAY), T0) and r.add(rev(3, T0, T0 + 5 * DAY), T0)
    assert not r.add(rev(4, T0, T0 + 2 * DAY), T0) and r.dropped == 1  # full, and it would be moot first: refused
    assert r.add(rev(5, T0, T0 + 20 * DAY), T0) and r.dropped == 2  # full: replaces the one that expires first (2)
    assert sorted(r.by_peer) == [1, 3, 5]
    assert r.add(rev(6, T0, T0 + 20 * DAY), T0 + 6 * DAY) and r.dropped == 2  # 3 had expired: forgotten, no loss
    assert sorted(r.by_peer) == [1, 5, 6]
    assert [A.verify_revocation(b, PUBLIC, NET).peer for b in r.blobs()] == [1, 5, 6]
    for blob, why in [(A.revoke(hashlib.sha256(b"x").digest(), NET, 7, T0, T0 + DAY), "other-authority"),
                      (A.revoke(SECRET, "elsewhere", 7, T0, T0 + DAY), "other-network"),
                      (cert(), "malformed"), (rev(7, T0, T0 + DAY)[:-1] + b"\x00", "bad-signature")]:
        with pytest.raises(A.AdmissionError) as e:
            r.add(blob, T0)
        assert e.value.reason == why and isinstance(e.value, P2pflError)


def test_the_network_id_is_the_spec_digest_of_name_and_authority():
    """docs/wire.md section 4, the open-network case, including its worked example."""
    authority = bytes(range(32))
    text = '{"authority": "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f", "name": "demo"}'
    spec = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1
    assert A.network_id("demo", authority) == spec
    assert f"net = {spec:#018x}" in (ROOT / "docs" / "wire.md").read_text()
    assert len({spec, A.network_id("demo2", authority), A.network_id("demo", PUBLIC)}) == 3


# ------------------------------------------------------------------ the network file

def test_the_shipped_network_file_parses():
    n = load_network(ROOT / "topologies" / "network.yaml")
    assert n.name == "demo" and len(n.authority) == 32 and n.bootstrap[0].endpoint == "tcp://127.0.0.1:29500"
    assert n.id == A.network_id("demo", n.authority) and n.settings["rounds"] == 40


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(bootstap=d.pop("bootstrap")), "unknown top-level key 'bootstap'; did you mean 'bootstrap'"),
    (lambda d: d.pop("name"), "missing field 'name'"),
    (lambda d: d.update(name=""), r"\.name: a network name has 1 to 64"),
    (lambda d: d.update(authority="abc"), r"\.authority: expected the Ed25519 public key as 64 hex digits"),
    (lambda d: d.update(authority="zz" * 32), r"\.authority: expected"),
    (lambda d: d.update(bootstrap=[]), r"\.bootstrap: list at least one peer"),
    (lambda d: d.update(bootstrap="127.0.0.1:29500"), r"\.bootstrap: expected list"),
    (lambda d: d["bootstrap"][0].update(prot=1), "unknown key 'prot'; did you mean 'port'"),
    (lambda d: d["bootstrap"][0].update(port=70000), r"bootstrap\[0\]\.port: 70000 is not a TCP port"),
    (lambda d: d["bootstrap"][0].pop("public_key"), r"bootstrap\[0\]: missing field 'public_key'"),
    (lambda d: d["bootstrap"][0].update(public_key="short"), r"public_key: expected a 40-character Z85"),
    (lambda d: d["bootstrap"].append(dict(d["bootstrap"][0], port=1)), "two entries have the id 0"),
    (lambda d: d["settings"].update(rouds=3), "unknown setting 'rouds'; did you mean 'rounds'"),
    (lambda d: d["settings"].update(rounds="many"), "settings.rounds: expected an integer, got 'many'"),
    (lambda d: d["settings"].update(rounds=-1), "rounds: expected an integer >= 0"),
    (lambda d: d["settings"]["trainer"].update(lr_rate=1), "unknown trainer key 'lr_rate'"),
])
def test_a_bad_network_file_is_refused_naming_the_key(edit, message):
    import yaml

    doc = yaml.safe_load((ROOT / "topologies" / "network.yaml").read_text())
    edit(doc)
    with pytest.raises(P2pflError, match=message):
        netfile.from_dict(doc, "net.yaml")


def test_network_file_yaml_and_reading_errors_name_the_file(tmp_path):
    with pytest.raises(TopologyError, match=r"net.yaml: invalid YAML at line 2, column"):
        netfile.parse("name: demo\n  bad: [", "net.yaml")
    with pytest.raises(TopologyError, match="cannot read network file"):
        load_network(tmp_path / "missing.yaml")
    (tmp_path / "x.cert").write_text("not base64!\n")
    with pytest.raises(A.AdmissionError, match="line 1 is not a base64 certificate"):
        load_blobs(tmp_path / "x.cert")


# ------------------------------------------------------------------ the authority's command line

def authority(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    code = "import sys\nfrom p2pfl.ops.cli import topology_main\nsys.exit(topology_main(['authority', *sys.argv[1:]]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_authority_commands_end_to_end(tmp_path):
    """Each command once in its own process (about 2 s of imports each); the refusals in this one."""
    ok = authority("init", "--dir", "auth", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    public = bytes.fromhex(ok.stdout.strip())
    assert stat.S_IMODE(os.stat(tmp_path / "auth" / "authority.key").st_mode) == 0o600
    made = authority("admit", "--dir", "auth", "--id", "5", "--network", NET, "--days", "30", "-o", "site5.cert", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    secret_file = tmp_path / "keys" / "peer-5.key_secret"
    assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
    key = zmq.auth.load_certificate(str(secret_file))[0]
    (blob,) = load_blobs(tmp_path / "site5.cert")
    c = A.verify(blob, public, NET, 0, 5, key)
    assert c.expires - c.issued == 30 * DAY
    revoked = authority("revoke", "--dir", "auth", "5", "-o", "revoked.txt", cwd=tmp_path)
    assert revoked.returncode == 0, revoked.stderr
    (rblob,) = load_blobs(tmp_path / "revoked.txt")
    r = A.verify_revocation(rblob, public, NET)
    assert (r.peer, r.until) == (5, c.expires) and r.issued >= c.issued  # forgettable when its certificate expires
    revocations = A.Revocations(public, NET)
    assert revocations.add(rblob, c.issued)
    with pytest.raises(A.AdmissionError, match="revoked"):
        A.verify(blob, public, NET, c.issued, 5, key, revocations)
    misspelt = authority("admit", "--dir", "auth", "--id", "7", "--network", NET, "--dayz", "3", "-o", "x.cert", cwd=tmp_path)
    assert misspelt.returncode == 2 and "unrecognized arguments: --dayz" in misspelt.stderr

    gate = Gatekeeper(public, NET)
    peer, keys = admitted_keys(blob, secret_file, gate, c.issued)  # what a peer starts with: its id from the certificate
    assert (peer, keys.public, keys.cert) == (5, key, blob)
    d, site6 = str(tmp_path / "auth"), tmp_path / "site6.cert"
    assert topology_main(["authority", "admit", "--dir", d, "--id", "6", "--network", NET, "--public-key", KEY.decode(),
                          "-o", str(site6)]) == 0
    assert A.verify(load_blobs(site6)[0], public, NET, c.issued, 6, KEY)
    with pytest.raises(A.AdmissionError, match="wrong-key"):
        admitted_keys(load_blobs(site6)[0], secret_file, gate, c.issued)


@pytest.mark.parametrize("argv, message", [
    (("init", "--dir", "{auth}"), "never overwritten"),
    (("admit", "--dir", "{auth}", "--id", "7", "--netwrk", NET, "-o", "{x}"), "required: --network"),
    (("admit", "--dir", "{auth}", "--id", "7", "--network", NET, "--days", "0", "-o", "{x}"), "--days: expected more than 0"),
    (("admit", "--dir", "{auth}", "--id", "7", "--network", NET, "--days", "400", "-o", "{x}"), "at most 366, got 400"),
    (("admit", "--dir", "{auth}", "--id", "-1", "--network", NET, "-o", "{x}"), "--id: a peer id is a non-negative"),
    (("admit", "--dir", "{auth}", "--id", "7", "--network", NET, "--public-key", "abc", "-o", "{x}"), "--public-key: expected a 40"),
    (("admit", "--dir", "{tmp}/nowhere", "--id", "7", "--network", NET, "-o", "{x}"), "cannot read the authority key"),
    (("revoke", "--dir", "{auth}", "7", "-o", "{x}"), "--network: give the network"),
    (("revok", "--dir", "{auth}", "7"), "invalid choice: 'revok'"),
])
def test_authority_refuses_bad_input_with_exit_2(tmp_path, capsys, argv, message):
    auth = tmp_path / "auth"
    assert topology_main(["authority", "init", "--dir", str(auth)]) == 0
    capsys.readouterr()
    try:
        rc = topology_main(["authority", *(a.format(auth=auth, tmp=tmp_path, x=tmp_path / "x.cert") for a in argv)])
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.cert").exists() and not (auth / "issued.jsonl").exists()  # nothing written


# ------------------------------------------------------------------ the gatekeeper over loopback TCP

def _sites(now: int) -> dict[str, tuple[int, CurveKeys]]:
    """Senders by the refusal they earn: the id each claims, its own CURVE keys and the
    certificate it presents."""
    pairs = {name: zmq.curve_keypair() for name in ["valid", *A.REASONS]}

    def issue(name: str, peer: int, network: str = NET, secret: bytes = SECRET, key: bytes | None = None,
              issued: int = now - 60, expires: int = now + DAY) -> bytes:
        return A.issue(secret, network, peer, key or pairs[name][0], issued, expires)

    forged = bytearray(issue("bad-signature", 7))
    forged[-5] ^= 0x40
    present = {"valid": (1, issue("valid", 1)), "no-certificate": (2, None),
               "expired": (3, issue("expired", 3, issued=now - 2 * DAY, expires=now - DAY)),
               "revoked": (4, issue("revoked", 4)),
               "wrong-id": (5, issue("wrong-id", 9)),  # its own key, another id's certificate
               "wrong-key": (6, issue("wrong-key", 6, key=pairs["valid"][0])),  # its id, another key's certificate
               "bad-signature": (7, bytes(forged)),
               "other-authority": (8, issue("other-authority", 8, secret=hashlib.sha256(b"another authority").digest())),
               "other-network": (10, issue("other-network", 10, network="elsewhere"))}
    return {name: (peer, CurveKeys(*pairs[name], cert=blob)) for name, (peer, blob) in present.items()}


async def _gate_over_tcp() -> dict:
    now = int(time.time())
    sites = _sites(now)
    base = free_base_port(len(sites) + 1)
    server_public, server_secret = zmq.curve_keypair()
    gate = Gatekeeper(PUBLIC, NET)
    assert gate.revoke(A.revoke(SECRET, NET, 4, now, now + DAY), now)
    me = PeerSpec(0, "127.0.0.1", base, {"public_key": server_public.decode()})
    server_keys = CurveKeys(server_public, server_secret, cert=A.issue(SECRET, NET, 0, server_public, now - 60, now + DAY))
    server = Transport(me, {}, max_frame=1 << 16, curve=server_keys, gate=gate)
    await server.start()
    shared = zmq.asyncio.Context()  # the bad senders' ROUTERs take no connections: no ZAP handler needed
    senders = {}
    for k, (name, (peer, keys)) in enumerate(sites.items(), 1):
        t = Transport(PeerSpec(peer, "127.0.0.1", base + k), {0: me}, max_frame=1 << 16, curve=keys,
                      ctx=None if name == "valid" else shared, gate=Gatekeeper(PUBLIC, NET))
        await t.start()
        senders[name] = t
    got: list[tuple[int | None, bytes]] = []

    async def receive() -> None:
        while True:
            _, authed, frames = await server.recv()
            got.append((authed, frames[0].bytes))

    rx = asyncio.create_task(receive())
    for name, t in senders.items():
        for i in range(3):
            t.send(0, [f"{name}-{i}".encode()])
    await until(lambda: len(got) == 3 and sum(gate.refused.values()) == 3 * (len(sites) - 1), "refusals counted", 60)
    out: dict = {"delivered": list(got), "refused": dict(gate.refused)}

    # The valid site's certificate is learned: the server dials back with the key it names.
    server.connect(1, PeerSpec(1, "127.0.0.1", senders["valid"].me.port))
    back = asyncio.create_task(senders["valid"].recv())
    server.send(1, [b"welcome"])
    _, authed_back, frames_back = await asyncio.wait_for(back, 30)
    out["back"] = (authed_back, frames_back[0].bytes, senders["valid"].gate.refused.total())

    # A revocation learned mid-run cuts it off: its next message, then its next handshake.
    assert gate.revoke(A.revoke(SECRET, NET, 1, now, now + DAY), now)
    senders["valid"].send(0, [b"after-revocation"])
    await until(lambda: gate.refused["revoked"] == 4, "the revoked key's message refused")
    senders["valid"].disconnect(0)
    await until(lambda: 0 not in senders["valid"].dealers, "the old link closed")
    senders["valid"].connect(0, me)
    senders["valid"].send(0, [b"new-connection"])
    await until(lambda: gate.handshakes_refused["revoked"] >= 1, "the revoked key's handshake refused")
    await asyncio.sleep(0.3)
    out["after"] = (list(got[3:]), gate.refused["revoked"], gate.handshakes_refused["revoked"])
    rx.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await rx
    for t in [*senders.values(), server]:
        await t.close()
    shared.term()
    return out


def test_the_gatekeeper_refuses_each_bad_certificate_with_its_reason_over_tcp():
    out = asyncio.run(_gate_over_tcp())
    assert out["delivered"] == [(1, b"valid-0"), (1, b"valid-1"), (1, b"valid-2")]  # the admitted id comes with them
    assert out["refused"] == {r: 3 for r in A.REASONS if r != "malformed"}, out["refused"]
    assert out["back"] == (0, b"welcome", 0)  # dialled back with the key the learned certificate names; admitted there
    delivered_after, revoked_messages, revoked_handshakes = out["after"]
    assert delivered_after == [] and revoked_messages == 4 and revoked_handshakes >= 1
