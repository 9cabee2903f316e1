"""The debugging exercise (examples/debug_gpu_example.py) solved the way docs/debugging.md says:
upload it, run it in the remote kernel, find the bugs with post-mortem pdb and the memory lines."""

from __future__ import annotations

import builtins
import os
import re
import subprocess
import sys

import pytest

from colabmagic import debug
from colabmagic.errors import RemoteError
from colabmagic.relay import Relay
from colabmagic.session import Session
from colabmagic.transport.local import LocalTransport

EXAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "debug_gpu_example.py"
)


class Capture(Relay):
    def __init__(self):
        self.text = ""

    def stream(self, name, text):
        self.text += text


@pytest.fixture(scope="module")
def session(colabmagic_root, tmp_path_factory):
    remote = tmp_path_factory.mktemp("remote-example")
    s = Session.start(LocalTransport(root=str(colabmagic_root)), name="ex", cwd=str(remote))
    s.upload(EXAMPLE, "debug_gpu_example.py")
    yield s
    s.close()


def test_example_runs_standalone_on_cpu():
    out = subprocess.run(
        [sys.executable, EXAMPLE, "--device", "cpu", "--steps", "6"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "final loss" in out.stdout
    assert "retained autograd graphs=0" in out.stdout


def test_shape_bug_found_with_post_mortem(session, monkeypatch):
    with pytest.raises(RemoteError, match="shapes cannot be multiplied"):
        session.run(
            "import debug_gpu_example as ex\nex.train(device='cpu', bug='shape')", relay=Capture()
        )
    out = Capture()
    state = {"ups": 0, "asked": False}

    def reply(prompt=""):
        # Walk up from torch's Linear.forward until pdb shows a frame of the example's file.
        plain = re.sub(r"\x1b\[[0-9;]*m", "", out.text)
        frames = [line for line in plain.splitlines() if line.startswith("> ")]
        last_frame = frames[-1] if frames else ""
        if "debug_gpu_example.py" not in last_frame and state["ups"] < 10:
            state["ups"] += 1
            return "up"
        if not state["asked"]:
            state["asked"] = True
            return "p ('hidden', tuple(h.shape), 'fc2 expects', self.fc2.in_features)"
        return "q"

    monkeypatch.setattr(builtins, "input", reply)
    debug.post_mortem(session, relay=out)
    assert "('hidden', (256, 32), 'fc2 expects', 64)" in out.text


def test_leak_is_visible_in_the_memory_lines(session):
    r = session.run("ex.train(device='cpu', bug='leak', steps=6)", relay=Capture())
    assert "retained autograd graphs=6" in r.stdout
    r = session.run("ex.train(device='cpu', bug='none', steps=6)", relay=Capture())
    assert "retained autograd graphs=0" in r.stdout
