"""chat-admin: the operator's tool, on the server's host, as the server's user.

    chat-admin [--data-dir DIR] [--config FILE] [--db URL] [--json] COMMAND ...

While the server runs, each command goes through its control socket (DATA_DIR/control.sock)
and is done by the server itself, in order with everything else: `user disable` ends the
user's sessions at once. With the server stopped, it opens the database and does the same
there, and says so. It reads the server's settings (flags, CHAT_* variables, the TOML file)
to find the data directory, the database and the pepper.

Exit codes, like chat-client's: 0 done; 1 refused (no such user, say); 2 usage or a bad
setting; 3 neither the server nor the database could be reached.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import secrets
import sqlite3
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chat import admin_actions, control
from chat.auth import PasswordHasher, check_new_password, read_pepper
from chat.config import SettingError, Settings, load_settings_and_sources
from chat.files import DataLock

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
# A token's bounds: beyond them it is a mistake (or an overflow), not a policy.
MAX_TOKEN_USES = 1_000_000
MAX_TOKEN_TTL = 10 * 365 * 86400.0
# `user add` and `reset-password` without --password: 20 random characters (~119 bits).
GENERATED_PASSWORD_BYTES = 15


class AdminError(Exception):
    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chat-admin", description="Administer a chat server: users, registration "
        "tokens, rooms, the audit log, backups. Run it on the server's host as its user.")
    _common(p, None)
    # The same options after the command too (`chat-admin user list --json`): there they
    # must not reset what was given before it, hence SUPPRESS.
    common = argparse.ArgumentParser(add_help=False)
    _common(common, argparse.SUPPRESS)
    top = p.add_subparsers(dest="area", required=True,
                           metavar="{user,token,room,device,audit,backup}")

    def sub(group: Any, name: str, **kw: Any) -> argparse.ArgumentParser:
        return group.add_parser(name, parents=[common], **kw)

    user = sub(top, "user", help="accounts").add_subparsers(dest="cmd", required=True)
    sub(user, "list", help="every account")
    sub(user, "show", help="one account: rooms, sessions, state").add_argument(
        "username")
    for cmd, text in (("enable", "let a disabled account log in again"),
                      ("logout", "end every session of the account (bye logged_out)")):
        sp = sub(user, cmd, help=text)
        sp.add_argument("username")
        sp.add_argument("--reason", default="", help="why (kept in the audit log)")
    dis = sub(user, "disable", help="refuse the account's logins and end its sessions")
    dis.add_argument("username")
    dis.add_argument("--reason", default="")
    for cmd, text in (("add", "make an account (prints a generated password)"),
                      ("reset-password", "set a new password and end every session")):
        sp = sub(user, cmd, help=text)
        sp.add_argument("username")
        sp.add_argument("--password-stdin", action="store_true",
                        help="read the password from standard input instead of generating one")
        sp.add_argument("--reason", default="", help="why (kept in the audit log)")

    token = sub(top, "token", help="registration tokens").add_subparsers(
        dest="cmd", required=True)
    tc = sub(token, "create", help="a new token, shown once")
    tc.add_argument("--uses", type=int, default=1, help="registrations it allows (1)")
    tc.add_argument("--expires", default="7d",
                    help="lifetime: seconds, or with s, m, h or d (7d)")
    tc.add_argument("--note", default="", help="what it is for (shown in token list)")
    sub(token, "list", help="every token (never the tokens themselves)")
    sub(token, "revoke", help="make a token unusable").add_argument("id", type=int)

    room = sub(top, "room", help="rooms").add_subparsers(dest="cmd", required=True)
    sub(room, "list", help="every room, private ones included")
    sub(room, "show", help="one room: settings, members, bans").add_argument("room")
    so = sub(room, "set-owner", help="make a user an owner of a room")
    so.add_argument("room")
    so.add_argument("username")
    so.add_argument("--reason", default="")
    for cmd, text in (("kick", "kick a user from a room, live"),
                      ("ban", "ban a user from a room, live"), ("unban", "lift a ban")):
        sp = sub(room, cmd, help=text)
        sp.add_argument("room")
        sp.add_argument("username")
        sp.add_argument("--reason", default="")
    rd = sub(room, "delete", help="delete a room with its history; its name is free")
    rd.add_argument("room")
    rd.add_argument("--reason", default="")

    dev = sub(top, "device", help="users' devices (end-to-end encryption keys)"
              ).add_subparsers(dest="cmd", required=True)
    sub(dev, "list", help="a user's devices and their fingerprints").add_argument("username")
    dr = sub(dev, "remove", help="remove a lost device: its keys go, and can never be "
             "registered again")
    dr.add_argument("username")
    dr.add_argument("device")
    dr.add_argument("--reason", default="")

    au = sub(top, "audit", help="moderation and operator actions, oldest first")
    au.add_argument("--room")
    au.add_argument("--user", help="as actor or target")
    au.add_argument("--since", help="a date (2026-12-01), a time (2026-12-01T10:00) or an "
                    "age (2h, 7d)")
    au.add_argument("--limit", type=int, default=1000, help="the newest N (at most 10000)")

    sub(top, "backup", help="an online, consistent copy of the database").add_argument(
        "path", help="the file to write (must not exist)")
    return p


def _common(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--data-dir", default=default,
                        help="the server's data directory (as chat-server's: "
                        "$XDG_DATA_HOME/chat, that is ~/.local/share/chat, by default)")
    parser.add_argument("--config", default=default, help="the server's TOML configuration")
    parser.add_argument("--db", default=default, help="the server's database URL")
    parser.add_argument("--pepper-file", default=default, help="the server's pepper file")
    parser.add_argument("--json", action="store_true",
                        default=default if default is not None else False,
                        help="print JSON, for scripts")


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1:] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise AdminError(f"not a duration: {text!r} (like 3600, 90m, 12h or 7d)",
                         EXIT_USAGE) from None


def _since_ms(text: str) -> int:
    if text[-1:] in "smhd" and text[:-1].replace(".", "", 1).isdigit():
        return int((time.time() - _duration(text)) * 1000)
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise AdminError(f"--since: not a date, time or age: {text!r}", EXIT_USAGE) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _settings(args: argparse.Namespace) -> Settings:
    argv = []
    for name in ("data_dir", "config", "db", "pepper_file"):
        value = getattr(args, name)
        if value:
            argv += ["--" + name.replace("_", "-"), value]
    try:
        return load_settings_and_sources(argv)[0]
    except SettingError as exc:
        raise AdminError(str(exc), EXIT_USAGE) from None


def _new_password(args: argparse.Namespace, settings: Settings, username: str
                  ) -> tuple[str, bool]:
    """The password to set, and whether it was generated (then it is printed)."""
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else \
            getpass.getpass(f"new password for {username}: ")
        from chat.errors import ChatError

        try:
            password = check_new_password(password, username,
                                          min_length=settings.min_password_length)
        except ChatError as exc:
            raise AdminError(exc.message) from None
        return password, False
    return secrets.token_urlsafe(GENERATED_PASSWORD_BYTES), True


def _hash(settings: Settings, password: str) -> str:
    try:
        pepper = read_pepper(settings.pepper_path)
    except (OSError, ValueError) as exc:
        raise AdminError(f"cannot read the pepper file {settings.pepper_path}: {exc} (run "
                         "chat-admin as the server's user, with its settings)",
                         EXIT_UNREACHABLE) from None
    return PasswordHasher(pepper, settings.bcrypt_rounds).hash(password)


def _request(args: argparse.Namespace, settings: Settings) -> tuple[str, dict[str, Any], str]:
    """The action, its arguments, and what to print beside the result (a password)."""
    area, cmd = args.area, getattr(args, "cmd", None)
    if area == "user":
        if cmd in ("add", "reset-password"):
            password, generated = _new_password(args, settings, args.username)
            note = f"password for {args.username}: {password}" if generated else ""
            action = "user_add" if cmd == "add" else "user_reset_password"
            return action, {"name": args.username, "reason": args.reason,
                            "password_hash": _hash(settings, password)}, note
        if cmd == "list":
            return "user_list", {}, ""
        if cmd == "show":
            return "user_show", {"name": args.username}, ""
        return f"user_{cmd}", {"name": args.username, "reason": args.reason}, ""
    if area == "token":
        if cmd == "create":
            ttl = _duration(args.expires)
            if not 0 < ttl <= MAX_TOKEN_TTL:
                raise AdminError(f"--expires: from a second to {MAX_TOKEN_TTL // 86400:g} "
                                 f"days, not {args.expires!r}", EXIT_USAGE)
            if not 1 <= args.uses <= MAX_TOKEN_USES:
                raise AdminError(f"--uses: from 1 to {MAX_TOKEN_USES}, not {args.uses}",
                                 EXIT_USAGE)
            return "token_create", {"uses": args.uses, "ttl": ttl, "note": args.note}, ""
        if cmd == "list":
            return "token_list", {}, ""
        return "token_revoke", {"token_id": args.id}, ""
    if area == "room":
        if cmd == "list":
            return "room_list", {}, ""
        if cmd == "show":
            return "room_show", {"name": args.room}, ""
        if cmd == "set-owner":
            return "room_set_owner", {"name": args.room, "username": args.username,
                                      "reason": args.reason}, ""
        if cmd in ("kick", "ban"):
            return f"room_{cmd}", {"name": args.room, "username": args.username,
                                   "reason": args.reason}, ""
        if cmd == "unban":
            return "room_unban", {"name": args.room, "username": args.username,
                                  "reason": args.reason}, ""
        return "room_delete", {"name": args.room, "reason": args.reason}, ""
    if area == "device":
        if cmd == "list":
            return "device_list", {"name": args.username}, ""
        return "device_remove", {"name": args.username, "device": args.device,
                                 "reason": args.reason}, ""
    assert area == "audit"
    return "audit", {"room": args.room, "user": args.user, "limit": args.limit,
                     "since_ms": _since_ms(args.since) if args.since else None}, ""


def perform(settings: Settings, action: str, args: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Do it through the running server, else on the database. The flag: was it live?"""
    path = control.socket_path(settings.data_path)
    if path.exists():
        try:
            answer = control.call(path, action, args)
        except ConnectionRefusedError:
            pass  # a socket left by a server that did not stop cleanly: it is not running
        except OSError as exc:
            raise AdminError(f"cannot use the control socket {path}: {exc}",
                             EXIT_UNREACHABLE) from None
        else:
            if not answer.get("ok"):
                raise AdminError(str(answer.get("error")))
            return answer["result"], True
    return _offline(settings, action, args), False


