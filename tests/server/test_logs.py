"""Structured logs (injector.server.logs): the direct line and logging's are one format, and
`injector serve` writes JSON lines with the admission's fields."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from injector.server import logs
from tests.support.pods import pod, review
from tests.support.servers import start_server

FIELDS = {"namespace": "shop", "pod": "checkout-1", "result": "injected",
          "reason": "namespace-enabled", "duration_ms": 0.123}
MESSAGE = "admission shop/checkout-1 injected (namespace-enabled)"


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    """What configure()'s handler writes (to stderr in serve). configure() changes
    process-wide state, undone afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging._srcfile, logging.logThreads,
             logging.logProcesses, logging.logMultiprocessing, logging.getLogRecordFactory())
    logs.configure("info")
    written = io.StringIO()
    root.handlers[0].setStream(written)  # type: ignore[attr-defined]
    yield written
    (root.handlers[:], level, logging._srcfile, logging.logThreads, logging.logProcesses,
     logging.logMultiprocessing, factory) = saved
    root.setLevel(level)
    logging.setLogRecordFactory(factory)


def as_in_serve() -> list[logging.LogRecord]:
    """Only configure()'s handler on the root logger, as in `serve` (pytest adds its own
    while a test runs); returns the LogRecords created from now on."""
    root = logging.getLogger()
    root.handlers[:] = [handler for handler in root.handlers
                        if isinstance(handler, logs.JsonLines)]
    records: list[logging.LogRecord] = []
    make = logging.getLogRecordFactory()

    def counting(*args: object, **kwargs: object) -> logging.LogRecord:
        records.append(make(*args, **kwargs))
        return records[-1]

    logging.setLogRecordFactory(counting)
    return records


def lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


def test_the_direct_line_is_the_line_logging_writes(output: io.StringIO) -> None:
    records = as_in_serve()
    log = logging.getLogger("injector.webhook")
    log.info(MESSAGE, extra={"fields": FIELDS})
    logs.line(log, logging.INFO, MESSAGE, FIELDS)
    assert len(records) == 1  # the second line skipped logging's machinery
    by_logging, direct = lines(output.getvalue())
    assert by_logging.pop("time") <= direct.pop("time")  # type: ignore[operator]
    assert direct == by_logging == {"level": "info", "logger": "injector.webhook",
                                    "msg": MESSAGE, **FIELDS}


def test_the_direct_line_respects_the_level(output: io.StringIO) -> None:
    as_in_serve()
    logging.getLogger().setLevel(logging.WARNING)
    logs.line(logging.getLogger("injector.webhook"), logging.INFO, "admission", FIELDS)
    logs.line(logging.getLogger("injector.webhook"), logging.WARNING, "slow", FIELDS)
    assert [(entry["level"], entry["msg"]) for entry in lines(output.getvalue())] == [
        ("warning", "slow")]


def test_another_handler_still_gets_the_line(
        output: io.StringIO, caplog: pytest.LogCaptureFixture) -> None:
    # pytest's caplog handler is on the root logger, as any handler a user adds would be.
    logs.line(logging.getLogger("injector.webhook"), logging.INFO, MESSAGE, FIELDS)
    assert [(record.getMessage(), record.fields)  # type: ignore[attr-defined]
            for record in caplog.records] == [(MESSAGE, FIELDS)]
    assert lines(output.getvalue())[0]["pod"] == "checkout-1"


def test_a_filter_on_the_way_still_applies(output: io.StringIO) -> None:
    as_in_serve()
    log = logging.getLogger("injector.filtered")
    log.addFilter(lambda record: False)
    try:
        logs.line(log, logging.INFO, MESSAGE, FIELDS)
    finally:
        log.filters.clear()
    assert output.getvalue() == ""


@pytest.mark.parametrize("seconds", [0.0, 1_795_816_457.0, 1_795_816_457.9996, 1_795_816_458.5])
def test_timestamps_are_utc_to_the_millisecond(seconds: float) -> None:
    stamp = logs._CLOCK.timestamp(seconds)
    parsed = dt.datetime.fromisoformat(stamp)
    assert parsed.utcoffset() == dt.timedelta(0)
    assert len(stamp) == len("2026-11-27T20:02:21.627+00:00")
    assert 0 <= seconds - parsed.timestamp() < 0.001


