"""One typed settings object with secure defaults, from flags, a TOML file and CHAT_* variables.

Precedence, lowest to highest: built-in defaults, the TOML file (`--config FILE` or
`CHAT_CONFIG`), `CHAT_<NAME>` environment variables, command-line flags. Every setting has
all three spellings: `--bcrypt-rounds`, `CHAT_BCRYPT_ROUNDS`, `bcrypt_rounds`.
`python -m chat.config` prints the table that docs/configuration.md holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import math
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from chat.throttle import Limits


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME", "")
    if not Path(base).is_absolute():  # the XDG spec: a relative value is to be ignored
        base = str(Path.home() / ".local" / "share")
    return Path(base) / "chat"


REGISTRATION_POLICIES = ("open", "token", "closed")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SettingError(ValueError):
    """A setting that cannot be used: which one, what is wrong with it, and where it was set.

    `names` are the settings to blame; `located` adds where each was set (a flag, a
    variable, a file), which only load_settings knows. `exit_code` is the server's: 2 for
    a bad setting, 1 for a file it names that cannot be used at start.
    """

    def __init__(self, names: str | Sequence[str], problem: str, *, exit_code: int = 2) -> None:
        super().__init__(problem)
        self.names = (names,) if isinstance(names, str) else tuple(names)
        self.problem = problem
        self.exit_code = exit_code
        self.where = ""

    def located(self, sources: Mapping[str, str]) -> SettingError:
        self.where = "; ".join(
            f"{name} set {sources[name]}" if name in sources else f"{name} at its default"
            for name in self.names
        )
        return self

    def __str__(self) -> str:
        return f"{self.problem} ({self.where})" if self.where else self.problem


def file_problem(exc: OSError) -> str:
    """What an OSError says about a file, in words: 'does not exist', ..."""
    if isinstance(exc, FileNotFoundError):
        return "does not exist"
    if isinstance(exc, PermissionError):
        return "cannot be read: permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a file"
    return f"cannot be read: {exc.strerror or exc}"


def _setting(default: Any, doc: str, *, type_: type | None = None) -> Any:
    meta = {"doc": doc, "type": type_ or type(default)}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    # --- network ---
    host: str = _setting("127.0.0.1", "Address to listen on; loopback unless you say otherwise.")
    port: int = _setting(7072, "TCP port; 0 takes a free port.")
    registration: str = _setting(
        "", "Who may register: 'open' (anyone who reaches the port), 'token' (with a token "
        "from chat-admin token create) or 'closed'. Unset: open on a loopback address; "
        "on any other address the server will not start until you choose."
    )
    # --- TLS ---
    certfile: str = _setting(
        "", "Server certificate (PEM). Empty: DATA_DIR/certs/server.crt, made if missing."
    )
    keyfile: str = _setting("", "Server private key (PEM). Empty: DATA_DIR/certs/server.key.")
    tls_profile: str = _setting(
        "intermediate", "Mozilla TLS profile: 'intermediate' (TLS 1.2+) or 'modern' (1.3 only)."
    )
    client_cafile: str = _setting(
        "", "If set, clients must present a certificate signed by this CA (mutual TLS)."
    )
    # --- storage and secrets ---
    data_dir: str = _setting(
        str(default_data_dir()), "Where the database, pepper and dev certificates live."
    )
    db: str = _setting("", "SQLAlchemy database URL. Empty: sqlite:///DATA_DIR/chat.db.")
    pepper_file: str = _setting(
        "", "File holding the password pepper. Empty: DATA_DIR/pepper, made on first start."
    )
    previous_pepper_files: str = _setting(
        "", "Comma-separated files of retired peppers: their hashes still work and are "
        "upgraded at each user's next login."
    )
    # --- passwords ---
    bcrypt_rounds: int = _setting(
        12, "bcrypt cost factor (4 to 31). OWASP: 10 at least; each +1 doubles the work."
    )
    min_password_length: int = _setting(
        15, "Shortest password accepted (NIST SP 800-63B-4: 15 for a password used alone)."
    )
    auth_workers: int = _setting(
        0, "Threads hashing passwords; 0 = one per CPU, since bcrypt is CPU bound."
    )
    auth_queue: int = _setting(
        64, "Password checks waiting for a worker before new ones get server_busy."
    )
    auth_nice: int = _setting(
        10, "Nice value added to the password-hashing threads (Linux), so that under a "
        "login storm chat traffic gets the CPU first; 0 = same priority as the rest."
    )
    # --- throttling (OWASP Authentication Cheat Sheet, NIST SP 800-63B-4 3.2.2) ---
    login_window: float = _setting(900.0, "Window in which failed logins are counted.")
    login_account_failures: int = _setting(
        5, "Failed logins on one account in the window before delays start."
    )
    login_ip_failures: int = _setting(
        50, "Failed logins from one IP in the window before it must wait (password spraying)."
    )
    login_max_delay: float = _setting(
        900.0, "Longest delay between attempts on a throttled account; doubles up to it."
    )
    login_max_consecutive: int = _setting(
        100, "Consecutive failures on one account before it is locked (NIST SP 800-63B-4)."
    )
    login_lockout: float = _setting(
        86400.0, "While locked, one login attempt per this many seconds; a success unlocks."
    )
    registrations_per_ip: int = _setting(5, "Registrations one IP may make per window.")
    registration_window: float = _setting(3600.0, "Window for counting registrations.")
    # --- protocol limits ---
    max_frame_bytes: int = _setting(16384, "Longest frame a client may send, newline included.")
    max_errors_in_row: int = _setting(
        10, "Protocol errors in a row before the server says bye and closes."
    )
    # --- timeouts (seconds) ---
    handshake_timeout: float = _setting(10.0, "Time to complete the TLS handshake.")
    login_timeout: float = _setting(30.0, "Time from connect to a successful login (absolute).")
    idle_timeout: float = _setting(
        120.0, "Silence before bye idle; the server pings after 3/4 of it."
    )
    shutdown_grace: float = _setting(5.0, "Time given to flush bye frames on shutdown.")
    checkpoint_interval: float = _setting(
        1.0, "How often a thread of its own copies SQLite's WAL into the database."
    )
    timer_slack: float = _setting(
        1.0, "Deadlines may fire this much late (at most 1/8 of idle_timeout), so one wake-up "
        "serves all that fall due together; 0: exact."
    )
    # --- resources ---
    max_connections: int = _setting(20000, "Connections held at once; more are closed at once.")
    max_connections_per_ip: int = _setting(
        16, "Connections from one IP address at once: a few clients per person behind a NAT."
    )
    ipv6_prefix: int = _setting(
        64, "Every per-address limit counts an IPv6 address by its /N network, as one host is "
        "usually given a whole /64 (32 to 128); IPv4 counts each address."
    )
    frames_per_second: float = _setting(
        10.0, "Sustained frames per second per connection (token bucket); past it the "
        "connection's next frame waits for a token (nothing is refused)."
    )
    frame_burst: int = _setting(30, "Frames a connection may send at once before the rate applies.")
    read_bytes_per_second: int = _setting(
        16 * 1024, "Bytes of frames one connection may send per second (bursts of two "
        "maximal frames); past it its next frame waits. Parsing costs up to ~65 us per KiB "
        "(a frame of thousands of numbers), so this bounds what a connection can cost."
    )
    reply_bytes_per_second: int = _setting(
        1024 * 1024, "Reply bytes (history, who) one connection may ask for per second; past "
        "that its next request waits. A 1 MiB history page costs the server ~5 ms of CPU."
    )
    reply_bytes_burst: int = _setting(
        2 * 1024 * 1024, "Reply bytes a connection may ask for at once before the rate "
        "applies; at least max_history_bytes, so that one full page is always possible."
    )
    history_row_cost: int = _setting(
        4096, "What each message in a history reply costs the reply budget beside its bytes: "
        "a row takes ~20 us to read and encode, as much as ~4 KiB of text."
    )
    max_requests_in_flight: int = _setting(
        32, "Requests of one connection waiting for the store's writer before the "
        "connection is read no further (back-pressure); the frame burst fits in it."
    )
    writer_queue_limit: int = _setting(
        10000, "Jobs waiting for the store's writer before every connection that adds one "
        "is held until its own are done: the queue's bound, with one job per connection."
    )
    presence_interval: float = _setting(
        1.0, "Presence changes are sent at most this often, each (room, user) once with its "
        "net change: a user toggling a room costs its members one frame per interval."
    )
    presence_room_limit: int = _setting(
        1000, "In a room with more sessions than this, coming online and going offline are "
        "not announced (joins and leaves still are): each login would be news for every "
        "session there, and a restart would cost n squared frames."
    )
    max_outbound_bytes: int = _setting(
        4 * 1024 * 1024, "Bytes queued for one slow client before bye slow_consumer."
    )
    max_rooms_per_user: int = _setting(
        100, "Rooms one user may be in; each costs every login and presence event."
    )
    max_room_members: int = _setting(
        10000, "Members one room may have; fan-out work grows with it."
    )
    invite_ttl: float = _setting(
        7 * 24 * 3600.0, "Seconds an invitation to a room stays valid (unused)."
    )
    max_listed_rooms: int = _setting(
        1000, "Public rooms one list_rooms reply names at most, the fullest first (the "
        "user's own rooms and invitations always): a reply must stay a sane size."
    )
    max_devices_per_user: int = _setting(
        20, "Devices (client installations with encryption keys) one user may register."
    )
    max_one_time_keys: int = _setting(
        100, "One-time keys one device may keep on the server: each is handed out once, "
        "and a device tops up when told its count."
    )
    max_to_device_queue: int = _setting(
        1000, "To-device messages (room keys, verification) kept for one device until it "
        "acknowledges them; past that, sends to it are skipped and the sender told."
    )
    to_device_page: int = _setting(
        100, "Queued to-device messages given to a device at once; the next page follows "
        "its acknowledgement."
    )
    metrics_address: str = _setting(
        "", "Where /metrics (Prometheus) and /health (for a balancer) listen, as host:port; "
        "a bare :port is loopback only. Empty: off."
    )
    max_to_device_per_sender: int = _setting(
        100, "To-device messages one other user may have waiting in a device's queue, so "
        "that nobody can fill it for everyone (the device's own user may use all of it: "
        "forwarded keys for a new device can be many)."
    )
    to_device_send_ids: int = _setting(
        256, "A device's latest to-device send_ids the server remembers (with their "
        "answers), so that a repeat is answered again, not queued twice."
    )
    proxy_protocol: str = _setting(
        "", "Addresses or networks of TCP balancers (comma-separated) whose connections "
        "start with a PROXY protocol v2 header naming the client (HAProxy's "
        "send-proxy-v2): it is required from them and believed, so that per-address "
        "limits count clients, not the balancer. Empty: off."
    )
    redis: str = _setting(
        "", "Redis URL (redis://host:port/0) shared by several nodes of one cluster: fan-out, "
        "presence and throttles across nodes. Needs a PostgreSQL db. Empty: one node."
    )
    redis_prefix: str = _setting(
        "chat", "Prefix of every Redis key and channel of this cluster: nodes that share it "
        "are one cluster; another prefix on the same Redis is another cluster."
    )
    cluster_node_ttl: float = _setting(
        5.0, "Seconds a node's heartbeat in Redis lasts. A node unseen this long is taken "
        "for dead (its users' presence lapses); a node that cannot reach Redis for three "
        "fifths of it closes its clients' connections and reports unhealthy until Redis "
        "is back."
    )
    cluster_gap_wait: float = _setting(
        0.05, "Seconds a node holds a message whose predecessor in its conversation has "
        "not arrived over Redis yet, before it reads the gap from the database."
    )
    cluster_reconcile_interval: float = _setting(
        2.0, "Seconds between a node's checks of the database for messages Redis never "
        "brought (the last of a conversation, or any while Redis is down)."
    )
    to_device_send_id_ttl: float = _setting(
        24 * 3600.0, "Seconds a device's to-device send_id is remembered, so that a "
        "repeated send is answered again rather than queued twice."
    )
    max_key_watch: int = _setting(
        100, "Users one session follows device changes of through query_keys (the ones "
        "asked about last); rooms carry the notices for the rest."
    )
    max_history_bytes: int = _setting(
        1024 * 1024, "Largest history reply; older messages are left for the next page."
    )
    io_threads: int = _setting(
        2, "Selector threads doing TLS I/O; each holds many connections."
    )
    # --- operations ---
    log_level: str = _setting("INFO", "Logging level: DEBUG, INFO, WARNING or ERROR.")
    config: str = _setting("", "TOML file to read settings from (flat keys as in this table).")

    @property
    def registration_policy(self) -> str:
        """`registration`, or when unset: open on loopback, else a SettingError."""
        if self.registration:
            return self.registration
        if _loopback(self.host):
            return "open"
        raise SettingError("registration", f"the server listens on {self.host}, beyond this "
                           "machine: choose who may register with registration = open "
                           "(anyone who reaches the port), token (with a token from "
                           "chat-admin token create) or closed (--registration, "
                           "CHAT_REGISTRATION)")

    # Derived paths: the settings above leave them empty to mean "inside data_dir".
    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{self.data_path / 'chat.db'}"

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite database file, if the database is one (and a file)."""
        url = self.db_url
        if not url.startswith("sqlite:///") or url.endswith(":memory:"):
            return None
        return Path(url[len("sqlite:///"):]).expanduser()

    @property
    def cert_paths(self) -> tuple[Path, Path, bool]:
        """(certfile, keyfile, whether they are the auto-made development pair)."""
        if self.certfile or self.keyfile:
            return Path(self.certfile), Path(self.keyfile), False
        certs = self.data_path / "certs"
        return certs / "server.crt", certs / "server.key", True

    @property
    def pepper_path(self) -> Path:
        return Path(self.pepper_file) if self.pepper_file else self.data_path / "pepper"

    @property
    def previous_pepper_paths(self) -> list[Path]:
        return [Path(p.strip()) for p in self.previous_pepper_files.split(",") if p.strip()]

    def throttle_limits(self) -> Limits:
        return Limits(
            window=self.login_window, account_failures=self.login_account_failures,
            ip_failures=self.login_ip_failures, max_delay=self.login_max_delay,
            registrations_per_ip=self.registrations_per_ip,
            registration_window=self.registration_window,
            max_consecutive=self.login_max_consecutive, lockout=self.login_lockout,
        )

    def validate(self) -> None:
        """Raise SettingError naming the first setting whose value cannot work."""

        def bad(name: str, problem: str) -> SettingError:
            return SettingError(name, f"{name} {problem}, not {getattr(self, name)!r}")

        if not 4 <= self.bcrypt_rounds <= 31:
            raise bad("bcrypt_rounds", "must be between 4 and 31")
        if self.registration not in ("", *REGISTRATION_POLICIES):
            raise bad("registration", "must be open, token or closed")
        if self.min_password_length < 8:
            raise bad("min_password_length", "may not be below 8 (the protocol's floor)")
        if self.max_frame_bytes < 1024:
            raise bad("max_frame_bytes", "must be at least 1024")
        if bool(self.certfile) != bool(self.keyfile):
            missing = "keyfile" if self.certfile else "certfile"
            raise SettingError(("certfile", "keyfile"),
                               f"certfile and keyfile go together: {missing} is not set")
        if self.tls_profile not in ("intermediate", "modern"):
            raise bad("tls_profile", "must be 'intermediate' or 'modern'")
        for name in ("handshake_timeout", "login_timeout", "idle_timeout", "shutdown_grace",
                     "checkpoint_interval", "presence_interval", "invite_ttl",
                     "to_device_send_id_ttl", "cluster_node_ttl", "cluster_gap_wait",
                     "cluster_reconcile_interval",
                     "login_window", "login_max_delay", "registration_window", "login_lockout"):
            value = getattr(self, name)
            # `not value > 0` also refuses NaN, which would silently disable a deadline.
            if not (value > 0 and math.isfinite(value)):
                raise bad(name, "must be a positive number of seconds")
        if not (self.timer_slack >= 0 and math.isfinite(self.timer_slack)):
            raise bad("timer_slack", "must be zero or a positive number of seconds")
        if not 0 <= self.port <= 65535:
            raise bad("port", "must be between 0 and 65535")
        if self.metrics_address:
            from chat.metrics import parse_address

            try:
                parse_address(self.metrics_address)
            except ValueError as exc:
                raise bad("metrics_address", f"must be {exc}") from None
        if self.proxy_protocol:
            from chat.proxy import trusted_networks

            try:
                trusted_networks(self.proxy_protocol)
            except ValueError as exc:
                raise bad("proxy_protocol", f"must list addresses or networks: {exc}") \
                    from None
        if self.redis and not self.redis.startswith(("redis://", "rediss://", "unix://")):
            raise SettingError("redis", "redis must be a redis://, rediss:// or unix:// "
                               "URL")  # not echoed: a URL may carry a password
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.redis_prefix):
            raise bad("redis_prefix", "must be 1 to 64 of A-Z, a-z, 0-9, '_', '.' or '-'")
        if self.max_history_bytes * 2 > self.max_outbound_bytes:
            raise SettingError(
                ("max_outbound_bytes", "max_history_bytes"),
                f"max_outbound_bytes ({self.max_outbound_bytes}) must hold two maximal "
                f"history replies (max_history_bytes {self.max_history_bytes})")
        if self.reply_bytes_burst < self.max_history_bytes:
            raise SettingError(
                ("reply_bytes_burst", "max_history_bytes"),
                f"reply_bytes_burst ({self.reply_bytes_burst}) must hold one maximal history "
                f"reply (max_history_bytes {self.max_history_bytes})")
        for name in ("login_account_failures", "login_ip_failures", "registrations_per_ip",
                     "login_max_consecutive", "max_rooms_per_user", "max_room_members",
                     "max_errors_in_row", "frame_burst", "max_connections_per_ip",
                     "io_threads", "auth_queue", "max_connections", "reply_bytes_per_second",
                     "writer_queue_limit", "presence_room_limit", "read_bytes_per_second",
                     "max_listed_rooms", "max_devices_per_user", "max_one_time_keys",
                     "max_to_device_queue", "to_device_page", "max_key_watch",
                     "max_to_device_per_sender", "to_device_send_ids"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        if not (self.frames_per_second > 0 and math.isfinite(self.frames_per_second)):
            raise bad("frames_per_second", "must be a positive number")
        if not 32 <= self.ipv6_prefix <= 128:
            # Shorter than /32 would count a whole provider's customers as one address.
            raise bad("ipv6_prefix", "must be from 32 to 128")
        if self.history_row_cost < 0:
            raise bad("history_row_cost", "may not be negative")
        if self.max_requests_in_flight < 2:
            raise bad("max_requests_in_flight", "must be at least 2")
        if not 0 <= self.auth_nice <= 19:
            raise bad("auth_nice", "must be from 0 to 19")

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


SETTING_FIELDS = {f.name: f for f in fields(Settings)}


_KIND_WORDS = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}