def _offline(settings: Settings, action: str, args: dict[str, Any]) -> dict[str, Any]:
    from chat.db import DatabaseLock, make_engine, upgrade_to_head
    from chat.hub import LocalHub
    from chat.store import Store

    if settings.db_url.startswith("sqlite") and not Path(
            settings.db_url.split("///", 1)[-1]).exists():
        raise AdminError(f"no database at {settings.db_url}: is --data-dir (or --db) the "
                         "server's?", EXIT_UNREACHABLE)
    if os.geteuid() == 0 and settings.data_path.exists() and settings.data_path.stat().st_uid:
        raise AdminError(f"{settings.data_path} belongs to another user: run chat-admin as "
                         "that user (the server's), or files made now would be root's",
                         EXIT_USAGE)
    # The server's own lock: if it is held, a server is running whose socket we could not
    # use, and writing under it would leave its memory and the database apart.
    lock = DataLock(settings.data_path, settings.sqlite_path)
    try:
        lock.acquire()
    except SettingError:
        raise AdminError(f"a server is running on this data (its lock is held) but its "
                         f"control socket {control.socket_path(settings.data_path)} does not "
                         "answer; nothing was changed", EXIT_UNREACHABLE) from None
    except OSError as exc:
        raise AdminError(f"cannot lock the data directory {settings.data_path}: {exc}",
                         EXIT_UNREACHABLE) from None
    try:
        try:
            engine = make_engine(settings.db_url)
            db_lock = DatabaseLock(engine)
            locked = db_lock.acquire()
        except Exception as exc:
            raise AdminError(f"cannot open the database {settings.db_url}: {exc}",
                             EXIT_UNREACHABLE) from None
        if not locked:
            engine.dispose()
            sock = control.socket_path(settings.data_path)
            raise AdminError("a server is running on this database (its lock is held) but "
                             f"no control socket answers at {sock}: run chat-admin with that "
                             "server's --data-dir, on its host; nothing was changed",
                             EXIT_UNREACHABLE)
        try:
            upgrade_to_head(engine)
        except Exception as exc:
            db_lock.release()
            engine.dispose()
            raise AdminError(f"cannot open the database {settings.db_url}: {exc}",
                             EXIT_UNREACHABLE) from None
        store = Store(engine, LocalHub())  # a hub with nobody in it: nobody to tell
        try:
            with engine.begin() as db:
                ops = admin_actions.Ops(db, store, store.hub)
                result = admin_actions.ACTIONS[action](ops, **args)
            ops.run_later()
        except admin_actions.Refused as exc:
            raise AdminError(str(exc)) from None
        finally:
            db_lock.release()
            engine.dispose()
    finally:
        lock.release()
    return result


