"""Tests for log.py: Postfix-shaped lines, one line per event whatever the input."""

import re
import subprocess
import sys
import syslog

import pytest

from pymailtools import log

# Shapes of Postfix 3.7's log lines (after "<date> <host> postfix/x[pid]: "): log tools parse them.
QID = r"[0-9A-Za-z]+"
DELIVERY = re.compile(
    rf"^(?P<qid>{QID}): to=<(?P<to>[^>]*)>, (?:orig_to=<(?P<orig>[^>]*)>, )?"
    r"relay=(?P<relay>\S+), delay=(?P<delay>\d+(?:\.\d+)?), "
    r"(?:delays=(?P<delays>\d+(?:\.\d+)?(?:/\d+(?:\.\d+)?){3}), )?"
    r"dsn=(?P<dsn>\d\.\d{1,3}\.\d{1,3}), status=(?P<status>\w+) \((?P<detail>.*)\)$"
)
ACTIVE = re.compile(rf"^{QID}: from=<[^>]*>, size=\d+, nrcpt=\d+ \(queue active\)$")
NOTICE = re.compile(rf"^{QID}: sender (?:non-delivery|delay) notification: {QID}$")
POSTFIX_EXAMPLES = [
    "6E1E020E81D: to=<bob@example.net>, relay=none, delay=0.02, delays=0.01/0.01/0/0, "
    "dsn=4.4.1, status=deferred (connect to 127.0.0.1[127.0.0.1]:9: Connection refused)",
    "7148820E81F: to=<reject@grey.example>, relay=127.0.0.1[127.0.0.1]:2527, delay=0.1, "
    "delays=0.01/0/0.04/0.05, dsn=5.1.1, status=bounced (host 127.0.0.1[127.0.0.1] said: "
    "550 5.1.1 <reject@grey.example>: Recipient address rejected: User unknown "
    "(in reply to RCPT TO command))",
]
NASTY = "".join(chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]) + "\u2028\u2029\u202e"


def test_regexes_match_postfix_examples() -> None:
    for line in POSTFIX_EXAMPLES:
        assert DELIVERY.match(line), line
    assert ACTIVE.match("6E1E020E81D: from=<root@mx.example.test>, size=278, nrcpt=1 "
                        "(queue active)")
    assert NOTICE.match("7148820E81F: sender non-delivery notification: 8B53120E82B")


def test_delivery_line_reproduces_postfix() -> None:
    line = log.make_line("6E1E020E81D", to="bob@example.net", relay="none", delay=0.02,
                         delays=(0.01, 0.01, 0, 0), dsn="4.4.1", status="deferred",
                         detail="connect to 127.0.0.1[127.0.0.1]:9: Connection refused")
    assert line == POSTFIX_EXAMPLES[0]


def test_delivery_line_local_with_orig_to() -> None:
    line = log.make_line("4Xq7Lm2Za", to="bob@host.example.test", orig_to="postmaster",
                         relay="local", delay=1.2, dsn="2.0.0", status="sent",
                         detail="delivered to mailbox")
    assert line == ("4Xq7Lm2Za: to=<bob@host.example.test>, orig_to=<postmaster>, relay=local, "
                    "delay=1.2, dsn=2.0.0, status=sent (delivered to mailbox)")
    m = DELIVERY.match(line)
    assert m and m["orig"] == "postmaster" and m["delays"] is None


def test_other_lines() -> None:
    assert log.queue_active("6E1E020E81D", "root@mx.example.test", 278, 1) == (
        "6E1E020E81D: from=<root@mx.example.test>, size=278, nrcpt=1 (queue active)")
    assert log.queue_active("A1", "", 10, 2) == "A1: from=<>, size=10, nrcpt=2 (queue active)"
    assert log.removed("6E1E020E81D") == "6E1E020E81D: removed"
    assert log.bounce_notice("7148820E81F", "8B53120E82B") == (
        "7148820E81F: sender non-delivery notification: 8B53120E82B")
    assert log.bounce_notice("A1", "B2", delayed=True) == "A1: sender delay notification: B2"
    assert log.pickup("6E1E020E81D", 0, "root") == "6E1E020E81D: uid=0 from=<root>"
    assert log.message_id("A1", "<x@y>") == "A1: message-id=<x@y>"
    assert log.expired("A1", "a@b") == "A1: from=<a@b>, status=expired, returned to sender"
    assert log.held("A1") == "A1: placed on hold"
    assert log.released("A1") == "A1: released from hold"


