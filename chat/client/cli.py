"""`chat-client`: arguments, the password, and the mapping of failures to exit codes.

Every ClientError becomes an exit code (listed in EXIT_CODES, which --help shows) and a
clear line on stderr in `_report`, and nowhere else. There is no option to skip certificate
verification, by design: without --cafile the system trust store is used (or, for a server
on this machine, the development CA `chat-server` made, when there is one).

The client connects before it asks for a password, so a server that is down or refuses
the TLS handshake is reported before anyone types one, and `register` can say how long a
password must be (`hello`'s `min_password_length`).
"""

from __future__ import annotations

import argparse
import getpass
import os
import shlex
import ssl
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

from chat import __version__
from chat.client.commands import normalize_room
from chat.client.config import (
    DEFAULT_RECENT,
    DEFAULT_ROOM,
    DEFAULT_SERVER,
    KEYS,
    LOCAL_HOSTS,
    ConfigError,
    Settings,
    dev_cafile,
)
from chat.client.config import load as load_settings
from chat.client.connection import DEFAULT_TIMEOUT, ChatClient
from chat.client.e2e_results import E2EError
from chat.client.errors import (
    CertificateNotTrusted,
    ClientCertificateRefused,
    ClientError,
    ConnectFailed,
    ConnectionClosed,
    EncryptionUnavailable,
    ServerError,
)
from chat.client.format import sanitize, seconds, should_color
from chat.client.keystore import KeyStoreError
from chat.client.linemode import EXIT_UNDELIVERED
from chat.client.secureclient import SecureClient, e2e_opener
from chat.client.transport import DEFAULT_PORT, certificate_names, where
from chat.tls import client_context

PROG = "chat-client"

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_CONNECTION, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = f"""\
exit codes:
  {EXIT_OK:<4} done: /quit, Ctrl-D or the end of stdin
  {EXIT_REFUSED:<4} refused by the server (registration, login, or joining --room)
  {EXIT_USAGE:<4} usage error
  {EXIT_CONNECTION:<4} connection or TLS failure, or the server ended the session
       (bye idle, shutdown, ...; or the connection was lost without one)
       and reconnecting was off (see --reconnect) or gave up; in line
       mode also: the input ended while reconnecting
  {EXIT_UNDELIVERED:<4} line mode: the input ended, but a message was not delivered
       (refused by the server, or still rate-limited after the resends;
       each is said on stderr)
  {EXIT_INTERRUPTED:<4} interrupted by Ctrl-C"""
STREAMS = """\
In line mode stdout carries what the server sent (messages, presence, the replies
to commands) and the answers to /help, /rooms and /switch; with --json, every frame
as a JSON line and nothing else. stderr carries the errors (`! error ...` from the
server, `chat-client: ...` from the client) and the client's own notes (`-- ...`:
connection lost, reconnecting, a long message split, ...)."""
MAX_NAMES_SHOWN = 5  # of a certificate's names in a hint; a long list would bury the advice
# A password that is too short is asked for again this many times in all: enough for a
# slip of the finger, not a loop a script could get stuck in.
MAX_PASSWORD_TRIES = 3


class UsageError(Exception):
    """The command line cannot be carried out as given (exit code 2)."""


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"bad port {text!r}: want a number from 1 to 65535")
    return int(text)