def backup(settings: Settings, target: Path) -> dict[str, Any]:
    """SQLite's online backup: a consistent copy while the server writes."""
    url = settings.db_url
    if not url.startswith("sqlite:///"):
        raise AdminError("backup copies SQLite databases; for PostgreSQL use pg_dump "
                         "(see docs/security.md)", EXIT_USAGE)
    source = Path(url[len("sqlite:///"):])
    if not source.exists():
        raise AdminError(f"no database at {source}", EXIT_UNREACHABLE)
    if target.exists():
        raise AdminError(f"{target} exists: choose a new file", EXIT_USAGE)
    # The copy holds every password hash: readable by this user only, from the start.
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise AdminError(f"{target} exists (or is a link): choose a new file",
                         EXIT_USAGE) from None
    except OSError as exc:
        raise AdminError(f"cannot make {target}: {exc.strerror or exc}", EXIT_USAGE) from None
    os.close(fd)
    src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)  # all pages in one step: one snapshot, whatever is written meanwhile
        ok = dst.execute("PRAGMA quick_check").fetchone()[0]
        messages = dst.execute("SELECT count(*), max(id) FROM messages").fetchone()
    finally:
        dst.close()
        src.close()
    if ok != "ok":
        raise AdminError(f"the copy failed its check: {ok}", EXIT_REFUSED)
    return {"path": str(target), "messages": messages[0], "last_msg_id": messages[1] or 0,
            "bytes": target.stat().st_size}


