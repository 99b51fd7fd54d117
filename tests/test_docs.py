"""The documentation that is generated from code still matches the code."""

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
