"""The server's own files: its certificate, its key and the client CA.

Every check here fails with a SettingError that names the setting to blame, the file,
and what is wrong with it in words ("is not a PEM certificate", "does not match the
certificate"), never with OpenSSL's "[SSL] PEM lib (_ssl.c:3905)" or a bare
"[Errno 2]"; `main` then adds where the setting was given. A file that cannot be used
fails the start (exit 1, as a port that is taken).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from chat.config import SettingError, file_problem

log = logging.getLogger(__name__)

def _read(path: Path, names: str | Sequence[str], what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SettingError(names, f"{what} {path} {file_problem(exc)}", exit_code=1) from None


def _certificates(data: bytes, path: Path, names: str | Sequence[str],
                  what: str) -> list[x509.Certificate]:
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError:
        found = []
    if not found:
        raise SettingError(names, f"{what} {path} is not a PEM certificate: it has no "
                           "readable 'BEGIN CERTIFICATE' block", exit_code=1)
    return found


def check_server_pair(certfile: Path, keyfile: Path, cert_names: str | Sequence[str],
                      key_names: str | Sequence[str]) -> None:
    """Check the certificate and key say what they should, before OpenSSL is asked to."""
    leaf = _certificates(_read(certfile, cert_names, "certfile"), certfile, cert_names,
                         "certfile")[0]
    data = _read(keyfile, key_names, "keyfile")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # OpenSSL would ask for a passphrase on the terminal, and a server has none.
        raise SettingError(key_names, f"keyfile {keyfile} holds an encrypted private key; "
                           "the server needs it unencrypted (and mode 0600)",
                           exit_code=1) from None
    except UnsupportedAlgorithm:
        raise SettingError(key_names, f"keyfile {keyfile} holds a private key of a type "
                           "this server cannot use", exit_code=1) from None
    except ValueError:
        raise SettingError(key_names, f"keyfile {keyfile} holds no PEM private key: it has "
                           "no readable 'BEGIN ... PRIVATE KEY' block", exit_code=1) from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise SettingError((*_as_tuple(cert_names), *_as_tuple(key_names)),
                           f"keyfile {keyfile} does not match certfile {certfile}: the "
                           "certificate was made for another key", exit_code=1)


def check_ca_file(path: Path, names: str | Sequence[str]) -> None:
    _certificates(_read(path, names, "client_cafile"), path, names, "client_cafile")


def _as_tuple(names: str | Sequence[str]) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)