def _ts(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _fingerprint(ed25519: str) -> str:
    """The Ed25519 key in groups of four, as clients show it (to compare by eye)."""
    return " ".join(ed25519[i:i + 4] for i in range(0, len(ed25519), 4))


def _human(action: str, result: dict[str, Any]) -> list[str]:
    if action == "user_list":
        return [f"{u['username']:<32} {'disabled' if u['disabled'] else 'active':<8} "
                f"{'online' if u['online'] else '':<6} created {_ts(u['created_ms'])}"
                for u in result["users"]] or ["no users"]
    if action == "user_show":
        rooms = ", ".join(f"#{r['room']}" + (f" ({r['role']})" if r["role"] != "member" else "")
                          for r in result["rooms"])
        return [f"user      {result['username']}", f"created   {_ts(result['created_ms'])}",
                f"state     {'disabled since ' + _ts(result['disabled_ms']) if result['disabled'] else 'active'}",  # noqa: E501
                f"sessions  {result['sessions']}", f"rooms     {rooms}"]
    if action == "token_create":
        return [f"token {result['id']}: {result['token']}",
                f"  allows {result['uses_allowed']} registration(s) until "
                f"{_ts(result['expires_ms'])} UTC; shown only now: give it to the person "
                "who registers (chat-client register --token TOKEN)"]
    if action == "token_list":
        return [f"{t['id']:>4}  {t['state']:<8} used {t['uses']}/{t['uses_allowed']}  "
                f"expires {_ts(t['expires_ms'])}  {t['note']}"
                for t in result["tokens"]] or ["no tokens"]
    if action == "room_list":
        return [f"#{r['room']:<32} {r['visibility']:<7} {r['history']:<6} "
                f"{r['members']:>6} member{'' if r['members'] == 1 else 's'}  {r['topic']}"
                for r in result["rooms"]]
    if action == "room_show":
        lines = [f"room      #{result['room']} ({result['visibility']}, history "
                 f"{result['history']})", f"topic     {result['topic'] or '(none)'}"]
        lines += [f"member    {m['username']} ({m['role']})" for m in result["members"]]
        lines += [f"banned    {b['username']} by {b['by']}"
                  + (f": {b['reason']}" if b["reason"] else "") for b in result["bans"]]
        return lines
    if action == "device_list":
        return [f"{d['device']:<32} {_fingerprint(d['ed25519'])}  {d['one_time_keys']:>3} "
                f"one-time keys, since {_ts(d['created_ms'])}"
                for d in result["devices"]] or [f"{result['username']} has no devices"]
    if action == "audit":
        return [f"{_ts(e['ts_ms'])}  {e['actor']:<12} {e['action']:<14} "
                + " ".join(x for x in (e["target"] or "", f"#{e['room']}" if e["room"] else "",
                                       e["detail"], f"({e['reason']})" if e["reason"] else "")
                           if x) for e in result["entries"]] or ["nothing logged"]
    sessions = result.get("sessions_ended")
    ended = (f"; {sessions} session{'s' if sessions != 1 else ''} ended"
             if sessions is not None else "")
    said = {
        "user_add": f"made the account {result.get('username')}",
        "user_disable": f"disabled {result.get('username')}{ended}",
        "user_enable": f"enabled {result.get('username')}",
        "user_logout": f"logged {result.get('username')} out{ended}",
        "user_reset_password": f"set a new password for {result.get('username')}{ended}",
        "token_revoke": f"revoked token {result.get('id')}",
        "room_set_owner": f"{result.get('owner')} owns #{result.get('room')}",
        "room_kick": f"kicked {result.get('username')} from #{result.get('room')}",
        "room_ban": f"banned {result.get('username')} from #{result.get('room')}",
        "room_unban": f"lifted the ban of {result.get('username')} from #{result.get('room')}",
        "device_remove": f"removed {result.get('username')}'s device {result.get('device')}",
        "room_delete": f"deleted #{result.get('room')} and its "
                       f"{result.get('messages_deleted')} messages",
        "backup": f"wrote {result.get('path')}: {result.get('messages')} messages, up to "
                  f"msg_id {result.get('last_msg_id')}, {result.get('bytes')} bytes",
    }
    if action in said:
        return [said[action]]
    return [", ".join(f"{k} {v}" for k, v in result.items())]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = _settings(args)
        if args.area == "backup":
            result, live, note = backup(settings, Path(args.path)), None, (
                "the pepper is not in the copy: back up "
                f"{settings.pepper_path} apart from it; without it no password can be checked")
            action = "backup"
        else:
            action, request, note = _request(args, settings)
            result, live = perform(settings, action, request)
    except AdminError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        else:
            print(f"chat-admin: {exc}", file=sys.stderr)
        return exc.code
    if args.json:
        print(json.dumps({"ok": True, "live": live, "result": result}))
        if note and action != "backup":
            print(note, file=sys.stderr)
        return EXIT_OK
    for line in _human(action, result):
        print(line)
    if note:
        print(note)
    if live is False:
        print("(the server is not running: this was done on the database directly)",
              file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
