"""``exp sync`` between two user clones: it refuses what could conflict and never leaves markers."""

from __future__ import annotations

import json

import pytest

from colabmagic import experiments as ex
from colabmagic.errors import ColabMagicError

from .conftest import BRANCH, Repos, git, write_spec


def test_sync_refuses_a_possible_conflict_and_keeps_edits(repos: Repos, tmp_path):
    other = tmp_path / "other"
    git(tmp_path, "clone", "-q", "-b", BRANCH, str(repos.remote), str(other))
    Repos._identity(other, "Other")
    write_spec(other / "experiments.json", [{"name": "theirs", "command": "true"}])
    git(other, "commit", "-qam", "other edit")
    git(other, "push", "-q")
    ex.add(repos.user, "mine", "true")  # uncommitted local edit of the same file
    before = (repos.user / "experiments.json").read_text()
    with pytest.raises(ColabMagicError, match="changed both here and on origin"):
        ex.sync(repos.user, push=True)
    assert (repos.user / "experiments.json").read_text() == before
    assert "<<<<<<<" not in before


def test_sync_without_remote_changes_reports_nothing(repos: Repos):
    ex.add(repos.user, "a", "true")
    report = ex.sync(repos.user, push=True)
    assert report.pushed
    committed = json.loads(repos.remote_file("experiments.json"))
    assert [e["name"] for e in committed] == ["a"]
    again = ex.sync(repos.user)
    assert again.pulled == 0
    assert again.changes == []


def test_sync_with_an_unreachable_remote_says_so_in_one_line(repos: Repos):
    git(repos.user, "remote", "set-url", "origin", str(repos.remote.parent / "gone.git"))
    with pytest.raises(ColabMagicError) as info:
        ex.sync(repos.user)
    message = str(info.value)
    assert message.startswith("could not fetch origin/gpu-experiments: fatal: ")
    assert "gone.git" in message
    assert "rerun `exp sync`" in message
    assert "\n" not in message
    assert "['" not in message