@pytest.mark.parametrize("seconds,text", [
    (0, "0"), (0.001, "0"), (0.02, "0.02"), (0.1, "0.1"), (0.123, "0.12"), (0.999, "1"),
    (1.2, "1.2"), (1.0, "1"), (9.96, "10"), (12.6, "13"), (345.4, "345"), (-1, "0"),
    (float("nan"), "0"),
])
def test_format_delay(seconds: float, text: str) -> None:
    assert log.format_delay(seconds) == text


@pytest.mark.parametrize("code", [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029,
                                  0x202E, 0xDCFF])
def test_every_control_character_escaped(code: int) -> None:
    out = log.escape(f"a{chr(code)}b")
    assert out.isprintable() and out.isascii()
    assert out.startswith("a\\") and out.endswith("b")
    out.encode("utf-8")  # lone surrogates would make syslog raise


def test_named_escapes() -> None:
    assert log.escape("a\r\nb\tc\x1b[31m\x00\x7f") == "a\\r\\nb\\tc\\x1b[31m\\x00\\x7f"
    assert log.escape("\x85\u2028") == "\\x85\\u2028"
    assert log.escape("bytes \udcff") == "bytes \\xff"
    assert log.escape("ünïcödé ok") == "ünïcödé ok"


def test_backslash_escaped_so_forgery_is_visible() -> None:
    assert log.escape("a\\nb") == "a\\\\nb"
    assert log.escape("a\\nb") != log.escape("a\nb")


def test_one_line_per_event_whatever_the_values() -> None:
    lines = [
        log.make_line("A1" + NASTY, to="bob" + NASTY, orig_to=NASTY, relay="mx" + NASTY,
                      delay=1, dsn="5.0.0" + NASTY, status="bounced" + NASTY,
                      detail="550 no\r\n" + NASTY + "A1: to=<x>, status=sent (ok)"),
        log.queue_active("A1", "alice\r\nA2: removed", 1, 1),
        log.bounce_notice("A1\n", "B2\r"),
        log.removed("A1\x00"),
        log.pickup("A1", 0, "root\n"),
        log.message_id("A1", "<x\n@y>"),
        log.expired("A1", "\x1b[2J"),
    ]
    for line in lines:
        assert line.isprintable(), repr(line)
        assert len(line.splitlines()) == 1


def test_escaped_values_keep_shape() -> None:
    line = log.make_line("A1", to="bob\r\nevil", relay="local", delay=0.5, dsn="5.1.1",
                         status="bounced", detail="550 user\r\nunknown")
    m = DELIVERY.match(line)
    assert m, line
    assert m["to"] == "bob\\r\\nevil" and m["detail"] == "550 user\\r\\nunknown"


def test_logger_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    logger = log.Logger("runner", to_syslog=False, verbose=True)
    logger.info(log.removed("A1"))
    logger.warning("odd\r\nthing \\n")
    logger.error("bad\x1b[0m")
    err = capsys.readouterr().err
    assert err == ("runner: A1: removed\n"
                   "runner: warning: odd\\r\\nthing \\n\n"
                   "runner: error: bad\\x1b[0m\n")


def test_logger_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    log.Logger("runner", to_syslog=False, verbose=False).info("x")
    assert capsys.readouterr() == ("", "")


def test_logger_syslog_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    # Records what reaches the syslog module (writing the host's real log from a test is not ok).
    calls: list[tuple] = []
    monkeypatch.setattr(syslog, "openlog", lambda *a: calls.append(("openlog", *a)))
    monkeypatch.setattr(syslog, "syslog", lambda *a: calls.append(("syslog", *a)))
    logger = log.Logger("runner", to_syslog=True, verbose=False)
    logger.info("A1: removed")
    logger.warning("x\ny")
    logger.error("z")
    assert calls == [
        ("openlog", "pymailtools/runner", syslog.LOG_PID, syslog.LOG_MAIL),
        ("syslog", syslog.LOG_INFO, "A1: removed"),
        ("syslog", syslog.LOG_WARNING, "warning: x\\ny"),
        ("syslog", syslog.LOG_ERR, "error: z"),
    ]


def test_import_is_cheap() -> None:
    code = ("import sys; before = set(sys.modules); import pymailtools.log; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["pymailtools", "pymailtools.log"]
