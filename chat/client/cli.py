"""`chat-client`: arguments, the password, and the mapping of failures to exit codes.

Every ClientError becomes an exit code (listed in EXIT_CODES, which --help shows) and a
clear line on stderr in `_report`, and nowhere else. There is no option to skip certificate
verification, by design: without --cafile the system trust store is used.
"""

from __future__ import annotations

import argparse
import getpass
import os
import ssl
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

from chat import __version__
from chat.client.commands import normalize_room
from chat.client.config import DEFAULT_RECENT, DEFAULT_ROOM, KEYS, ConfigError, Settings
from chat.client.config import load as load_settings
from chat.client.connection import DEFAULT_TIMEOUT, ChatClient
from chat.client.errors import CertificateNotTrusted, ClientError, ServerError
from chat.client.format import sanitize, seconds, should_color
from chat.client.transport import certificate_names
from chat.tls import client_context

PROG = "chat-client"
DEFAULT_PORT = 7072  # the protocol's default port

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_CONNECTION, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = f"""\
exit codes:
  {EXIT_OK:<4} done: /quit, Ctrl-D or the end of stdin
  {EXIT_REFUSED:<4} refused by the server (registration, login, or joining --room)
  {EXIT_USAGE:<4} usage error
  {EXIT_CONNECTION:<4} connection or TLS failure, or the server ended the session
       (bye idle, shutdown, ...; or the connection was lost without one)
       and reconnecting was off (see --reconnect) or gave up
  {EXIT_INTERRUPTED:<4} interrupted by Ctrl-C"""
MAX_NAMES_SHOWN = 5  # of a certificate's names in a hint; a long list would bury the advice


class UsageError(Exception):
    """The command line cannot be carried out as given (exit code 2)."""


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"bad port {text!r}: want a number from 1 to 65535")
    return int(text)


def parse_server(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPV6]:PORT, [IPV6], a bare HOST or a bare IPv6 address -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or not host or (rest and not rest.startswith(":")):
            raise argparse.ArgumentTypeError(f"bad server address {text!r}")
        return host, _port(rest[1:]) if rest else DEFAULT_PORT
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        if not host:
            raise argparse.ArgumentTypeError(f"bad server address {text!r}: no host")
        return host, _port(port)
    if not text:
        raise argparse.ArgumentTypeError("empty server address")
    return text, DEFAULT_PORT  # a host name, or an IPv6 address without a port


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"want a positive number of seconds, not {text!r}")
    return value


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"want a number of messages (0 or more), not {text!r}")
    return int(text)


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    # default None: a flag not given leaves the key to $CHAT_*, the config file, a default.
    parser.add_argument(
        "--server", type=parse_server, metavar="HOST[:PORT]",
        help=f"the server; [::1]:PORT for IPv6; port {DEFAULT_PORT} if left out "
        "(else $CHAT_SERVER, else `server` in the config file)",
    )
    parser.add_argument(
        "--cafile", type=Path, metavar="FILE",
        help="CA certificate to verify the server with (else $CHAT_CAFILE, else `cafile` "
        "in the config file, else the system trust store)",
    )
    parser.add_argument(
        "--username", metavar="NAME",
        help="else $CHAT_USERNAME, else `username` in the config file",
    )


def _chat_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--room", help="the room to start in, joined if need be (default: `room` in the "
        f"config file, else {DEFAULT_ROOM})",
    )
    parser.add_argument(
        "--no-bell", dest="bell", action="store_const", const=False, default=None,
        help="do not ring the terminal bell when someone mentions you",
    )


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _settings_flags(common)
    common.add_argument(
        "--password-file", type=Path, metavar="FILE",
        help="read the password from FILE's first line (else $CHAT_PASSWORD, else a prompt)",
    )
    common.add_argument(
        "--timeout", type=_positive, default=DEFAULT_TIMEOUT, metavar="SECONDS",
        help=f"for connecting and for each reply (default {DEFAULT_TIMEOUT:g})",
    )
    # Raw: the exit-code table keeps its lines; the descriptions are wrapped by hand.
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG, description="Terminal client for the chat service (protocol v1, over TLS).\n"
        "Defaults for --server, --cafile, --username and --room can be kept in\n"
        "$XDG_CONFIG_HOME/chat/client.toml (see `chat-client config`); never a password.",
        epilog=EXIT_CODES, formatter_class=raw,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "register", parents=[common], help="create an account",
        description="Create an account; it does not log in.",
        epilog=EXIT_CODES, formatter_class=raw,
    )
    login = commands.add_parser(
        "login", parents=[common], help="log in and chat",
        description="Log in and chat: an interactive prompt on a terminal; otherwise\n"
        "commands are read from stdin, one a line, and every event is printed.",
        epilog=EXIT_CODES, formatter_class=raw,
    )
    login.add_argument("--json", action="store_true", help="print each frame as a JSON line")
    login.add_argument(
        "--reconnect", dest="reconnect", action="store_const", const=True, default=None,
        help="reconnect after a lost connection in line mode too (the prompt always does)",
    )
    login.add_argument(
        "--no-reconnect", dest="reconnect", action="store_const", const=False,
        help="end (exit 3) when the connection is lost, at the prompt too",
    )
    login.add_argument(
        "--recent", type=_count, metavar="N",
        help="on login (and at the prompt on /join) show the last N messages of the room "
        f"(default: `recent` in the config file, else {DEFAULT_RECENT}; 0: none; never with "
        "--json); the direct messages that came while away are shown whatever N is",
    )
    _chat_flags(login)
    config = commands.add_parser(
        "config", help="show the settings in effect and where each came from",
        description="Print each setting in effect and its source: flag, env, file or\n"
        "default. The file is $XDG_CONFIG_HOME/chat/client.toml (default\n"
        "~/.config/chat/client.toml) with the keys server, cafile, username,\n"
        "room, bell (true/false), color (true/false/\"auto\") and recent (messages\n"
        "shown on login). It may not hold a password.",
        formatter_class=raw,
    )
    _settings_flags(config)
    _chat_flags(config)
    return parser


