"""Agent details that are easier to check directly than through a whole session."""

from __future__ import annotations

import os

from colabmagic.remote import agent


def test_kernel_pythonpath_keeps_user_entries_and_drops_the_shipped_code():
    own = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(agent.__file__))))
    env = {"PYTHONPATH": os.pathsep.join([own, "/home/me/src", own + "/", "/opt/lib"])}
    agent._drop_own_path(env)
    assert env["PYTHONPATH"].split(os.pathsep) == ["/home/me/src", "/opt/lib"]
    only_ours = {"PYTHONPATH": own}
    agent._drop_own_path(only_ours)
    assert "PYTHONPATH" not in only_ours
