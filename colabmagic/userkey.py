"""Your SSH public key: find it to paste into the Colab notebook, or create one.

``%colab_connect --print-key`` calls :func:`public_key`; when there is no key it offers
:func:`create_key` (ed25519, no passphrase: a notebook cannot answer ssh-keygen's prompt). The
key is written with ``cryptography`` (paramiko's own dependency), so no ``ssh-keygen`` is needed.
"""

from __future__ import annotations

import getpass
import os
import socket

from colabmagic.errors import ParameterError

KEY_FILES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
DEFAULT_KEY = KEY_FILES[0]


class NoKeyError(ParameterError):
    """There is no SSH key pair in ``~/.ssh``; the message says how to create one."""


def find_public_key() -> str | None:
    """Path of the first ``~/.ssh/id_{ed25519,ecdsa,rsa}.pub`` that exists, or None."""
    for base in KEY_FILES:
        path = os.path.expanduser(base + ".pub")
        if os.path.exists(path):
            return path
    return None


def public_key() -> str:
    """The ``type base64 comment`` line of your public key, to paste into ``serve()``.

    Raises
    ------
    NoKeyError
        No key in ``~/.ssh``: create one with :func:`create_key` (``--print-key --create``).
    """
    path = find_public_key()
    if path is None:
        msg = (
            "no SSH key in ~/.ssh (id_ed25519, id_ecdsa, id_rsa); create one with "
            "%colab_connect --print-key --create (or: ssh-keygen -t ed25519)"
        )
        raise NoKeyError(msg)
    with open(path) as f:
        return " ".join(f.read().split()[:3])


def create_key(path: str = DEFAULT_KEY, *, comment: str | None = None) -> str:
    """Write a new ed25519 key pair without passphrase to *path* / *path*.pub; return the .pub line.

    Refuses to overwrite an existing key.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = os.path.expanduser(path)
    if os.path.exists(private) or os.path.exists(private + ".pub"):
        msg = f"{path} already exists; not overwriting it (use it, or pick another path)"
        raise ParameterError(msg)
    os.makedirs(os.path.dirname(private) or ".", mode=0o700, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    line = f"{pub.decode()} {comment or f'{getpass.getuser()}@{socket.gethostname()}'}"
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    fd = os.open(private + ".pub", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(line + "\n")
    return line