def apply_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Fill args' server, cafile, username, room, bell, color from flags/env/file/defaults.

    Raises UsageError for a config file that cannot be used or a bad value from it.
    """
    flags = {key: getattr(args, key, None) for key in KEYS}
    try:
        settings = load_settings(flags, environ)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    server = settings.values["server"]
    if isinstance(server, str):
        try:
            settings.values["server"] = parse_server(server)
        except argparse.ArgumentTypeError as exc:
            where = settings.sources["server"]
            raise UsageError(f"server from {where}: {exc}") from None
    for key in KEYS:
        setattr(args, key, settings.values[key])
    return settings


def read_password(
    path: Path | None,
    *,
    username: str,
    environ: Mapping[str, str],
    stdin: TextIO,
    confirm: bool = False,
) -> str:
    """--password-file, else $CHAT_PASSWORD, else a no-echo prompt if stdin is a terminal."""
    if path is not None:
        try:
            with path.open(encoding="utf-8") as file:
                line = file.readline()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the password file {path}: {exc}") from None
        password = line.removesuffix("\n").removesuffix("\r")
        if not password:
            raise UsageError(f"the password file {path} has an empty first line")
        return password
    if environ.get("CHAT_PASSWORD"):
        return environ["CHAT_PASSWORD"]
    if not stdin.isatty():
        raise UsageError(
            "no password: give --password-file FILE or set CHAT_PASSWORD "
            "(stdin is not a terminal, so the password cannot be asked for)"
        )
    password = getpass.getpass(f"password for {username}: ")
    if not password:
        raise UsageError("empty password")
    if confirm and getpass.getpass("the same password again: ") != password:
        raise UsageError("the two passwords differ")
    return password


def _err(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def names_in_certificate(
    host: str, port: int, cafile: Path | None, timeout: float
) -> list[str]:
    """The names the server's certificate was issued for, read over a second connection.

    For the hint after a host-name mismatch only. That connection still verifies the
    certificate chain against the same CA; only its host-name check is off, which is the
    very check that failed. It is closed right after the handshake and nothing is sent.
    """
    try:
        context = client_context(cafile)
    except (OSError, ssl.SSLError):
        return []
    context.check_hostname = False  # this context only reads names, it never carries data
    return certificate_names(host, port, context, timeout=timeout)


def _mismatch_hint(args: argparse.Namespace) -> str:
    host, port = args.server
    names = [sanitize(n, multiline=False) for n in
             names_in_certificate(host, port, args.cafile, args.timeout)]
    if not names:
        return "hint: connect by a name the certificate was issued for"
    shown = ", ".join(names[:MAX_NAMES_SHOWN]) + (", ..." if len(names) > MAX_NAMES_SHOWN else "")
    return (
        f"hint: the certificate is for {shown}, not {sanitize(host, multiline=False)}; "
        "connect by one of those names"
    )


def _report(exc: ClientError, args: argparse.Namespace) -> int:
    """The one place a ClientError becomes a message and an exit code."""
    if isinstance(exc, CertificateNotTrusted):
        cafile = args.cafile
        trusted = f"the CA file {cafile}" if cafile else "the system trust store"
        _err(
            f"the server's certificate was not trusted ({sanitize(exc.verify_message)}); "
            f"checked against {trusted}."
        )
        if "mismatch" in exc.verify_message:  # OpenSSL's "Hostname/IP address mismatch"
            _err(_mismatch_hint(args))
        else:
            _err("hint: pass --cafile pointing at the server's ca.crt")
        return EXIT_CONNECTION
    if isinstance(exc, ServerError):
        return report_refusal("refused", exc.frame or {"code": exc.code, "message": exc.message})
    _err(sanitize(str(exc), multiline=False))
    return EXIT_CONNECTION


def report_refusal(what: str, reply: Mapping[str, object]) -> int:
    """Say on stderr why the server refused (code, text, when to retry); exit code 1."""
    code = sanitize(str(reply.get("code", "unknown")), multiline=False)
    message = sanitize(str(reply.get("message", "")), multiline=False)
    text = f"{what}: {code}: {message}"
    retry_after = seconds(reply.get("retry_after"))
    if retry_after is not None:
        text += f" (try again in {retry_after} s)"
    _err(text)
    return EXIT_REFUSED


def _register(client: ChatClient, args: argparse.Namespace, password: str) -> int:
    reply = client.register(args.username, password, args.timeout)
    if reply.get("type") == "error":
        client.quit(args.timeout)
        return report_refusal("registration refused", reply)
    name = sanitize(str(reply.get("username", args.username)), multiline=False)
    print(f"registered {name}; now log in with: {PROG} login --username {name} ...", flush=True)
    client.quit(args.timeout)
    return EXIT_OK


def _login(
    client: ChatClient, args: argparse.Namespace, password: str,
    connect: Callable[[], ChatClient],
) -> int:
    reply = client.login(args.username, password, args.timeout)
    if reply.get("type") == "error":
        client.quit(args.timeout)
        return report_refusal("login refused", reply)
    room = normalize_room(args.room).lower()  # `--room '#dev'`, as the client shows it
    listed = reply.get("rooms")  # a broken server may send anything here
    rooms = [r.lower() for r in listed if isinstance(r, str)] if isinstance(listed, list) else []
    if room not in rooms:
        joined = client.join(room, args.timeout)
        if joined.get("type") == "error":
            client.quit(args.timeout)
            return report_refusal(f"cannot join {room}", joined)
    color = should_color(sys.stdout) if args.color == "auto" else bool(args.color)
    interactive = not args.json and sys.stdin.isatty() and sys.stdout.isatty()
    # The prompt reconnects unless told not to; line mode (scripts) only when told to.
    wanted = args.reconnect if args.reconnect is not None else interactive
    reconnect = connect if wanted else None
    if interactive:
        from chat.client.ui import run_interactive  # prompt_toolkit only when needed

        return run_interactive(
            client, room=room, rooms=rooms, color=color, bell=args.bell,
            timeout=args.timeout, connect=reconnect, password=password, recent=args.recent,
        )
    from chat.client.linemode import run_line_mode

    return run_line_mode(
        client,
        stdin=sys.stdin,
        stdout=sys.stdout,
        stderr=sys.stderr,
        room=room,
        rooms=rooms,
        as_json=args.json,
        color=not args.json and color,
        timeout=args.timeout,
        connect=reconnect,
        password=lambda: password,  # in memory only
        recent=0 if args.json else args.recent,  # --json output stays as scripts parse it
    )


def _run(args: argparse.Namespace) -> int:
    try:
        password = read_password(
            args.password_file,
            username=args.username,
            environ=os.environ,
            stdin=sys.stdin,
            confirm=args.command == "register",
        )
        try:
            context = client_context(args.cafile)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load the CA file {args.cafile}: {exc}") from None
    except UsageError as exc:
        _err(f"error: {exc}")
        return EXIT_USAGE
    host, port = args.server
    client: ChatClient | None = None

    def connect() -> ChatClient:
        return ChatClient.connect(
            host, port, ssl_context=context, timeout=args.timeout, replies_as_events=True
        )

    try:
        client = connect()
        if args.command == "register":
            return _register(client, args, password)
        return _login(client, args, password, connect)
    except ClientError as exc:
        return _report(exc, args)
    finally:
        if client is not None:
            client.close()


def _tolerant_streams() -> None:
    # A peer's text that this terminal's encoding cannot show is escaped, not a crash; a
    # script's stdin that is not UTF-8 is read with replacement characters.
    for stream, errors in ((sys.stdout, "backslashreplace"), (sys.stderr, "backslashreplace"),
                           (sys.stdin, "replace")):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors=errors)


def main(argv: Sequence[str] | None = None) -> int:
    """The `chat-client` console script; returns the exit code."""
    _tolerant_streams()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 for --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        settings = apply_settings(args, os.environ)
    except UsageError as exc:
        _err(f"error: {exc}")
        return EXIT_USAGE
    if args.command == "config":
        print(settings.describe(), flush=True)
        return EXIT_OK
    missing = [f"--{key}" for key in ("server", "username") if getattr(args, key) is None]
    if missing:
        parser.print_usage(sys.stderr)
        _err(
            f"error: {' and '.join(missing)} required (or set them in "
            f"{settings.path}, or in $CHAT_{missing[0][2:].upper()})"
        )
        return EXIT_USAGE
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