class CountingWrites(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_lines_on_the_event_loop_go_out_together_after_the_pass_in_order(
        output: io.StringIO) -> None:
    as_in_serve()
    stream = CountingWrites()
    logging.getLogger().handlers[0].setStream(stream)  # type: ignore[attr-defined]
    log = logging.getLogger("injector.webhook")
    seen_during_the_pass: list[str] = []

    async def admissions() -> None:
        logs.line(log, logging.INFO, "one", FIELDS)
        logs.line(log, logging.INFO, "two", FIELDS)
        seen_during_the_pass.append(stream.getvalue())
        await asyncio.sleep(0)  # the end of this pass of the loop
        assert stream.writes == 1
        logs.line(log, logging.INFO, "three", FIELDS)
        log.warning("four")  # through logging: the pending line goes first
        logs.line(log, logging.INFO, "five", FIELDS)

    asyncio.run(admissions())
    logging.getLogger().handlers[0].flush()  # as logging.shutdown() does at exit
    assert seen_during_the_pass == [""]
    assert [entry["msg"] for entry in lines(stream.getvalue())] == [
        "one", "two", "three", "four", "five"]


def test_a_line_from_another_thread_is_written_at_once(output: io.StringIO) -> None:
    as_in_serve()
    thread = threading.Thread(target=logs.line, args=(
        logging.getLogger("injector.cluster"), logging.INFO, "from a thread", FIELDS))
    thread.start()
    thread.join()
    assert lines(output.getvalue())[0]["msg"] == "from a thread"


def test_logs_are_json_lines_with_the_admission_fields(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        with server.client() as client:
            client.post("/inject", json=review(pod(name="checkout-1"), namespace="shop"))
    finally:
        server.stop()
    entries = [json.loads(line) for line in server.log().splitlines() if line.strip()]
    admission = [entry for entry in entries if entry.get("pod") == "checkout-1"]
    assert len(admission) == 1
    assert admission[0]["namespace"] == "shop"
    assert admission[0]["result"] == "injected"
    assert admission[0]["reason"] == "namespace-enabled"
    assert admission[0]["duration_ms"] >= 0
    assert all({"time", "level", "logger", "msg"} <= entry.keys() for entry in entries)


SEVEN_MIB = 7 * 1024 * 1024


@pytest.mark.parametrize("path", ["direct", "logging"])
def test_every_field_is_bounded_and_says_how_long_it_was(output: io.StringIO, path: str) -> None:
    as_in_serve()
    log = logging.getLogger("injector.webhook")
    name = "p" * SEVEN_MIB
    fields = {**FIELDS, "pod": name, "containers": ["c" * 100] * 1000, "serial": 2**70,
              7: "a key that is not a string"}
    message = f"admission shop/{name} injected"
    if path == "direct":
        logs.line(log, logging.INFO, message, fields)
    else:
        log.info(message, extra={"fields": fields})
    text = output.getvalue()
    assert len(text) < 16 * 1024
    entry = lines(text)[0]
    assert entry["pod"] == "p" * logs.MAX_FIELD_CHARS + f"…[{SEVEN_MIB} chars]"
    assert entry["msg"].startswith("admission shop/ppp")
    assert entry["msg"].endswith(f"…[{len(message)} chars]")
    assert len(entry["msg"]) < logs.MAX_MESSAGE_CHARS + 32
    assert entry["containers"].endswith("chars]")  # a list cut as its JSON text
    assert entry["serial"] == str(2**70)
    assert entry["7"] == "a key that is not a string"
    assert entry["namespace"] == "shop" and entry["duration_ms"] == 0.123


def test_a_traceback_is_bounded_too(output: io.StringIO) -> None:
    as_in_serve()
    try:
        raise ValueError("x" * SEVEN_MIB)
    except ValueError:
        logging.getLogger("injector").exception("internal error")
    entry = lines(output.getvalue())[0]
    assert entry["msg"] == "internal error"
    assert len(entry["exception"]) < logs.MAX_EXCEPTION_CHARS + 32
    assert entry["exception"].startswith("Traceback")


def test_one_7_mib_request_makes_no_7_mib_log_line(tmp_path: Path) -> None:
    # The pod's name is in the review twice (the object's and the request's): 7 MiB in all.
    name = "p" * (SEVEN_MIB // 2 - 4096)
    body = json.dumps(review(pod(name=name), namespace="shop")).encode()
    assert 6 * 1024 * 1024 < len(body) <= SEVEN_MIB
    server = start_server(tmp_path)
    try:
        with server.client(timeout=60) as client:
            answered = client.post("/inject", content=body,
                                   headers={"content-type": "application/json"})
            assert answered.status_code == 200
            assert client.get("/healthz").status_code == 200
    finally:
        server.stop()
    entries = lines(server.log())
    assert [entry["logger"] for entry in entries].count("injector.webhook") == 1
    assert max(len(json.dumps(entry)) for entry in entries) < 16 * 1024
