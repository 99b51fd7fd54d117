"""Tests for chat.config: defaults, precedence (defaults < TOML < CHAT_* < flags), validation."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from chat.config import (
    SETTING_FIELDS,
    SettingError,
    Settings,
    env_name,
    flag_name,
    load_settings,
    load_settings_and_sources,
    markdown_table,
)

REPO = Path(__file__).resolve().parent.parent


def write_toml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# --- defaults --------------------------------------------------------------------------


def test_defaults() -> None:
    s = Settings()
    assert s.port == 7072
    assert s.host == "127.0.0.1"
    assert s.bcrypt_rounds == 12
    assert s.min_password_length == 15
    assert s.max_frame_bytes == 16384
    assert s.handshake_timeout == 10
    assert s.login_timeout == 30
    assert s.idle_timeout == 120
    assert s.max_errors_in_row == 10
    assert s.tls_profile == "intermediate"
    assert s.config == ""
    s.validate()


def test_load_settings_with_nothing_gives_the_defaults() -> None:
    assert load_settings([], {}) == Settings()


def test_timeouts_are_floats() -> None:
    s = load_settings(["--idle-timeout", "60"], {"CHAT_LOGIN_TIMEOUT": "5"})
    assert s.idle_timeout == 60.0 and isinstance(s.idle_timeout, float)
    assert s.login_timeout == 5.0 and isinstance(s.login_timeout, float)


def test_derived_paths(tmp_path: Path) -> None:
    s = Settings(data_dir=str(tmp_path))
    assert s.db_url == f"sqlite:///{tmp_path / 'chat.db'}"
    assert s.pepper_path == tmp_path / "pepper"
    assert s.cert_paths == (tmp_path / "certs" / "server.crt", tmp_path / "certs" / "server.key",
                            True)
    own = s.replace(certfile="/x/c.pem", keyfile="/x/k.pem", pepper_file="/x/p", db="sqlite://")
    assert own.cert_paths == (Path("/x/c.pem"), Path("/x/k.pem"), False)
    assert own.pepper_path == Path("/x/p")
    assert own.db_url == "sqlite://"


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Settings().port = 1  # type: ignore[misc]


# --- precedence ------------------------------------------------------------------------

TOML = """
port = 1000
bcrypt_rounds = 10
min_password_length = 20
host = "0.0.0.0"
idle_timeout = 90
"""


def test_toml_file_via_flag(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "chat.toml", TOML)
    s = load_settings(["--config", path], {})
    assert (s.port, s.bcrypt_rounds, s.min_password_length, s.host) == (1000, 10, 20, "0.0.0.0")
    assert s.idle_timeout == 90.0
    assert s.config == path
    assert s.login_timeout == 30  # untouched settings keep their defaults


def test_toml_file_via_environment(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "chat.toml", TOML)
    s = load_settings([], {"CHAT_CONFIG": path})
    assert (s.port, s.bcrypt_rounds) == (1000, 10)
    assert s.config == path


def test_flag_config_beats_environment_config(tmp_path: Path) -> None:
    from_env = write_toml(tmp_path / "env.toml", "port = 1111\n")
    from_flag = write_toml(tmp_path / "flag.toml", "bcrypt_rounds = 9\n")
    s = load_settings(["--config", from_flag], {"CHAT_CONFIG": from_env})
    assert s.port == 7072  # env.toml was not read at all
    assert s.bcrypt_rounds == 9
    assert s.config == from_flag


def test_precedence_default_toml_env_flags(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "chat.toml", TOML)
    environ = {
        "CHAT_CONFIG": path,
        "CHAT_PORT": "2000",
        "CHAT_BCRYPT_ROUNDS": "11",
        "CHAT_LOG_LEVEL": "DEBUG",
    }
    s = load_settings(["--port", "3000", "--log-level", "WARNING"], environ)
    assert s.port == 3000  # flag beats environment beats TOML
    assert s.log_level == "WARNING"  # flag beats environment
    assert s.bcrypt_rounds == 11  # environment beats TOML
    assert s.min_password_length == 20  # TOML beats default
    assert s.host == "0.0.0.0"
    assert s.max_frame_bytes == 16384  # default


def test_environment_beats_defaults_without_a_file() -> None:
    s = load_settings([], {"CHAT_MAX_FRAME_BYTES": "4096", "CHAT_HOST": "::1"})
    assert s.max_frame_bytes == 4096
    assert s.host == "::1"


def test_flags_alone() -> None:
    s = load_settings(["--bcrypt-rounds", "4", "--min-password-length=8", "--port", "0"], {})
    assert (s.bcrypt_rounds, s.min_password_length, s.port) == (4, 8, 0)


def test_environ_argument_is_used_not_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAT_PORT", "4444")
    assert load_settings([], {}).port == 7072
    assert load_settings([], None).port == 4444


def test_other_environment_variables_ignored() -> None:
    s = load_settings([], {"PORT": "1", "chat_port": "2", "CHAT_port": "3", "HOME": "/x"})
    assert s.port == 7072


# A valid non-default value for every setting (certfile and keyfile go together: below).
SAMPLES = {
    "host": "::1", "port": "8000", "tls_profile": "modern", "client_cafile": "ca.pem",
    "data_dir": "/srv/chat", "db": "sqlite://", "pepper_file": "/srv/pepper",
    "bcrypt_rounds": "13", "min_password_length": "16", "auth_workers": "3",
    "auth_queue": "9", "auth_nice": "5", "max_frame_bytes": "4096", "max_errors_in_row": "5",
    "handshake_timeout": "2.5", "login_timeout": "7", "idle_timeout": "60",
    "shutdown_grace": "1", "timer_slack": "0.25", "checkpoint_interval": "5",
    "max_connections": "100", "max_outbound_bytes": "8388608",
    "max_history_bytes": "65536", "io_threads": "4", "log_level": "DEBUG",
    "login_window": "60", "login_account_failures": "3", "login_ip_failures": "9",
    "login_max_delay": "30", "registrations_per_ip": "2", "registration_window": "120",
    "max_connections_per_ip": "4", "frames_per_second": "2.5", "frame_burst": "7",
    "login_max_consecutive": "50", "login_lockout": "3600",
    "previous_pepper_files": "/srv/old1,/srv/old2",
    "max_rooms_per_user": "7", "max_room_members": "9", "ipv6_prefix": "56",
    "reply_bytes_per_second": "4096", "reply_bytes_burst": "2000000",
    "max_requests_in_flight": "5", "writer_queue_limit": "77", "presence_interval": "0.5",
    "presence_room_limit": "12", "read_bytes_per_second": "2048",
    "history_row_cost": "100", "invite_ttl": "3600", "max_listed_rooms": "50",
    "max_to_device_queue": "500", "to_device_page": "20", "to_device_send_id_ttl": "600",
    "max_key_watch": "200", "metrics_address": "127.0.0.1:9107",
    "redis": "redis://127.0.0.1:6379/0", "redis_prefix": "chat-b",
    "proxy_protocol": "10.0.0.10, 10.0.1.0/24",
    "cluster_node_ttl": "7.5", "cluster_gap_wait": "0.1",
    "cluster_reconcile_interval": "3.0",
    "max_to_device_per_sender": "40", "to_device_send_ids": "64",
    "registration": "token", "max_devices_per_user": "3", "max_one_time_keys": "7",
}


def test_samples_cover_every_setting() -> None:
    assert set(SAMPLES) | {"config", "certfile", "keyfile"} == set(SETTING_FIELDS)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_setting_has_all_three_spellings(tmp_path: Path, name: str) -> None:
    raw = SAMPLES[name]
    kind = SETTING_FIELDS[name].metadata["type"]
    expected = kind(raw)
    toml_value = raw if kind in (int, float) else f'"{raw}"'
    path = write_toml(tmp_path / "chat.toml", f"{name} = {toml_value}\n")
    from_flag = load_settings([flag_name(name), raw], {})
    from_env = load_settings([], {env_name(name): raw})
    from_toml = load_settings(["--config", path], {})
    for s in (from_flag, from_env, from_toml):
        assert getattr(s, name) == expected
        assert type(getattr(s, name)) is kind
        assert getattr(s, name) != getattr(Settings(), name)


def test_certfile_and_keyfile_together() -> None:
    s = load_settings(["--certfile", "c.pem"], {"CHAT_KEYFILE": "k.pem"})
    assert (s.certfile, s.keyfile) == ("c.pem", "k.pem")
    with pytest.raises(ValueError):
        load_settings(["--certfile", "c.pem"], {})


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "nonsense = 1\n",
        "Port = 1\n",
        "bcrypt-rounds = 4\n",
        'config = "other.toml"\n',
        "[server]\nport = 1\n",
    ],
)
def test_unknown_toml_key(tmp_path: Path, text: str) -> None:
    path = write_toml(tmp_path / "chat.toml", text)
    with pytest.raises(ValueError):
        load_settings(["--config", path], {})


@pytest.mark.parametrize(
    "text",
    [
        'port = "seventy"\n',
        "port = true\n",
        "port = 12.5\n",
        "bcrypt_rounds = [12]\n",
        'idle_timeout = "soon"\n',
        "idle_timeout = false\n",
    ],
)
def test_bad_toml_value(tmp_path: Path, text: str) -> None:
    path = write_toml(tmp_path / "chat.toml", text)
    with pytest.raises(ValueError):
        load_settings(["--config", path], {})


def test_malformed_toml(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "chat.toml", "port = = 3\n")
    with pytest.raises(ValueError):  # tomllib.TOMLDecodeError is a ValueError
        load_settings(["--config", path], {})


@pytest.mark.parametrize("value", ["abc", "", "12.5", "1e3", "0x10", "twelve"])
def test_bad_int_in_environment(value: str) -> None:
    with pytest.raises(ValueError):
        load_settings([], {"CHAT_BCRYPT_ROUNDS": value})


@pytest.mark.parametrize("value", ["abc", "12.5", ""])
def test_bad_int_flag(value: str) -> None:
    with pytest.raises(ValueError):
        load_settings(["--port", value], {})


def test_bad_float_in_environment() -> None:
    with pytest.raises(ValueError):
        load_settings([], {"CHAT_IDLE_TIMEOUT": "two minutes"})


def test_unknown_flag_exits() -> None:
    with pytest.raises(SystemExit):
        load_settings(["--no-such-setting", "1"], {})


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(SettingError) as exc:
        load_settings(["--config", str(path)], {})
    assert str(exc.value) == (
        f"config file {path} does not exist (config set by the flag --config)")
    with pytest.raises(SettingError, match="config set by the environment variable CHAT_CONFIG"):
        load_settings([], {"CHAT_CONFIG": str(path)})


# --- error messages name the setting, where it was set, and what is wrong --------------


@pytest.mark.parametrize(
    ("argv", "environ", "toml", "expected"),
    [
        (["--port", "abc"], {}, None,
         "port must be a whole number, not 'abc' (port set by the flag --port)"),
        ([], {"CHAT_PORT": "abc"}, None,
         "port must be a whole number, not 'abc' "
         "(port set by the environment variable CHAT_PORT)"),
        ([], {}, 'port = "seventy"\n',
         "port must be a whole number, not 'seventy' (port set in {path})"),
        ([], {}, "idle_timeout = true\n",
         "idle_timeout must be a number, not True (idle_timeout set in {path})"),
        ([], {"CHAT_IDLE_TIMEOUT": "two minutes"}, None,
         "idle_timeout must be a number, not 'two minutes' "
         "(idle_timeout set by the environment variable CHAT_IDLE_TIMEOUT)"),
        # The bad value is blamed on its own source, even where another would win.
        (["--port", "80"], {}, 'port = "seventy"\n',
         "port must be a whole number, not 'seventy' (port set in {path})"),
        # Values that convert but cannot work: the source that won is named.
        (["--bcrypt-rounds", "3"], {"CHAT_BCRYPT_ROUNDS": "12"}, None,
         "bcrypt_rounds must be between 4 and 31, not 3 "
         "(bcrypt_rounds set by the flag --bcrypt-rounds)"),
        ([], {"CHAT_PORT": "70000"}, None,
         "port must be between 0 and 65535, not 70000 "
         "(port set by the environment variable CHAT_PORT)"),
        ([], {}, "max_history_bytes = 4194304\n",
         "max_outbound_bytes (4194304) must hold two maximal history replies "
         "(max_history_bytes 4194304) (max_outbound_bytes at its default; "
         "max_history_bytes set in {path})"),
        ([], {}, 'certfile = "c.pem"\n',
         "certfile and keyfile go together: keyfile is not set "
         "(certfile set in {path}; keyfile at its default)"),
        ([], {}, "bcrypt-rounds = 4\n",
         "unknown setting 'bcrypt-rounds'; did you mean 'bcrypt_rounds'? "
         "(bcrypt-rounds set in {path})"),
    ],
)
def test_errors_name_the_setting_and_its_source(
    tmp_path: Path, argv: list[str], environ: dict[str, str], toml: str | None, expected: str
) -> None:
    path = tmp_path / "chat.toml"
    if toml is not None:
        write_toml(path, toml)
        argv = [*argv, "--config", str(path)]
    with pytest.raises(SettingError) as exc:
        load_settings(argv, environ)
    assert str(exc.value) == expected.format(path=path)
    assert exc.value.exit_code == 2


def test_a_toml_file_that_does_not_parse_is_named(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "chat.toml", "port = = 3\n")
    with pytest.raises(SettingError) as exc:
        load_settings([], {"CHAT_CONFIG": path})
    text = str(exc.value)
    assert text.startswith(f"config file {path} is not valid TOML: ")
    assert "line 1" in text
    assert text.endswith("(config set by the environment variable CHAT_CONFIG)")


def test_a_config_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingError, match=f"config file {tmp_path} is a directory"):
        load_settings(["--config", str(tmp_path)], {})
    path = tmp_path / "chat.toml"
    path.write_bytes(b'host = "\xff"\n')
    with pytest.raises(SettingError, match=f"config file {path} is not UTF-8 text"):
        load_settings(["--config", str(path)], {})


def test_sources_say_where_each_setting_came_from(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "chat.toml", "port = 1\nhost = '::1'\nbcrypt_rounds = 10\n")
    settings, sources = load_settings_and_sources(
        ["--port", "2", "--config", path], {"CHAT_HOST": "127.0.0.2"})
    assert (settings.port, settings.host, settings.bcrypt_rounds) == (2, "127.0.0.2", 10)
    assert sources == {
        "port": "by the flag --port", "config": "by the flag --config",
        "host": "by the environment variable CHAT_HOST", "bcrypt_rounds": f"in {path}",
    }


# --- validate --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"bcrypt_rounds": 3}, id="rounds-3"),
        pytest.param({"bcrypt_rounds": 32}, id="rounds-32"),
        pytest.param({"min_password_length": 7}, id="min-password-7"),
        pytest.param({"min_password_length": 0}, id="min-password-0"),
        pytest.param({"max_frame_bytes": 1023}, id="frame-1023"),
        pytest.param({"certfile": "c.pem"}, id="cert-without-key"),
        pytest.param({"keyfile": "k.pem"}, id="key-without-cert"),
        pytest.param({"tls_profile": "old"}, id="tls-old"),
        pytest.param({"handshake_timeout": 0.0}, id="handshake-0"),
        pytest.param({"login_timeout": -1.0}, id="login-negative"),
        pytest.param({"idle_timeout": 0.0}, id="idle-0"),
        pytest.param({"timer_slack": -0.5}, id="slack-negative"),
        pytest.param({"checkpoint_interval": 0.0}, id="checkpoint-0"),
        pytest.param({"timer_slack": float("nan")}, id="slack-nan"),
        pytest.param({"io_threads": 0}, id="io-threads-0"),
        pytest.param({"auth_queue": 0}, id="auth-queue-0"),
        pytest.param({"max_connections": 0}, id="connections-0"),
        pytest.param({"ipv6_prefix": 31}, id="ipv6-prefix-31"),
        pytest.param({"ipv6_prefix": 129}, id="ipv6-prefix-129"),
        pytest.param({"max_outbound_bytes": 2 * 1024 * 1024 - 1, "max_history_bytes": 1024 * 1024},
                     id="outbound-below-two-history-replies"),
    ],
)
def test_validate_refuses(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Settings().replace(**changes).validate()


def test_validate_refuses_through_load_settings() -> None:
    with pytest.raises(ValueError):
        load_settings(["--bcrypt-rounds", "3"], {})
    with pytest.raises(ValueError):
        load_settings([], {"CHAT_MIN_PASSWORD_LENGTH": "7"})


@pytest.mark.parametrize(
    "changes",
    [
        {"bcrypt_rounds": 4},
        {"bcrypt_rounds": 31},
        {"min_password_length": 8},
        {"max_frame_bytes": 1024},
        {"tls_profile": "modern"},
        {"certfile": "c.pem", "keyfile": "k.pem"},
        {"port": 0},
        {"max_outbound_bytes": 2 * 1024 * 1024, "max_history_bytes": 1024 * 1024},
    ],
)
def test_validate_accepts_the_edges(changes: dict[str, object]) -> None:
    Settings().replace(**changes).validate()


@pytest.mark.parametrize(
    "name", ["handshake_timeout", "login_timeout", "idle_timeout", "shutdown_grace"]
)
def test_nan_timeout_refused(name: str) -> None:
    with pytest.raises(ValueError):
        load_settings([], {env_name(name): "nan"})


# --- the documentation table -----------------------------------------------------------


def test_markdown_table_lists_every_setting() -> None:
    table = markdown_table()
    lines = table.splitlines()
    assert lines[0].startswith("| flag | environment | TOML key |")
    rows = lines[2:]
    assert len(rows) == len(SETTING_FIELDS)
    for f, row in zip(fields(Settings), rows, strict=True):
        assert f"`{flag_name(f.name)}`" in row
        assert f"`{env_name(f.name)}`" in row
        assert f"`{f.name}`" in row
        assert f.metadata["doc"] in row
    assert "`7072`" in table and "`16384`" in table


def test_names() -> None:
    assert flag_name("bcrypt_rounds") == "--bcrypt-rounds"
    assert env_name("bcrypt_rounds") == "CHAT_BCRYPT_ROUNDS"


def test_python_m_chat_config_prints_the_table() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chat.config"], cwd=REPO, capture_output=True, text=True,
        timeout=60, check=True,
    )
    assert result.stdout == markdown_table()
    for name in SETTING_FIELDS:
        assert f"`{name}`" in result.stdout
