"""The documentation still matches the code: generated tables, limits, named tests."""

import re
from pathlib import Path

from chat.config import markdown_table

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_configuration_table_is_current():
    assert markdown_table() in (DOCS / "configuration.md").read_text(), (
        "docs/configuration.md is stale: regenerate its table with `python -m chat.config`"
    )


def test_protocol_doc_lists_every_error_code():
    from chat.errors import ERROR_CODES

    text = (DOCS / "protocol.md").read_text()
    for code in ERROR_CODES:
        assert f"`{code}`" in text, code


def test_security_doc_limits_are_real_settings():
    from chat.config import SETTING_FIELDS

    text = (DOCS / "security.md").read_text()
    table = text[text.index("| limit | default |"):text.index("## Known limitations")]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) >= 20
    for row in rows:
        for name in re.findall(r"`([a-z_0-9]+)`", row.split("|")[1]):
            assert name in SETTING_FIELDS, name


def test_security_doc_says_when_the_ping_comes():
    from chat.config import Settings

    # The server pings a silent connection at 3/4 of idle_timeout (chat/connection.py).
    ping = Settings().idle_timeout * 3 / 4
    text = (DOCS / "security.md").read_text()
    assert re.findall(r"ping at (\d+) s", text) == [f"{ping:g}"]


def test_every_test_the_docs_name_exists():
    tests = "".join(p.read_text() for p in (DOCS.parent / "tests").glob("test_*.py"))
    for doc in (*DOCS.glob("*.md"), DOCS.parent / "README.md"):
        for name in re.findall(r"`(test_[a-z0-9_]+)`", doc.read_text()):
            assert re.search(rf"def {name}\b", tests), f"{doc.name} names {name}"
