"""Where a Jupyter-server token comes from when no environment variable holds it.

Against a real ``jupyter server`` on 127.0.0.1, with the real ``colabmagic`` CLI in child
processes: keyring (the stand-in for the OS keychain, ``colabmagic.testing_keyring``, filled with
keyring's own ``keyring set`` command as the docs say), a getpass prompt answered on a
pseudo-terminal (the token must not be echoed), and the one-line error when neither exists and
stdin is not a terminal. Everything the children and this process printed or logged is scanned for
the token.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import colabmagic
from colabmagic.errors import ConnectError
from colabmagic.testing import require
from colabmagic.testing_jupyter import jupyter_server

try:
    import pexpect
except ImportError:  # IPython depends on it on POSIX; without it the terminal tests skip
    pexpect = None

pytestmark = pytest.mark.timeout(300)

BIN = Path(sys.executable).parent
STAND_IN = "colabmagic.testing_keyring.StandInKeyring"
NO_KEYRING = "keyring.backends.null.Keyring"  # a keyring with no entries at all


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    try:
        import jupyter_server as _  # noqa: F401
        import keyring as _k  # noqa: F401
    except ImportError as exc:
        require(False, f"{exc.name} is not installed (pip install colabmagic[test])")
    with jupyter_server(tmp_path_factory.mktemp("jserver-tokens")) as srv:
        status, model = srv.request("POST", "api/kernels", {})
        assert status == 201
        srv.kernel_id = model["id"]  # what `colabmagic kernels URL` must list
        yield srv


def _env(backend: str, keyring_file: Path | None = None) -> dict[str, str]:
    """The children's environment: no token variable, the chosen keyring backend."""
    env = {k: v for k, v in os.environ.items() if k != "JUPYTER_TOKEN"}
    env["PYTHON_KEYRING_BACKEND"] = backend
    if keyring_file is not None:
        env["COLABMAGIC_TEST_KEYRING"] = str(keyring_file)
    return env


def _spawn(args: list[str], env: dict[str, str]):
    require(pexpect is not None, "pexpect is not installed (it comes with IPython on POSIX)")
    return pexpect.spawn(
        args[0], args[1:], env=env, encoding="utf-8", timeout=120, dimensions=(24, 300)
    )


