"""The server's own files: its private directories, its secrets' modes, its certificate.

Every check here fails with a SettingError that names the setting to blame, the file,
and what is wrong with it in words ("is not a PEM certificate", "does not match the
certificate"), never with OpenSSL's "[SSL] PEM lib (_ssl.c:3905)" or a bare
"[Errno 2]"; `main` then adds where the setting was given. A file that cannot be used
fails the start (exit 1, as a port that is taken); a secret that others may read is a
bad setting (exit 2), and the message says the `chmod` that fixes it.

Directories we make are 0700. Directories that already exist are the operator's: their
mode is left alone, with a warning when others may list or write them.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from chat.config import SettingError, file_problem

log = logging.getLogger(__name__)

PRIVATE_DIR_MODE = 0o700
_CHECK_MODES = os.name == "posix"  # elsewhere st_mode says nothing about who may read


def private_dir(path: Path, names: str | Sequence[str]) -> None:
    """Make `path` with mode 0700 if it is missing; warn if an existing one is open to others."""
    try:
        # Missing parents (~/.local/share, say) get the usual mode: only this one holds
        # our files. The umask can only narrow 0700.
        path.mkdir(mode=PRIVATE_DIR_MODE, parents=True)
        return
    except FileExistsError:
        pass
    except OSError as exc:
        raise SettingError(names, f"directory {path} cannot be made: {exc.strerror or exc}",
                           exit_code=1) from None
    if not path.is_dir():
        raise SettingError(names, f"{path} is not a directory", exit_code=1)
    mode = path.stat().st_mode
    if _CHECK_MODES and mode & (stat.S_IROTH | stat.S_IWOTH):
        log.warning("directory %s is %s by others (mode %04o): chmod 700 %s keeps the "
                    "database and its secrets to this user", path,
                    _who_may(mode & 0o006), stat.S_IMODE(mode), path)


def _who_may(bits: int) -> str:
    """'readable', 'writable' or both: the read and write bits of one class in a mode."""
    bits = bits | bits >> 3 | bits >> 6  # the group's or the owner's, as if they were others'
    read, write = bits & 0o4, bits & 0o2
    return "readable and writable" if read and write else "readable" if read else "writable"


def check_secret_mode(path: Path, names: str | Sequence[str], what: str) -> None:
    """Refuse a secret file that others may read or write; warn if its group may.

    A missing file passes: whoever reads it next says so (or makes it, mode 0600).
    """
    if not _CHECK_MODES:
        return
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SettingError(names, f"{what} {path} {file_problem(exc)}", exit_code=1) from None
    if mode & 0o006:  # read or write: execute alone gives nothing away
        raise SettingError(
            names, f"{what} {path} is {_who_may(mode & 0o006)} by others "
            f"(mode {stat.S_IMODE(mode):04o}); run chmod 600 {path}")
    if mode & 0o060:
        log.warning("%s %s is %s by its group (mode %04o): chmod 600 %s unless the group "
                    "is meant to have it", what, path, _who_may(mode & 0o060),
                    stat.S_IMODE(mode), path)


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


class DataLock:
    """The data directory's lock (and, for a SQLite file elsewhere, the database's), held
    by a running server for its life and by `chat-admin` while it works on the database
    with the server stopped: so neither writes under the other, and a second server on
    the same data is refused before it touches anything."""

    def __init__(self, data_dir: Path, sqlite_file: Path | None) -> None:
        self.paths = [data_dir / "server.lock"]
        if sqlite_file is not None and sqlite_file.parent.resolve() != data_dir.resolve():
            self.paths.append(sqlite_file.with_name(sqlite_file.name + ".lock"))
        self._fds: list[int] = []

    def acquire(self) -> None:
        """Take every lock or none; SettingError naming who holds it otherwise."""
        import fcntl

        try:
            for i, path in enumerate(self.paths):
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                except OSError:
                    if i == 0:
                        raise
                    # The database's directory cannot be used: opening the database will
                    # say so, naming the setting (`db`), better than a lock file could.
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise SettingError("data_dir", f"another server (or chat-admin) is using "
                                       f"this data: {path} is locked", exit_code=1) from None
                self._fds.append(fd)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
