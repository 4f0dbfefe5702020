"""The peer's allocator settings: a received 1 MiB message reuses freed pages instead of faulting
fresh ones in (glibc's defaults give 20-60 minor faults a message, `p2pfl.alloc`)."""

from __future__ import annotations

import subprocess
import sys

# A receiver process over real loopback TCP; the sender is a second process. Prints the receiver's
# minor page faults per message; with "keep" it fails unless the C library took the settings.
PROBE = """
import resource, subprocess, sys, zmq
from p2pfl.alloc import keep_message_memory
if sys.argv[1] == "keep":
    assert keep_message_memory()
N = 400
pull = zmq.Context().socket(zmq.PULL)
pull.rcvtimeo = 30000
port = pull.bind_to_random_port("tcp://127.0.0.1")
code = f'''
import time, zmq
s = zmq.Context().socket(zmq.PUSH)
s.connect("tcp://127.0.0.1:{port}")
p = bytes(1 << 20)
for _ in range({N + 20}):
    s.send(p)
time.sleep(60)
'''
sender = subprocess.Popen([sys.executable, "-c", code])
try:
    for _ in range(20):
        pull.recv(copy=False)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(N):
        m = pull.recv(copy=False)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / N)
finally:
    sender.kill()
"""


def _faults_per_message(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return float(out.stdout)


def test_kept_memory_faults_fewer_pages_per_received_message():
    kept, default = _faults_per_message("keep"), _faults_per_message("default")
    assert kept * 2 < default, (kept, default)
    assert kept < 16, kept  # a 1 MiB message spans 256 pages
