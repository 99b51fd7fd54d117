"""The client's settings: flags over environment over the config file over defaults.

The file is `$XDG_CONFIG_HOME/chat/client.toml` (`~/.config/chat/client.toml` when
XDG_CONFIG_HOME is unset or empty, as the XDG Base Directory spec says), for example

    server = "chat.example:7072" # default: localhost:7072, where `chat-server` listens
    cafile = "ca.crt"            # relative to the file's own directory; ~ is expanded
    certfile = "client.crt"      # a client certificate, for a server that requires one
    keyfile = "client.key"       # its key (else the key is read from certfile)
    username = "alice"
    room = "general"             # the room to start in
    bell = true                  # ring the terminal bell when someone mentions you
    color = "auto"               # true, false, or "auto" (on a terminal, unless NO_COLOR)
    recent = 20                  # messages of the room shown on login (0: none)
    token = "..."                # a registration token, for a server that wants one
    e2e = true                   # end-to-end encryption when the server offers it
    verified_only = false        # share room keys only with devices you verified
    rotate_messages = 100        # a new room key after this many messages...
    rotate_seconds = 604800      # ...or this many seconds (and whenever someone leaves)

The environment variables CHAT_SERVER, CHAT_CAFILE, CHAT_CERTFILE, CHAT_KEYFILE,
CHAT_USERNAME, CHAT_ROOM and CHAT_TOKEN stand in for the flags. With no cafile anywhere and
the server on this machine (localhost, 127.0.0.1, ::1), the development CA that `chat-server` makes,
`$XDG_DATA_HOME/chat/certs/ca.crt`, is used if it exists (`dev_cafile`; the CLI decides).
A password is never read from the file (nor written anywhere): a `password` key is
refused with an error, so that no one keeps one there believing it is used.
`resolve` is pure (flags, environment and file text in, a Settings out), so it is tested
without touching the user's home directory.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FILE_NAME = Path("chat") / "client.toml"
DEFAULT_SERVER = "localhost:7072"  # where `chat-server` (and scripts/serve) listens by default
DEFAULT_ROOM = "general"
DEFAULT_RECENT = 20  # the last messages of the room shown on login
DEV_CA = Path("chat") / "certs" / "ca.crt"  # under $XDG_DATA_HOME, as chat-server makes it
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})  # where the dev CA is trusted
SOURCES = ("flag", "env", "file", "default", "dev CA")
KEYS = ("server", "cafile", "certfile", "keyfile", "username", "room", "bell", "color",
        "recent", "token", "e2e", "verified_only", "rotate_messages", "rotate_seconds")
# Megolm rotation (as Matrix's defaults): what one leaked room key opens is bounded by
# this many messages or seconds; the floor keeps a typo from making a key per message.
DEFAULT_ROTATE_MESSAGES, DEFAULT_ROTATE_SECONDS, MIN_ROTATE_SECONDS = 100, 7 * 24 * 3600, 60
_PATHS = ("cafile", "certfile", "keyfile")
_ENV = {"server": "CHAT_SERVER", "cafile": "CHAT_CAFILE", "certfile": "CHAT_CERTFILE",
        "keyfile": "CHAT_KEYFILE", "username": "CHAT_USERNAME", "room": "CHAT_ROOM",
        "token": "CHAT_TOKEN"}
_DEFAULTS: dict[str, Any] = {
    "server": DEFAULT_SERVER, "cafile": None, "certfile": None, "keyfile": None,
    "username": None, "room": DEFAULT_ROOM, "bell": True, "color": "auto",
    "recent": DEFAULT_RECENT, "token": None, "e2e": True, "verified_only": False,
    "rotate_messages": DEFAULT_ROTATE_MESSAGES, "rotate_seconds": DEFAULT_ROTATE_SECONDS,
}
# Shown by `chat-client config` only as set or not: a registration token lets whoever
# holds it make an account, so it is no more printed than a password would be.
_HIDDEN = frozenset({"token"})
_SECRET_KEYS = {"password", "passwd", "pass", "secret"}


class ConfigError(Exception):
    """The config file cannot be used as written; the message names the file and key."""


def _home(environ: Mapping[str, str]) -> Path:
    home = environ.get("HOME")
    return Path(home) if home else Path.home()


def dev_cafile(environ: Mapping[str, str]) -> Path:
    """Where `chat-server` keeps its development CA (it need not exist)."""
    base = environ.get("XDG_DATA_HOME")
    if base and Path(base).is_absolute():  # the spec: a relative value is to be ignored
        return Path(base) / DEV_CA
    return _home(environ) / ".local" / "share" / DEV_CA


def config_path(environ: Mapping[str, str]) -> Path:
    """Where the config file is looked for (it need not exist)."""
    base = environ.get("XDG_CONFIG_HOME")
    if base and Path(base).is_absolute():  # the spec: a relative value is to be ignored
        return Path(base) / FILE_NAME
    return _home(environ) / ".config" / FILE_NAME


@dataclass(frozen=True)
class Settings:
    """The values in effect and, for each key, where it came from (one of SOURCES)."""

    path: Path
    values: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def describe(self) -> str:
        """What `chat-client config` prints: each key, its value and its source."""
        exists = "" if self.path.is_file() else " (not found)"
        lines = [f"config file: {self.path}{exists}"]
        for key in KEYS:
            value = self.values.get(key)
            shown = "(none)" if value is None else "(set)" if key in _HIDDEN else _show(value)
            source = self.sources.get(key, "default")
            if source == "dev CA":
                source = "default: chat-server's development CA, used for localhost"
            lines.append(f"{key:<15} = {shown:<30} ({source})")
        return "\n".join(lines)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple) and len(value) == 2:  # a parsed server: as the user writes it
        host, port = value
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(value)


def read_file(path: Path) -> dict[str, Any]:
    """The file's table, checked: known keys of the right types; {} if there is no file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return parse_file(text, path)


