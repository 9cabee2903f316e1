"""The agent's kernel dies with it, and says so; the kernel listens on Unix sockets only.

Real processes throughout: a real SIGKILL of the agent (over ``--local`` and over a real sshd),
then /proc to prove nothing of the kernel is left; the kernel's own file descriptors against
/proc/net/tcp to prove it opened no TCP port.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from colabmagic.connection import connect
from colabmagic.errors import RemoteKernelDied
from colabmagic.relay import QuietRelay, Relay
from colabmagic.remote import agent
from colabmagic.remote.supervisor import alive
from colabmagic.session import Session, registry
from colabmagic.testing import wait_until
from colabmagic.testing_sshd import processes
from colabmagic.transport.local import LocalTransport
from colabmagic.transport.ssh import SSHTransport

RESTART_HINT = "`%colab_connect --restart`"


@pytest.fixture(params=["local", pytest.param("ssh", marks=pytest.mark.ssh)])
def transport_factory(request, colabmagic_root):
    """``(make_transport, host name in messages)`` for each transport."""
    if request.param == "local":
        return (lambda: LocalTransport(root=str(colabmagic_root))), "localhost"
    server = request.getfixturevalue("sshd_server")

    def make():
        return SSHTransport(
            server.name,
            ssh_config=server.ssh_config,
            python=sys.executable,
            root=str(colabmagic_root),
            connect_timeout=10,
        )

    return make, server.name


class OnLine(Relay):
    """Calls *action* once, when the cell's output first contains *needle*."""

    def __init__(self, needle: str, action):
        self.needle, self.action, self.text, self.fired = needle, action, "", False

    def stream(self, name, text):
        self.text += text
        if not self.fired and self.needle in self.text:
            self.fired = True
            self.action()

    def display(self, *a, **k):
        pass

    def clear_output(self, wait):
        pass


def test_agent_sigkill_mid_cell_stops_its_kernel_and_says_so(transport_factory):
    make, host = transport_factory
    s = Session.start(make(), name="sigkill")
    registry.add(s)
    try:
        kpid = s.status()["kernel_pid"]
        apid = s.proxy.agent_info["agent_pid"]
        killed: list[float] = []

        def kill_agent():
            os.kill(apid, signal.SIGKILL)
            killed.append(time.monotonic())

        code = (
            "import subprocess, time\n"
            "child = subprocess.Popen(['sleep', '300'])\n"  # the kernel's own child process
            "print('child', child.pid, flush=True)\n"
            "for i in range(600):\n    time.sleep(0.05)"
        )
        relay = OnLine("child ", kill_agent)
        with pytest.raises(RemoteKernelDied) as err:
            s.run(code, relay=relay)
        child = int(relay.text.split()[1])
        expected = f"the agent on {host} died (SIGKILL); its kernel was stopped; {RESTART_HINT}"
        assert str(err.value).startswith(expected), str(err.value)
        assert "\n" not in str(err.value)
        # The kernel, and everything in its process group, is gone within 2 s of the kill.
        wait_until(
            lambda: not alive(kpid) and not alive(child) and not processes(pgid=kpid),
            timeout=max(0.1, killed[0] + 2.0 - time.monotonic()),
            what="the kernel and its child to die with the agent",
        )
        # The advice works: --restart brings up a new agent and kernel under the same name.
        s2 = connect(restart=True, name="sigkill")
        assert s2 is not s
        assert s2.kernel_id != s.kernel_id
        assert s2.run("6 * 7", relay=QuietRelay()).result.data["text/plain"] == "42"
    finally:
        if "sigkill" in registry.names():
            registry.remove("sigkill").close()
        s.close()


def test_supervisor_and_agent_killed_together_still_take_the_kernel(colabmagic_root):
    """``kill -9`` of the agent's whole process group (supervisor included): the kernel's own
    PR_SET_PDEATHSIG ends it; the cause is then unknown, and the message says so."""
    s = Session.start(LocalTransport(root=str(colabmagic_root)), name="group-kill")
    try:
        kpid = s.status()["kernel_pid"]
        apid = s.proxy.agent_info["agent_pid"]
        assert s.proxy.agent_info["supervisor_pid"] == os.getpgid(apid)
        os.killpg(os.getpgid(apid), signal.SIGKILL)
        t0 = time.monotonic()
        wait_until(lambda: not alive(kpid), timeout=2.0, what="the kernel to die (PDEATHSIG)")
        assert time.monotonic() - t0 < 2.0
        wait_until(lambda: s.proxy.state == "dead", timeout=10, what="the link to notice")
        with pytest.raises(RemoteKernelDied, match=r"died \(cause unknown\); its kernel was stop"):
            s.run("1", relay=QuietRelay())
    finally:
        s.close()


def _tcp_inodes() -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        inodes |= {row.split()[9] for row in rows}
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def test_kernel_channels_are_unix_sockets_and_no_tcp_port_is_open(colabmagic_root):
    s = Session.start(LocalTransport(root=str(colabmagic_root)), name="ipc")
    try:
        directory = os.path.join(str(colabmagic_root), s.kernel_id)
        with open(os.path.join(directory, "kernel.json")) as f:
            info = json.load(f)
        assert info["transport"] == "ipc"
        assert info["ip"].startswith(directory)
        assert oct(os.stat(directory).st_mode & 0o777) == "0o700"
        assert s.status()["kernel_transport"] == "ipc"
        # Output of a forked child still arrives: ipykernel's pipe is a Unix socket too.
        r = s.run(
            "import multiprocessing as mp\n"
            "p = mp.get_context('fork').Process(target=print, args=('from the child',))\n"
            "p.start(); p.join()",
            relay=QuietRelay(),
        )
        assert "from the child" in r.stdout
        kpid = s.status()["kernel_pid"]
        mine = _socket_inodes(kpid)
        assert mine, "the kernel has sockets (its Unix sockets)"
        assert not mine & _tcp_inodes(), "the kernel process has a TCP socket open"
        with open(os.path.join(directory, "kernel.log"), errors="replace") as f:
            assert "without encryption" not in f.read()
    finally:
        s.close()
    leftovers = [n for n in os.listdir(directory) if n.startswith("kernel-")]
    assert not leftovers, f"the kernel's sockets were not removed: {leftovers}"


def test_kernel_endpoint_falls_back_to_a_short_private_dir_then_tcp(tmp_path, monkeypatch):
    transport, ip = agent._kernel_endpoint(str(tmp_path))
    assert (transport, ip) == ("ipc", os.path.join(str(tmp_path), "kernel"))
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    transport, ip = agent._kernel_endpoint(str(deep))
    try:
        assert transport == "ipc"
        assert len(ip.encode()) < 100
        assert oct(os.stat(os.path.dirname(ip)).st_mode & 0o777) == "0o700"
    finally:
        os.rmdir(os.path.dirname(ip))
    # ZeroMQ built without IPC (Windows) is a stand-in here: pyzmq on Linux always has it.
    monkeypatch.setattr(agent.zmq, "has", lambda what: what != "ipc")
    assert agent._kernel_endpoint(str(tmp_path)) == ("tcp", "127.0.0.1")