def parse_server(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPV6]:PORT, [IPV6], a bare HOST or a bare IPv6 address -> (host, port)."""
    text = text.strip()
    scheme, sep, rest = text.partition("://")
    if sep:  # a URL: the chat protocol has none, so say what to give instead
        address = rest.split("/", 1)[0].rpartition("@")[2]
        try:
            host, port = parse_server(address) if address else ("localhost", DEFAULT_PORT)
        except argparse.ArgumentTypeError:
            host, port = "HOST", DEFAULT_PORT
        raise argparse.ArgumentTypeError(
            f"{text!r} is a URL; the chat server is given as HOST:PORT, with no "
            f"{scheme}:// (it always speaks TLS): try {where(host, port)}"
        )
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
        f"(else $CHAT_SERVER, else `server` in the config file, else {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--cafile", type=Path, metavar="FILE",
        help="CA certificate to verify the server with (else $CHAT_CAFILE, else `cafile` "
        "in the config file; else, for a server on this machine, chat-server's "
        "development CA $XDG_DATA_HOME/chat/certs/ca.crt if it exists; else the system "
        "trust store)",
    )
    parser.add_argument(
        "--certfile", type=Path, metavar="FILE",
        help="client certificate (PEM), for a server that requires one (mutual TLS; "
        "else $CHAT_CERTFILE, else `certfile` in the config file)",
    )
    parser.add_argument(
        "--keyfile", type=Path, metavar="FILE",
        help="the client certificate's private key (else $CHAT_KEYFILE, else `keyfile` in "
        "the config file; default: read from --certfile)",
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
    parser.add_argument(
        "--key-passphrase-file", type=Path, metavar="FILE",
        help="protect this device's key store with the passphrase on FILE's first line "
        "(chosen when the store is made; then always needed)",
    )
    parser.add_argument(
        "--no-e2e", dest="e2e", action="store_const", const=False, default=None,
        help="no end-to-end encryption: no device, no key store; encrypted messages "
        "show as [encrypted] (default: `e2e` in the config file, else on when the "
        "server offers it)",
    )
    parser.add_argument(
        "--verified-only", dest="verified_only", action="store_const", const=True,
        default=None, help="give room keys only to devices you verified (/verify); "
        "others cannot read what you send (default: `verified_only` in the config file, "
        "else off)",
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
        "Defaults for --server, --cafile, --certfile, --keyfile, --username and --room\n"
        "can be kept in $XDG_CONFIG_HOME/chat/client.toml (see `chat-client config`);\n"
        "never a password.",
        epilog=EXIT_CODES, formatter_class=raw,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register = commands.add_parser(
        "register", parents=[common], help="create an account",
        description="Create an account; it does not log in.",
        epilog=EXIT_CODES, formatter_class=raw,
    )
    register.add_argument(
        "--token", metavar="TOKEN",
        help="a registration token from the server's operator, for a server that registers "
        "only with one (else $CHAT_TOKEN, else `token` in the config file)",
    )
    login = commands.add_parser(
        "login", parents=[common], help="log in and chat",
        description="Log in and chat: an interactive prompt on a terminal; otherwise\n"
        "commands are read from stdin, one a line, and every event is printed.\n\n"
        + STREAMS,
        epilog=EXIT_CODES, formatter_class=raw,
    )
    login.add_argument(
        "--json", action="store_true",
        help="print each frame received as a JSON line (all but the keep-alive pings)",
    )
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
        "~/.config/chat/client.toml) with the keys server, cafile, certfile,\n"
        "keyfile, username, room, bell (true/false), color (true/false/\"auto\"),\n"
        "recent (messages shown on login) and token (for register). It may not\n"
        "hold a password.",
        formatter_class=raw,
    )
    _settings_flags(config)
    _chat_flags(config)
    return parser


def apply_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Fill args' server, cafile, username, room, bell, color from flags/env/file/defaults.

    Raises UsageError for a config file that cannot be used or a bad value from it. With
    no cafile anywhere and the server on this machine, chat-server's development CA is
    the cafile when it exists (source "dev CA").
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
            source = settings.sources["server"]
            raise UsageError(f"server from {source}: {exc}") from None
    host = settings.values["server"][0]
    dev_ca = dev_cafile(environ)
    if settings.values["cafile"] is None and host.lower() in LOCAL_HOSTS and dev_ca.is_file():
        settings.values["cafile"], settings.sources["cafile"] = dev_ca, "dev CA"
    if settings.values["keyfile"] is not None and settings.values["certfile"] is None:
        raise UsageError(
            f"a keyfile ({settings.sources['keyfile']}) without a certfile: give the client "
            "certificate with --certfile"
        )
    for key in KEYS:
        setattr(args, key, settings.values[key])
    args.dev_ca = settings.sources["cafile"] == "dev CA"
    args.token_source = settings.sources["token"]  # named when the server refuses it
    return settings


def password_given(path: Path | None, environ: Mapping[str, str]) -> bool:
    """Whether the password comes from a file or the environment (else: a prompt)."""
    return path is not None or bool(environ.get("CHAT_PASSWORD"))


def read_password(
    path: Path | None,
    *,
    username: str,
    environ: Mapping[str, str],
    stdin: TextIO,
    confirm: bool = False,
    min_length: int | None = None,
    ask: Callable[[str], str] = getpass.getpass,
) -> str:
    """--password-file, else $CHAT_PASSWORD, else a no-echo prompt if stdin is a terminal.

    With `confirm` (choosing a new password), the prompt says how long it must be
    (`min_length`, from the server's hello), asks again for one too short, and asks a
    second time to catch a typing slip.
    """
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
    if not confirm:
        password = ask(f"password for {username}: ")
        if not password:
            raise UsageError("empty password")
        return password
    rule = f"at least {min_length} characters; " if min_length else ""
    prompt = f"choose a password for {username} ({rule}a few words make a good one): "
    for _ in range(MAX_PASSWORD_TRIES):
        password = ask(prompt)
        if not password:
            raise UsageError("empty password")
        if min_length is None or len(password) >= min_length:
            break
        _err(f"that is {len(password)} characters; the server wants at least {min_length}")
    else:
        raise UsageError(f"no password of at least {min_length} characters")
    if ask("the same password again: ") != password:
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
    if isinstance(exc, EncryptionUnavailable):
        _err(sanitize(str(exc), multiline=False))
        _err("hint: a store made with --key-passphrase-file needs it (and the same "
             "passphrase) every time, one made without it never; fix that, or use "
             "--no-e2e to chat without end-to-end encryption")
        return EXIT_USAGE
    _err(sanitize(str(exc), multiline=False))
    if isinstance(exc, ClientCertificateRefused):
        if args.certfile is None:
            _err("hint: give --certfile FILE and --keyfile FILE (or certfile and keyfile in "
                 "the config file): a certificate from the CA the server trusts for clients")
        else:
            _err(f"hint: {args.certfile} must be issued by the CA the server trusts for "
                 "clients (its --client-cafile)")
    elif isinstance(exc, ConnectFailed) and "refused" in str(exc).lower():
        host, port = args.server
        _err(f"hint: nothing listens on {where(host, port)}: is the chat server running, "
             "on that port?")
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


# v1.1: a server may register only with a token from its operator, or not at all. A
# token can only be checked by registering with it, so its refusal comes after the
# password prompts; the hint says that nothing was made and where the token came from.
REGISTRATION_HINTS = {
    "invalid_token": "no account was made: the token{source} is unknown, used up, expired "
    "or revoked (the server does not say which); ask the server's operator for a new one and "
    "give it with --token TOKEN, $CHAT_TOKEN or `token` in the config file",
    "registration_closed": "this server takes no new accounts; its operator can make one "
    "for you",
}
_TOKEN_SOURCES = {"flag": " given with --token", "env": " in $CHAT_TOKEN",
                  "file": " in the config file"}
LOGIN_HINTS = {
    "account_disabled": "your account has been disabled by the server's operator; ask them",
}


def registration_closed(hello: Mapping[str, object], token: str | None) -> str | None:
    """Why registering cannot work, from hello's `registration` (v1.1), before a password is
    asked for; None if it may. A server that does not say is taken to be open."""
    mode = hello.get("registration")
    if mode == "closed":
        return "this server takes no new accounts (its hello says registration is closed)"
    if mode == "token" and not token:
        return ("this server registers only with a token from its operator: give --token "
                "TOKEN (or set $CHAT_TOKEN)")
    return None


def _register(
    client: ChatClient, args: argparse.Namespace, password: str,
    connect: Callable[[], ChatClient], again: Callable[[], str] | None = None,
) -> int:
    """Register; with `again` (the password was typed at a prompt), a password the server
    finds weak (it contains the username, it is a common one, ...) is asked for again,
    MAX_PASSWORD_TRIES times in all, rather than ending the command."""
    tries = 1
    while True:
        if client.closed:  # the server's login timeout ran out while the user typed
            client = connect()
        reply = client.register(args.username, password, args.timeout, token=args.token)
        if reply.get("code") != "weak_password" or again is None or tries >= MAX_PASSWORD_TRIES:
            break
        tries += 1
        _err("the server refused that password: "
             f"{sanitize(str(reply.get('message', '')), multiline=False)}")
        try:
            password = again()
        except UsageError as exc:
            client.quit(args.timeout)
            _err(f"error: {exc}")
            return EXIT_USAGE
    if reply.get("type") == "error":
        client.quit(args.timeout)
        code = report_refusal("registration refused", reply)
        hint = REGISTRATION_HINTS.get(str(reply.get("code")))
        if hint is not None:
            source = _TOKEN_SOURCES.get(getattr(args, "token_source", ""), "")
            _err(f"hint: {hint.format(source=source)}")
        return code
    name = sanitize(str(reply.get("username", args.username)), multiline=False)
    default = args.server == parse_server(DEFAULT_SERVER)
    # The flags the login needs as well: a newcomer copies the line as it is.
    more = "" if default else f" --server {where(*args.server)}"
    # (Not the development CA found by itself: the login finds it too.)
    if getattr(args, "cafile", None) is not None and not getattr(args, "dev_ca", False):
        more += f" --cafile {shlex.quote(str(args.cafile))}"
    print(f"registered {name}; now log in with: {PROG} login --username {name}{more}",
          flush=True)
    client.quit(args.timeout)
    return EXIT_OK


def _login(
    client: ChatClient, args: argparse.Namespace, password: str,
    connect: Callable[[], ChatClient],
) -> int:
    reply = client.login(args.username, password, args.timeout)
    if reply.get("type") == "error":
        client.quit(args.timeout)
        code = report_refusal("login refused", reply)
        hint = LOGIN_HINTS.get(str(reply.get("code")))
        if hint is not None:
            _err(f"hint: {hint}")
        return code
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


def tls_context(args: argparse.Namespace) -> ssl.SSLContext:
    """The client's TLS context from --cafile, --certfile, --keyfile; UsageError if unusable."""
    try:
        context = client_context(args.cafile)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the CA file {args.cafile}: {_file_problem(exc)}") from None
    if args.certfile is not None:
        try:
            context.load_cert_chain(args.certfile, args.keyfile)
        except (OSError, ssl.SSLError) as exc:
            key = f" with the key {args.keyfile}" if args.keyfile else ""
            raise UsageError(
                f"cannot load the client certificate {args.certfile}{key}: "
                f"{_file_problem(exc)}"
            ) from None
    return context


def _file_problem(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "KEY_VALUES_MISMATCH":
            return "the key does not belong to the certificate"
        return f"not a PEM certificate (and key) OpenSSL can read ({exc.reason or exc})"
    return exc.strerror or str(exc)


def _key_passphrase(args: argparse.Namespace) -> str | None:
    """The key store's passphrase from --key-passphrase-file, if given (UsageError if
    it cannot be read or is empty)."""
    path = getattr(args, "key_passphrase_file", None)
    if path is None:
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not lines or not lines[0]:
        raise UsageError(f"{path}: the first line (the passphrase) is empty")
    return lines[0]


def _run(args: argparse.Namespace) -> int:
    confirm = args.command == "register"
    try:
        context = tls_context(args)
        key_passphrase = _key_passphrase(args)
        password: str | None = None
        if password_given(args.password_file, os.environ):
            password = read_password(
                args.password_file, username=args.username, environ=os.environ,
                stdin=sys.stdin, confirm=confirm,
            )
        elif not sys.stdin.isatty():
            read_password(None, username=args.username, environ=os.environ, stdin=sys.stdin)
    except UsageError as exc:
        _err(f"error: {exc}")
        return EXIT_USAGE
    host, port = args.server
    if getattr(args, "dev_ca", False):
        _err(f"using chat-server's development CA {args.cafile} for {where(host, port)} "
             "(--cafile to use another)")
    clients: list[ChatClient] = []
    e2e = args.command != "register" and args.e2e  # register has no session to encrypt
    opener = e2e_opener(
        where(host, port), os.environ, passphrase=key_passphrase,
        verified_only=args.verified_only, rotate_messages=args.rotate_messages,
        rotate_seconds=args.rotate_seconds) if e2e else None

    if opener is not None and args.username:
        # The key store is opened before anyone types a password for nothing: a wrong
        # passphrase or an unusable store ends here, never in a session without it.
        try:
            opener(args.username)
        except (KeyStoreError, E2EError, OSError) as exc:
            return _report(EncryptionUnavailable(f"end-to-end encryption cannot start: "
                                                 f"{exc}"), args)

    def connect() -> ChatClient:
        client = SecureClient.connect(
            host, port, ssl_context=context, timeout=args.timeout, replies_as_events=True
        )
        client.opener = opener  # end-to-end encryption starts at login (secureclient)
        client.encrypt = opener is not None
        clients.append(client)
        return client

    def ask() -> str:
        min_length = client.hello.get("min_password_length")
        return read_password(
            None, username=args.username, environ=os.environ, stdin=sys.stdin,
            confirm=confirm, min_length=min_length if type(min_length) is int else None,
        )

    again: Callable[[], str] | None = None  # a password typed at the prompt: ask again
    try:
        client = connect()
        closed = registration_closed(client.hello, args.token) if confirm else None
        if closed is not None:  # said before anyone types a password for nothing
            client.quit(args.timeout)
            _err(f"registration refused: {closed}")
            return EXIT_REFUSED
        if password is None:  # asked only now that the server is known to be there
            again = ask
            try:
                password = ask()
            except UsageError as exc:
                _err(f"error: {exc}")
                return EXIT_USAGE
            if client.closed:  # the server's login timeout ran out while the user typed
                client = connect()
        try:
            if confirm:
                return _register(client, args, password, connect, again)
            return _login(client, args, password, connect)
        except ConnectionClosed:
            if client.bye_reason != "login_timeout":
                raise
        # The login timeout ran out between the check above and our request: once more.
        client = connect()
        if confirm:
            return _register(client, args, password, connect, again)
        return _login(client, args, password, connect)
    except ClientError as exc:
        return _report(exc, args)
    finally:
        for client in clients:
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
