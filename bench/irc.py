"""A small IRC client helper for the load generator: builds the few lines a bench client
sends and parses what a server sends back. No sockets, no threads: the caller owns the
I/O (blocking, selectors or asyncio) and hands received bytes to IrcParser.feed().

    sock.sendall(register_lines("u1") + join_line("#bench"))
    parser = IrcParser()
    for command, nick, text in parser.feed(sock.recv(65536)):
        ...
    sock.sendall(parser.take_outgoing())   # PONGs for the server's PINGs, if any
    parser.registered, "#bench" in parser.joined

Everything is bytes until the three fields of a returned event are decoded; lines are
split with one bytes.split per feed(), so a 64 KiB read of short lines costs a few
microseconds per line. Channel names compare case-insensitively (ASCII lower case), which
matches the rfc1459/ascii casemappings for names made of letters and digits.
"""

from __future__ import annotations

__all__ = [
    "IrcParser",
    "join_line",
    "pong_line",
    "privmsg_line",
    "register_lines",
]

MAX_LINE = 512  # RFC 1459/2812, including CR LF; most servers cut or reject longer lines


def register_lines(nick: str, user: str | None = None, realname: str | None = None) -> bytes:
    """NICK and USER, which together register a connection (RFC 2812 3.1)."""
    n = nick.encode()
    u = (user or nick).encode()
    r = (realname or nick).encode()
    return b"NICK " + n + b"\r\nUSER " + u + b" 0 * :" + r + b"\r\n"


def join_line(channel: str) -> bytes:
    return b"JOIN " + channel.encode() + b"\r\n"


def privmsg_line(channel: str, text: str) -> bytes:
    """One PRIVMSG. text must not contain CR or LF (it would end the line early)."""
    return b"PRIVMSG " + channel.encode() + b" :" + text.encode() + b"\r\n"


def pong_line(token: bytes | str) -> bytes:
    if isinstance(token, str):
        token = token.encode()
    return b"PONG :" + token + b"\r\n"


def _decode(b: bytes) -> str:
    try:
        return b.decode()
    except UnicodeDecodeError:
        return b.decode("utf-8", "replace")


class IrcParser:
    """Incremental parser for one connection's server-to-client stream.

    feed(data) returns one (command, prefix_nick, trailing) per complete line, in order:
    - command: upper-case as sent ("PRIVMSG", "JOIN", "001", "366", ...);
    - prefix_nick: the part of the prefix before "!" (a nick, or a server name), "" if none;
    - trailing: the text after " :", or else the last parameter, or "".
    IRCv3 message tags ("@...") are skipped. Empty lines are ignored.

    State kept while feeding (cheap, only for the few commands that need it):
    - registered: True once 001 (RPL_WELCOME) has arrived; nick: the nick 001 named;
    - joined: lower-cased channel names whose 366 (RPL_ENDOFNAMES) has arrived;
    - errors: (command, trailing) of every ERROR line and every 4xx/5xx numeric;
    - a PING queues "PONG :token" (see take_outgoing()); the PING is returned as well.
    """

    __slots__ = ("_buf", "_out", "errors", "joined", "lines", "nick", "registered")

    def __init__(self) -> None:
        self._buf = b""
        self._out = bytearray()
        self.registered = False
        self.nick = ""
        self.joined: set[str] = set()
        self.errors: list[tuple[str, str]] = []
        self.lines = 0  # complete lines seen so far

    def feed(self, data: bytes) -> list[tuple[str, str, str]]:
        if self._buf:
            data = self._buf + data
        parts = data.split(b"\n")
        self._buf = parts.pop()  # an incomplete last line, or b""
        if len(self._buf) > 65536:  # no sane server sends this; don't grow without bound
            raise ValueError("IRC line longer than 64 KiB without a newline")
        events = []
        append = events.append
        for line in parts:
            if line[-1:] == b"\r":
                line = line[:-1]
            if not line:
                continue
            self.lines += 1
            if line[0] == 64:  # b"@": IRCv3 tags
                sp = line.find(b" ")
                if sp < 0:
                    continue
                line = line[sp + 1 :].lstrip(b" ")
                if not line:
                    continue
            nick = b""
            if line[0] == 58:  # b":": prefix
                sp = line.find(b" ")
                if sp < 0:
                    continue
                prefix = line[1:sp]
                bang = prefix.find(b"!")
                nick = prefix if bang < 0 else prefix[:bang]
                line = line[sp + 1 :].lstrip(b" ")
            sp = line.find(b" ")
            if sp < 0:
                command, rest = line, b""
            else:
                command, rest = line[:sp], line[sp + 1 :]
            if rest[:1] == b":":
                middle, trailing = b"", rest[1:]
            else:
                colon = rest.find(b" :")
                if colon >= 0:
                    middle, trailing = rest[:colon], rest[colon + 2 :]
                else:  # no trailing parameter: the last middle one stands in for it
                    middle = rest.rstrip(b" ")
                    trailing = middle[middle.rfind(b" ") + 1 :]
            cmd = command.upper()
            if cmd == b"PRIVMSG":  # the hot path: nothing else to look at
                append(("PRIVMSG", _decode(nick), _decode(trailing)))
                continue
            scmd = cmd.decode("ascii", "replace")
            text = _decode(trailing)
            if cmd == b"PING":
                self._out += b"PONG :" + trailing + b"\r\n"
            elif cmd == b"001":
                self.registered = True
                self.nick = _decode(middle.split(b" ", 1)[0])
            elif cmd == b"366":
                params = middle.split()
                if len(params) >= 2:
                    self.joined.add(_decode(params[1]).lower())
            elif cmd == b"ERROR" or (len(cmd) == 3 and cmd[:1] in b"45" and cmd.isdigit()):
                self.errors.append((scmd, text))
            append((scmd, _decode(nick), text))
        return events

    def take_outgoing(self) -> bytes:
        """Bytes to send back (PONG replies), emptied by the call."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def is_joined(self, channel: str) -> bool:
        return channel.lower() in self.joined


def registration_complete(events: list[tuple[str, str, str]]) -> bool:
    """True if a batch of events from feed() contains 001 (RPL_WELCOME)."""
    return any(e[0] == "001" for e in events)


def join_complete(events: list[tuple[str, str, str]]) -> bool:
    """True if a batch of events from feed() contains 366 (RPL_ENDOFNAMES)."""
    return any(e[0] == "366" for e in events)


__all__ += ["join_complete", "registration_complete"]
