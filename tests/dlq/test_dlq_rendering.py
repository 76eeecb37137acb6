"""How `embedfleet dlq` shows and filters dead letters (no broker needed)."""

from __future__ import annotations

from worker.commands.dlq import DeadLetter, escape_text, preview


def letter(value: bytes | None, *extra: tuple[str, bytes]) -> DeadLetter:
    return DeadLetter(
        partition=0,
        offset=7,
        key=b"k",
        value=value,
        headers=(
            ("content-type", b"application/json"),
            ("x-trace", b"t"),
            *extra,
            ("dlq-error-code", b"text_too_long"),
            ("dlq-reason", b"text is \x1b[2J too long"),
            ("dlq-source-topic", b"embed.requests"),
            ("dlq-source-partition", b"3"),
            ("dlq-source-offset", b"41"),
            ("dlq-worker", b"w1"),
        ),
    )


def test_terminal_control_characters_are_escaped() -> None:
    assert escape_text("a\x1b[31mb\nc\u202ed\\") == "a\\x1b[31mb\\x0ac\\u202ed\\\\"
    assert preview(b"\xff\xfeok\x07") == '"\\xff\\xfeok\\x07"'
    assert preview(b"x" * 100, 10) == '"xxxxxxxxxx"...'
    assert preview(None) == "(null)"
    line = letter(b'{"id": "1", "text": "\x1b]0;title\x07"}').line()
    assert "\x1b" not in line and "\x07" not in line
    assert "text_too_long" in line and "from embed.requests/3@41" in line


def test_original_headers_lose_every_dlq_header() -> None:
    dead = letter(b"{}", ("dlq-truncated-key", b"2000"))
    assert dead.original_headers() == [("content-type", b"application/json"), ("x-trace", b"t")]


def test_incomplete_copies_are_refused() -> None:
    assert letter(b"{}").incomplete() is None
    assert "value was truncated (original 5000 bytes)" in str(
        letter(b"{}", ("dlq-truncated-value", b"5000")).incomplete()
    )
    assert "key was truncated" in str(letter(b"{}", ("dlq-truncated-key", b"2000")).incomplete())
    assert "headers were dropped" in str(letter(b"{}", ("dlq-dropped-headers", b"9")).incomplete())
    assert "no value" in str(letter(None).incomplete())
