"""A stand-in for the OS keychain, for tests: a keyring backend kept in one JSON file.

The OS keychains keyring normally uses (Secret Service, macOS Keychain, Windows Credential Locker)
need a desktop session that a test machine does not have. This backend stores passwords in the
file named by ``$COLABMAGIC_TEST_KEYRING`` (mode 0600), so a test and the processes it starts share
one keyring. Select it in-process with ``keyring.set_keyring(StandInKeyring())``, or in a child
process with ``PYTHON_KEYRING_BACKEND=colabmagic.testing_keyring.StandInKeyring``.
"""

from __future__ import annotations

import json
import os

from keyring.backend import KeyringBackend
from keyring.compat import properties
from keyring.errors import PasswordDeleteError

ENV = "COLABMAGIC_TEST_KEYRING"


class StandInKeyring(KeyringBackend):
    """Passwords by (service, user) in the JSON file ``$COLABMAGIC_TEST_KEYRING``."""

    @properties.classproperty
    def priority(cls) -> float:
        return 1  # only ever chosen by name: never the automatic pick

    def _path(self) -> str:
        path = os.environ.get(ENV)
        if not path:
            msg = f"set {ENV} to the stand-in keyring's file"
            raise RuntimeError(msg)
        return path

    def _load(self) -> dict:
        try:
            with open(self._path()) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def _save(self, data: dict) -> None:
        path = self._path()
        tmp = f"{path}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)

    def get_password(self, service: str, username: str) -> str | None:
        return self._load().get(service, {}).get(username)

    def set_password(self, service: str, username: str, password: str) -> None:
        data = self._load()
        data.setdefault(service, {})[username] = password
        self._save(data)

    def delete_password(self, service: str, username: str) -> None:
        data = self._load()
        if username not in data.get(service, {}):
            raise PasswordDeleteError(username)
        del data[service][username]
        self._save(data)
