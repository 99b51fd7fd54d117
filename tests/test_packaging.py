"""A plain (non-editable) install carries everything the server needs, and runs anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)],
        check=True, timeout=300, capture_output=True,
    )
    (whl,) = out.glob("chat-*.whl")
    return whl


def test_wheel_carries_migrations_and_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "chat/migrations/env.py",
        "chat/migrations/script.py.mako",
        "chat/migrations/versions/0001_initial_schema.py",
        "chat/data/common-passwords.txt.gz",
        "chat/data/common-passwords.LICENSE",
        "chat/client/cli.py",
    ):
        assert needed in names, needed
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))
    ).decode()
    assert "chat-server = chat.server:main" in entry_points
    assert "chat-client = chat.client.cli:main" in entry_points


def test_installed_copy_runs_from_another_directory(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)], check=True, timeout=300, capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Only the installed copy is importable: not the checkout, not the editable finder.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import chat, chat.db, chat.auth;"
        "assert chat.__file__.startswith(sys.argv[1]), chat.__file__;"
        "e = chat.db.make_engine('sqlite:///' + sys.argv[2]); chat.db.upgrade_to_head(e);"
        "print(len(chat.auth.common_passwords()))"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", code, str(target), str(tmp_path / "x.db")],
        cwd=elsewhere, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) >= 10000
