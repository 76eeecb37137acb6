"""`embedfleet produce` input formats, output sinks, arguments and pacing (no services)."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest

from producer.errors import TextFailure
from producer.outputs import JsonlSink, NpySink, open_sink
from producer.progress import Progress, RateLimiter
from schemas.inputs import InputError, InputText, parse, parse_jsonl, parse_lines, take
from worker.commands import build_parser
from worker.commands.produce import chunk_size, client_config


def test_jsonl_objects_and_bare_strings() -> None:
    lines = [
        '{"id": "a", "text": "first"}\n',
        "\n",
        '"second"\n',
        '{"text": "third"}\n',
        '{"id": 7, "text": "x", "extra": 1}\n',
    ]
    assert list(parse_jsonl(lines)) == [
        InputText("a", "first"),
        InputText(3, "second"),
        InputText(4, "third"),
        InputText(7, "x"),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "line 1: not JSON"),
        ('{"id": 1}', "line 1: expected"),
        ("[1, 2]", "line 1: expected"),
        ('{"text": 5}', "line 1: expected"),
    ],
)
def test_jsonl_errors_name_the_line(line: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        list(parse_jsonl([line]))


def test_plain_lines_keep_the_text_and_skip_blank_lines() -> None:
    lines = ["  indented text \n", "\n", "   \n", "{not json}\r\n", "last"]
    assert list(parse_lines(lines)) == [
        InputText(1, "  indented text "),
        InputText(4, "{not json}"),
        InputText(5, "last"),
    ]
    assert list(parse(iter(["a\n"]), "lines")) == [InputText(1, "a")]


def test_take_reads_in_chunks() -> None:
    items = parse_lines(f"t{i}\n" for i in range(5))
    assert [len(take(items, 2)) for _ in range(4)] == [2, 2, 1, 0]


def test_jsonl_sink_writes_vectors_errors_and_request_ids() -> None:
    stream = io.StringIO()
    sink = JsonlSink(stream, owned=False)
    sink.write(InputText("a", "x"), np.array([0.5, -1.0], dtype=np.float32), None)
    sink.write(InputText(2, "y"), None, TextFailure(1, "empty_text", "text is empty"))
    sink.write_sent(InputText(3, "z"), "abc")
    sink.close()
    assert [json.loads(line) for line in stream.getvalue().splitlines()] == [
        {"id": "a", "vector": [0.5, -1.0]},
        {"id": 2, "error": {"code": "empty_text", "message": "text is empty"}},
        {"id": 3, "request_id": "abc"},
    ]


def test_npy_sink_keeps_rows_in_order_with_nan_for_failures(tmp_path: Path) -> None:
    path = tmp_path / "out.npy"
    sink = open_sink(str(path), io.StringIO())
    assert isinstance(sink, NpySink)
    sink.write(InputText(1, "x"), np.ones(3, dtype=np.float32), None)
    sink.write(InputText(2, "y"), None, TextFailure(1, "empty_text", ""))
    sink.close()
    matrix = np.load(path)
    assert matrix.dtype == np.float32 and matrix.shape == (2, 3)
    assert (matrix[0] == 1).all() and np.isnan(matrix[1]).all()


def test_produce_arguments_reach_the_client_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDFLEET_KAFKA_BOOTSTRAP", "env:9092")
    args = build_parser("produce").parse_args(
        [
            "produce",
            "in.txt",
            "--format",
            "lines",
            "-o",
            "v.npy",
            "--task",
            "query",
            "--dimensions",
            "128",
            "--rate",
            "100",
            "--concurrency",
            "64",
            "--no-cache",
            "--redis-url",
            "",
        ]
    )
    assert (args.input, args.input_format, args.output) == ("in.txt", "lines", "v.npy")
    assert (args.task, args.dimensions, args.rate, args.concurrency) == ("query", 128, 100.0, 64)
    config = client_config(args)
    assert config.kafka_bootstrap == "env:9092" and not config.use_cache and config.redis_url == ""
    assert config.reply_mode == "private"
    assert client_config(build_parser("produce").parse_args(["produce", "--no-wait"])).reply_mode == "none"


def test_chunks_are_small_under_a_rate_limit() -> None:
    parser = build_parser("produce")
    assert chunk_size(parser.parse_args(["produce"])) == 512
    assert chunk_size(parser.parse_args(["produce", "--concurrency", "100"])) == 100
    assert chunk_size(parser.parse_args(["produce", "--rate", "40"])) == 10
    assert chunk_size(parser.parse_args(["produce", "--rate", "1"])) == 1


async def test_rate_limiter_spaces_out_texts() -> None:
    limiter = RateLimiter(200.0)
    started = time.monotonic()
    for _ in range(5):
        await limiter.acquire(10)  # 50 texts at 200/s: the last waits until ~0.2 s
    assert 0.17 <= time.monotonic() - started < 1.0
    unlimited = RateLimiter(None)
    await asyncio.wait_for(unlimited.acquire(10**9), 0.1)


def test_progress_line_off_a_terminal_is_plain() -> None:
    from producer.client import ClientStats

    stream = io.StringIO()
    progress = Progress(stream, enabled=True)
    progress.update(10, 5, ClientStats(cached=2, computed=3), force=True)
    progress.finish()
    assert stream.getvalue().startswith("5/10 texts  cached 2  computed 3  failed 0")
    assert "\r" not in stream.getvalue()
