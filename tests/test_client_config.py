"""chat.client.config and `chat-client config`: flags over env over the file over defaults.

Every test points XDG_CONFIG_HOME at a temporary directory, so the user's own file is
never read.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chat.client.cli import main
from chat.client.config import ConfigError, config_path, dev_cafile, load, parse_file, resolve

FLAGS_NONE = {"server": None, "cafile": None, "certfile": None, "keyfile": None,
              "username": None, "room": None, "bell": None, "color": None, "recent": None}


@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("CHAT_SERVER", "CHAT_CAFILE", "CHAT_CERTFILE", "CHAT_KEYFILE",
                 "CHAT_USERNAME", "CHAT_ROOM", "CHAT_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))  # no development CA here
    (tmp_path / "chat").mkdir()
    return tmp_path / "chat" / "client.toml"


def test_the_path_follows_xdg_config_home_else_home() -> None:
    assert config_path({"XDG_CONFIG_HOME": "/x"}) == Path("/x/chat/client.toml")
    assert config_path({"HOME": "/h"}) == Path("/h/.config/chat/client.toml")
    assert config_path({"XDG_CONFIG_HOME": "", "HOME": "/h"}) == Path(
        "/h/.config/chat/client.toml")
    assert config_path({"XDG_CONFIG_HOME": "rel", "HOME": "/h"}) == Path(
        "/h/.config/chat/client.toml")  # the spec: relative values are ignored


def test_flags_beat_env_beat_file_beat_defaults() -> None:
    path = Path("/cfg/chat/client.toml")
    file_values = parse_file('server = "f:1"\nusername = "filer"\nroom = "dev"\n', path)
    settings = resolve(
        {**FLAGS_NONE, "server": ("flag", 2)}, {"CHAT_USERNAME": "envy"}, file_values, path
    )
    assert settings.server == ("flag", 2) and settings.sources["server"] == "flag"
    assert settings.username == "envy" and settings.sources["username"] == "env"
    assert settings.room == "dev" and settings.sources["room"] == "file"
    assert settings.bell is True and settings.sources["bell"] == "default"
    assert settings.cafile is None and settings.sources["cafile"] == "default"


def test_relative_file_names_are_relative_to_the_file() -> None:
    values = parse_file('cafile = "certs/ca.crt"\ncertfile = "me.crt"\nkeyfile = "/k/me.key"\n',
                        Path("/cfg/chat/client.toml"))
    assert values["cafile"] == Path("/cfg/chat/certs/ca.crt")
    assert values["certfile"] == Path("/cfg/chat/me.crt")
    assert values["keyfile"] == Path("/k/me.key")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('password = "hunter2hunter2hunter2"\n', "passwords are never read"),
        ('Password = "x"\n', "passwords are never read"),
        ('sever = "typo"\n', "unknown key 'sever'"),
        ("bell = 1\n", "bell must be true or false"),
        ('color = "always"\n', "color must be"),
        ('server = ""\n', "server must be a non-empty string"),
        ("server = [", "not valid TOML"),
        ("recent = -1\n", "recent must be"),
        ('recent = "20"\n', "recent must be"),
        ("recent = true\n", "recent must be"),
        ('e2e = "yes"\n', "e2e must be true or false"),
        ("verified_only = 1\n", "verified_only must be true or false"),
        ("rotate_messages = 0\n", "rotate_messages must be a whole number, at least 1"),
        ("rotate_seconds = 5\n", "rotate_seconds must be a whole number, at least 60"),
    ],
)
def test_a_bad_file_is_refused_clearly(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_file(text, Path("/cfg/chat/client.toml"))


def test_load_without_a_file_gives_defaults(xdg: Path) -> None:
    settings = load(FLAGS_NONE, {"XDG_CONFIG_HOME": str(xdg.parent.parent)})
    assert settings.path == xdg
    assert settings.room == "general" and settings.server == "localhost:7072"


def test_config_command_says_where_each_value_came_from(
    xdg: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    xdg.write_text('server = "chat.example:7000"\nusername = "alice"\nbell = false\n')
    monkeypatch.setenv("CHAT_ROOM", "lobby")
    assert main(["config", "--username", "bob"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert str(xdg) in lines["config"]
    assert "= chat.example:7000 " in lines["server"] and "(file)" in lines["server"]
    assert "bob" in lines["username"] and "(flag)" in lines["username"]
    assert "lobby" in lines["room"] and "(env)" in lines["room"]
    assert "false" in lines["bell"] and "(file)" in lines["bell"]
    assert "(default)" in lines["cafile"]


def test_a_password_in_the_file_is_a_usage_error(
    xdg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    xdg.write_text('server = "localhost"\nusername = "alice"\npassword = "secret"\n')
    assert main(["login"]) == 2
    err = capsys.readouterr().err
    assert "password" in err and str(xdg) in err and "secret" not in err


def test_login_without_username_anywhere_is_a_usage_error(
    xdg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["login"]) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "--username" in err and str(xdg) in err


def test_without_a_server_anywhere_it_is_localhost_7072(
    xdg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("server"))
    assert "= localhost:7072 " in line and "(default)" in line


def test_the_development_ca_is_the_default_for_localhost_only(
    xdg: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = xdg.parent.parent / "data"
    ca = data / "chat" / "certs" / "ca.crt"
    assert dev_cafile({"XDG_DATA_HOME": str(data)}) == ca
    assert dev_cafile({"HOME": "/h"}) == Path("/h/.local/share/chat/certs/ca.crt")
    ca.parent.mkdir(parents=True)
    ca.write_text("a CA\n")

    def cafile_line(*args: str) -> str:
        assert main(["config", *args]) == 0
        out = capsys.readouterr().out
        return next(x for x in out.splitlines() if x.startswith("cafile"))

    for server in ("localhost", "127.0.0.1:7000", "[::1]"):
        line = cafile_line("--server", server)
        assert str(ca) in line and "development CA" in line, line
    assert "(none)" in cafile_line("--server", "chat.example")
    assert "/elsewhere/ca.crt" in cafile_line("--server", "localhost", "--cafile",
                                               "/elsewhere/ca.crt")


def test_a_keyfile_without_a_certfile_is_a_usage_error(
    xdg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    xdg.write_text('keyfile = "me.key"\n')
    assert main(["config"]) == 2
    assert "keyfile (file) without a certfile" in capsys.readouterr().err


def test_a_bad_server_in_the_file_is_a_usage_error(
    xdg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    xdg.write_text('server = "localhost:99999"\nusername = "alice"\n')
    assert main(["login"]) == 2
    assert "server from file" in capsys.readouterr().err


def test_login_and_register_use_the_file(xdg: Path, chat_server: object) -> None:
    from tests.test_client_cli import new_name, run_cli

    name = new_name()
    server = chat_server
    xdg.write_text(
        f'server = "{server.address}"\ncafile = "{server.cafile}"\n'  # type: ignore[attr-defined]
        f'username = "{name}"\n'
    )
    env = {"XDG_CONFIG_HOME": str(xdg.parent.parent)}
    registered = run_cli("register", **env)
    assert registered.returncode == 0, registered.stderr
    assert f"registered {name}" in registered.stdout
    logged_in = run_cli("login", input="/who\n", **env)
    assert logged_in.returncode == 0, logged_in.stderr
    assert name in logged_in.stdout


def test_no_bell_flag_overrides_the_file(
    xdg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    xdg.write_text("bell = true\n")
    assert main(["config", "--no-bell"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("bell"))
    assert "false" in line and "(flag)" in line


def test_recent_comes_from_the_flag_else_the_file_else_20() -> None:
    path = Path("/cfg/chat/client.toml")
    file_values = parse_file("recent = 5\n", path)
    assert resolve(FLAGS_NONE, {}, {}, path).recent == 20
    assert resolve(FLAGS_NONE, {}, file_values, path).recent == 5
    assert resolve({**FLAGS_NONE, "recent": 0}, {}, file_values, path).recent == 0


@pytest.mark.parametrize("value", ["-1", "x", "2.5"])
def test_a_bad_recent_flag_is_a_usage_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["login", "--server", "localhost", "--username", "a", "--recent", value]) == 2
    assert "--recent" in capsys.readouterr().err


def test_encryption_settings_come_from_the_file_or_their_defaults() -> None:
    path = Path("/cfg/chat/client.toml")
    defaults = resolve(FLAGS_NONE, {}, {}, path)
    assert (defaults.e2e, defaults.verified_only, defaults.rotate_messages,
            defaults.rotate_seconds) == (True, False, 100, 7 * 24 * 3600)
    mine = resolve(FLAGS_NONE, {}, parse_file(
        "e2e = false\nverified_only = true\nrotate_messages = 10\nrotate_seconds = 3600\n",
        path), path)
    assert (mine.e2e, mine.verified_only, mine.rotate_messages, mine.rotate_seconds) == (
        False, True, 10, 3600)
    assert resolve({**FLAGS_NONE, "verified_only": True}, {}, {}, path).verified_only
