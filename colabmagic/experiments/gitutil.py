"""A thin wrapper around the ``git`` command line (no GitPython), used by the daemon and sync."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from colabmagic.errors import ColabMagicError

IDENTITY = ("colabmagic-daemon", "colabmagic-daemon@localhost")


@dataclass
class GitResult:
    """Exit code and output of one git command."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        """True on exit code 0."""
        return self.returncode == 0

    @property
    def error_line(self) -> str:
        """Git's own error in one line: its first ``fatal:``/``error:`` line, else its last line.

        Git ends many errors with advice (``hint: ...``, ``Please make sure you have the correct
        access rights``); the first ``fatal:`` line is the one that says what went wrong.
        """
        lines = [ln.strip() for ln in (self.stderr or self.stdout).splitlines() if ln.strip()]
        for line in lines:
            if line.startswith(("fatal:", "error:")):
                return line
        return lines[-1] if lines else f"exit code {self.returncode}"


class Git:
    """Run git in one repository.

    Parameters
    ----------
    root : path-like
        The working tree.
    timeout : float
        Seconds before a git command (fetch/push over a dead link) is abandoned.
    """

    def __init__(self, root: str | os.PathLike[str], *, timeout: float = 120.0) -> None:
        self.root = Path(root)
        self.timeout = timeout
        self._identity: list[str] = []
        env = dict(os.environ)
        env.update(GIT_TERMINAL_PROMPT="0", LC_ALL="C", GIT_MERGE_AUTOEDIT="no")
        self._env = env

    def ensure_identity(self) -> None:
        """Commit as ``colabmagic-daemon`` when the repository has no ``user.email``."""
        if not self.run("config", "user.email").stdout.strip():
            self._identity = ["-c", f"user.name={IDENTITY[0]}", "-c", f"user.email={IDENTITY[1]}"]

    def run(self, *args: str, check: bool = False, timeout: float | None = None) -> GitResult:
        """Run ``git ARGS`` in the repository.

        Raises
        ------
        ColabMagicError
            With *check*, when git fails (the message carries git's own).
        """
        cmd = ["git", *self._identity, *args]
        try:
            proc = subprocess.run(
                cmd, cwd=self.root, capture_output=True, text=True, env=self._env,
                timeout=timeout or self.timeout, check=False, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            result = GitResult(124, "", f"git {args[0]} timed out after {timeout or self.timeout}s")
        else:
            result = GitResult(proc.returncode, proc.stdout, proc.stderr)
        if check and not result.ok:
            msg = f"git {' '.join(args)} failed in {self.root}: {result.error_line}"
            raise ColabMagicError(msg)
        return result

    def out(self, *args: str) -> str:
        """Stripped stdout of a command that must succeed."""
        return self.run(*args, check=True).stdout.strip()

    def fetch_branch(self, remote: str, branch: str) -> GitResult:
        """Fetch only *branch* of *remote* into ``refs/remotes/<remote>/<branch>``."""
        return self.run(
            "fetch", "-q", remote, f"+refs/heads/{branch}:refs/remotes/{remote}/{branch}"
        )

    def rev(self, ref: str) -> str | None:
        """The commit *ref* names, or ``None``."""
        res = self.run("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
        return res.stdout.strip() if res.ok else None

    def is_ancestor(self, a: str, b: str) -> bool:
        """True when commit *a* is an ancestor of (or equal to) *b*."""
        return self.run("merge-base", "--is-ancestor", a, b).ok

    def changed_files(self, a: str, b: str) -> set[str]:
        """Paths that differ between commits *a* and *b*."""
        out = self.run("diff", "--name-only", "-z", a, b, check=True).stdout
        return {p for p in out.split("\0") if p}

    def dirty_files(self) -> set[str]:
        """Tracked paths with uncommitted changes (staged or not)."""
        out = self.run("diff", "--name-only", "-z", "HEAD", check=True).stdout
        return {p for p in out.split("\0") if p}

    def show(self, ref: str, path: str) -> str | None:
        """Contents of *path* at *ref*, or ``None`` if absent."""
        res = self.run("show", f"{ref}:{path}")
        return res.stdout if res.ok else None


def is_git_repo(root: Path) -> bool:
    """True when *root* is the top of a git working tree."""
    return (root / ".git").exists()