def _convert(name: str, raw: Any) -> Any:
    kind = SETTING_FIELDS[name].metadata["type"]
    try:
        if kind is bool and isinstance(raw, bool):
            return raw
        if kind is bool and isinstance(raw, str):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
        elif kind is float and isinstance(raw, int | float | str) and not isinstance(raw, bool):
            return float(raw)
        elif kind is int and isinstance(raw, str | int) and not isinstance(raw, bool):
            return int(raw)
        elif kind is str and isinstance(raw, str):
            return raw
    except ValueError:
        pass  # int() and float() name neither the setting nor its source
    raise SettingError(name, f"{name} must be {_KIND_WORDS[kind]}, not {raw!r}")


def _from_mapping(values: Mapping[str, Any], source: Callable[[str], str]) -> dict[str, Any]:
    """Convert one source's values; `source(name)` says where a name was set."""
    out = {}
    for key, raw in values.items():
        if key not in SETTING_FIELDS or key == "config":
            # Only a file can hold an unknown name: flags are argparse's, and other
            # CHAT_* variables are never read.
            near = difflib.get_close_matches(key.replace("-", "_").lower(), SETTING_FIELDS, 1)
            hint = f"; did you mean {near[0]!r}?" if near and near[0] != "config" else ""
            raise SettingError(key, f"unknown setting {key!r}{hint}").located(
                {key: source(key)})
        try:
            out[key] = _convert(key, raw)
        except SettingError as exc:
            # This source's value is the bad one, even if another source would win.
            raise exc.located({key: source(key)}) from None
    return out