def parse_file(text: str, path: Path) -> dict[str, Any]:
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    for key in table:
        if key.lower() in _SECRET_KEYS:
            raise ConfigError(
                f"{path}: remove the {key!r} key: passwords are never read from the config "
                "file; use --password-file, CHAT_PASSWORD or the prompt"
            )
        if key not in KEYS:
            raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(KEYS)})")
    for key in ("server", *_PATHS, "username", "room", "token"):
        if key in table and not (isinstance(table[key], str) and table[key].strip()):
            raise ConfigError(f"{path}: {key} must be a non-empty string")
    for key in ("bell", "e2e", "verified_only"):
        if key in table and not isinstance(table[key], bool):
            raise ConfigError(f"{path}: {key} must be true or false")
    for key, floor in (("rotate_messages", 1), ("rotate_seconds", MIN_ROTATE_SECONDS)):
        if key in table and (type(table[key]) is not int or table[key] < floor):
            raise ConfigError(f"{path}: {key} must be a whole number, at least {floor}")
    if "color" in table and table["color"] not in (True, False, "auto"):
        raise ConfigError(f'{path}: color must be true, false or "auto"')
    recent = table.get("recent", 0)
    if type(recent) is not int or recent < 0:
        raise ConfigError(f"{path}: recent must be a number of messages, 0 or more")
    values = dict(table)
    for key in _PATHS:
        if key in values:
            given = Path(values[key]).expanduser()
            values[key] = given if given.is_absolute() else path.parent / given
    return values


def resolve(
    flags: Mapping[str, Any], environ: Mapping[str, str], file_values: Mapping[str, Any],
    path: Path,
) -> Settings:
    """Each key from the first of: a flag given (not None), its env variable, the file."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in KEYS:
        env_name = _ENV.get(key)
        if flags.get(key) is not None:
            values[key], sources[key] = flags[key], "flag"
        elif env_name and environ.get(env_name):
            value: Any = environ[env_name]
            values[key] = Path(value).expanduser() if key in _PATHS else value
            sources[key] = "env"
        elif key in file_values:
            values[key], sources[key] = file_values[key], "file"
        else:
            values[key], sources[key] = _DEFAULTS[key], "default"
    return Settings(path, values, sources)


def load(flags: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    """The settings in effect for these flags (None: not given) and this environment."""
    path = config_path(environ)
    return resolve(flags, environ, read_file(path), path)