def test_token_from_keyring_as_the_docs_store_it(server, tmp_path, monkeypatch, caplog, capfd):
    import keyring

    from colabmagic.testing_keyring import StandInKeyring

    caplog.set_level(logging.DEBUG)
    store = tmp_path / "keyring.json"
    env = _env(STAND_IN, store)
    # The docs' command, answered at keyring's own password prompt on a terminal.
    child = _spawn([str(BIN / "keyring"), "set", "colabmagic", server.url], env)
    child.expect_exact(f"Password for '{server.url}' in 'colabmagic': ")
    child.sendline(server.token)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    seen = [child.before or ""]
    assert json.loads(store.read_text()) == {"colabmagic": {server.url: server.token}}
    # The CLI in a child process, no variable and no terminal: the token comes from the keyring.
    cli = subprocess.run(
        [str(BIN / "colabmagic"), "kernels", server.url, "--json"],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert server.kernel_id in [k["id"] for k in json.loads(cli.stdout)]
    seen += [cli.stdout, cli.stderr]
    # In this process: a session, stored without the final slash this time.
    monkeypatch.delenv("JUPYTER_TOKEN", raising=False)
    monkeypatch.setenv("COLABMAGIC_TEST_KEYRING", str(store))
    before = keyring.get_keyring()
    keyring.set_keyring(StandInKeyring())
    try:
        keyring.delete_password("colabmagic", server.url)
        keyring.set_password("colabmagic", server.url.rstrip("/"), server.token)
        s = colabmagic.connect(server.url, register=False, connect_timeout=120, prompt=False)
        try:
            assert s.run("print(6 * 7)").stdout == "42\n"
            seen += [repr(s), repr(s.transport), str(s.status())]
        finally:
            s.close()
    finally:
        keyring.set_keyring(before)
    out, err = capfd.readouterr()
    seen += [out, err, caplog.text]
    assert [text for text in seen if server.token in text] == []


def test_token_from_a_getpass_prompt_on_a_terminal_is_not_echoed(server, tmp_path):
    env = _env(NO_KEYRING)
    child = _spawn([str(BIN / "colabmagic"), "kernels", server.url], env)
    child.expect_exact(f"Token for {server.url}: ")
    child.sendline(server.token)
    child.expect(server.kernel_id)
    child.expect(pexpect.EOF)
    transcript = child.before or ""
    child.close()
    assert child.exitstatus == 0, transcript
    assert server.token not in transcript  # getpass turned the terminal's echo off
    # A wrong answer at the prompt is one line, and does not echo what was typed either.
    child = _spawn([str(BIN / "colabmagic"), "kernels", server.url], env)
    child.expect_exact(f"Token for {server.url}: ")
    child.sendline("wrong-" + server.token[:6])
    child.expect(pexpect.EOF)
    transcript = child.before or ""
    child.close()
    assert child.exitstatus != 0
    lines = [line for line in transcript.splitlines() if line.strip()]
    assert len(lines) == 1, transcript
    assert "refused the token (HTTP 403)" in lines[0]
    assert "wrong-" not in transcript


def test_no_token_and_no_terminal_is_one_line_naming_every_source(server, monkeypatch):
    env = _env(NO_KEYRING)
    cli = subprocess.run(
        [str(BIN / "colabmagic"), "kernels", server.url],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode != 0
    assert cli.stdout == ""
    lines = cli.stderr.strip().splitlines()
    assert len(lines) == 1, cli.stderr
    for name in ("--token-env", "JUPYTER_TOKEN", "keyring set colabmagic", "no terminal"):
        assert name in lines[0], lines[0]
    # --token-env names the variable in the message; the library says the same.
    cli = subprocess.run(
        [str(BIN / "colabmagic"), "kernels", server.url, "--token-env", "LAB_TOKEN"],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "set LAB_TOKEN" in cli.stderr
    monkeypatch.delenv("JUPYTER_TOKEN", raising=False)
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", NO_KEYRING)
    import keyring
    import keyring.backends.null

    before = keyring.get_keyring()
    keyring.set_keyring(keyring.backends.null.Keyring())
    try:
        with pytest.raises(ConnectError, match="no token for") as info:
            colabmagic.connect(server.url, register=False, prompt=False)
    finally:
        keyring.set_keyring(before)
    assert "\n" not in str(info.value)


def test_a_redirect_to_another_origin_never_carries_the_token(tmp_path, monkeypatch):
    """A server that redirects elsewhere (a stand-in, two loopback ports): nothing reaches B."""
    import http.server
    import threading

    seen: list[str] = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization") or "")
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"[]")

        do_POST = do_GET

        def log_message(self, *args):
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)

    class Redirect(Elsewhere):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{other.server_port}{self.path}")
            self.end_headers()

        do_POST = do_GET

    first = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (first, other)]
    for t in threads:
        t.start()
    try:
        monkeypatch.setenv("JUPYTER_TOKEN", "secret-token-value")
        with pytest.raises(ConnectError, match="sends the token only to the server's own origin"):
            colabmagic.connect(f"http://127.0.0.1:{first.server_port}/", register=False)
        assert seen == []
    finally:
        for s in (first, other):
            s.shutdown()
            s.server_close()


def test_a_plain_server_under_a_user_path_is_not_taken_for_a_hub(tmp_path, monkeypatch):
    """``/user/x/`` alone does not make a hub: a refused token there gets the plain message."""
    with jupyter_server(tmp_path / "srv", base_url="/user/x/") as srv:
        url = srv.url
        assert url.endswith("/user/x/")
        monkeypatch.setenv("JUPYTER_TOKEN", "not-the-token")
        with pytest.raises(ConnectError) as info:
            colabmagic.connect(url, register=False)
        assert str(info.value).endswith("the server refused the token (HTTP 403); check the token")
        monkeypatch.setenv("JUPYTER_TOKEN", srv.token)
        s = colabmagic.connect(url, register=False, connect_timeout=120)
        try:
            assert s.run("print('under /user/x/')").stdout == "under /user/x/\n"
        finally:
            s.close()