def env_name(name: str) -> str:
    return "CHAT_" + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(prog: str = "chat-server") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="The chat server: TLS, authenticated, protocol v1."
    )
    for f in fields(Settings):
        # default=SUPPRESS keeps flags that were not given out of the namespace, so they
        # do not override the file or the environment.
        parser.add_argument(
            flag_name(f.name), dest=f.name, default=argparse.SUPPRESS,
            metavar=f.name.upper(), help=f"{f.metadata['doc']} (default: {f.default!r})",
        )
    return parser


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise SettingError("config", f"config file {path} {file_problem(exc)}") from None
    except UnicodeDecodeError:
        raise SettingError("config", f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingError("config", f"config file {path} is not valid TOML: {exc}") from None


def load_settings_and_sources(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[Settings, dict[str, str]]:
    """Settings, validated, and where each one not at its default was set.

    A source reads "by the flag --port", "by the environment variable CHAT_PORT" or
    "in /etc/chat/server.toml", to follow "port set". Every error is a SettingError
    that names the setting and its source.
    """
    environ = os.environ if environ is None else environ
    flags = vars(build_parser().parse_args(argv))
    env = {
        name: environ[env_name(name)] for name in SETTING_FIELDS if env_name(name) in environ
    }
    from_env, from_flag = "by the environment variable {}", "by the flag {}"
    sources = {name: from_env.format(env_name(name)) for name in env}
    sources.update({name: from_flag.format(flag_name(name)) for name in flags})
    config_file = flags.get("config") or env.get("config")
    values: dict[str, Any] = {}
    try:
        if config_file:
            raw = _read_toml(config_file)
            values.update(_from_mapping(raw, lambda _: f"in {config_file}"))
            for name in raw:
                sources.setdefault(name, f"in {config_file}")
            values["config"] = config_file
        values.update(_from_mapping({k: v for k, v in env.items() if k != "config"},
                                    lambda name: from_env.format(env_name(name))))
        values.update(_from_mapping({k: v for k, v in flags.items() if k != "config"},
                                    lambda name: from_flag.format(flag_name(name))))
        settings = Settings(**values)
        settings.validate()
    except SettingError as exc:
        raise (exc if exc.where else exc.located(sources)) from None
    return settings, sources


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from defaults < TOML file < CHAT_* environment < flags; validated."""
    return load_settings_and_sources(argv, environ)[0]


def markdown_table() -> str:
    lines = [
        "| flag | environment | TOML key | default | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for f in fields(Settings):
        default = "(see meaning)" if f.name == "data_dir" else repr(f.default)
        lines.append(
            f"| `{flag_name(f.name)}` | `{env_name(f.name)}` | `{f.name}` | `{default}` "
            f"| {f.metadata['doc']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown_table())
