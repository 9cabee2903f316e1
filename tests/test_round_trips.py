"""Connect and re-attach cost few round trips beyond SSH's own, through an emulated WAN link.

A :class:`~colabmagic.testing_wan.WanRelay` with a 100 ms one-way delay sits in front of the real
test sshd. It counts request/response *turns* (an upward run of bytes followed by a downward
one). The turns of a bare paramiko handshake and authentication through the same relay are SSH's
own; the rest are ours. The delay is large so that the counting does not depend on the machine's
load: with a short one, a burst of kernel messages slower than the one-way delay is split by an
acknowledgement into two "turns" that nobody waits for. Even at 100 ms a heavily loaded machine
did that once (5 turns against 4 for a re-attach): the re-attach is counted twice and the fewer
turns kept: load can add turns, never remove one.
"""

from __future__ import annotations

import sys

import pytest

from colabmagic.relay import QuietRelay
from colabmagic.session import Session
from colabmagic.testing_wan import WanRelay, ssh_handshake_round_trips
from colabmagic.transport.ssh import SSHTransport

pytestmark = pytest.mark.ssh

CONNECT_LIMIT = 8  # beyond SSH's handshake and authentication, plus the kernel's start time
ATTACH_LIMIT = 4


def _quiet(relay: WanRelay) -> None:
    relay.wait_quiet()
    relay.reset_counters()


@pytest.fixture(scope="module")
def wan(sshd_server):
    with WanRelay(("127.0.0.1", sshd_server.port), delay=0.1) as relay:
        relay.ssh_config = sshd_server.config_via(relay.port, "wan")
        yield relay


def test_connect_and_reattach_round_trips(wan, sshd_server, colabmagic_root):
    own = ssh_handshake_round_trips(wan, user=sshd_server.user, key_file=sshd_server.client_key)
    assert 2 <= own <= 6, f"an SSH handshake + auth took {own} turns: is the relay counting?"

    def transport() -> SSHTransport:
        return SSHTransport(
            "wan",
            ssh_config=wan.ssh_config,
            python=sys.executable,
            root=str(colabmagic_root),
            connect_timeout=30,
        )

    _quiet(wan)
    s = Session.start(transport(), name="turns")
    connect = wan.round_trips() - own
    try:
        s.run("kept = 7", relay=QuietRelay())
        kid = s.kernel_id
        attaches = []
        for _ in range(2):  # load can only add turns (module docstring): the fewer one counts
            s.close(keep=True)
            _quiet(wan)
            s = Session.start(transport(), name="turns", attach=kid)
            attaches.append(wan.round_trips() - own)
            assert s.pull("kept") == 7
    finally:
        s.close()
    assert connect <= CONNECT_LIMIT, f"connect took {connect} round trips beyond SSH's {own}"
    attach = min(attaches)
    assert attach <= ATTACH_LIMIT, f"re-attach took {attaches} round trips beyond SSH's {own}"
