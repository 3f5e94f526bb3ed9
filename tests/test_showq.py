"""The queue listing: Postfix's mailq text and postqueue -j JSON, proven against real Postfix."""

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymailtools.admin.listing import (
    HEADING,
    items,
    json_lines,
    listing,
    summary,
)
from pymailtools.queue.active import active_ids
from pymailtools.queue.envelope import BOUNCED, DEFERRED, SENT, Envelope, Recipient
from pymailtools.queue.format import json_quote
from pymailtools.queue.select import Selector
from pymailtools.queue.store import HOLD, INCOMING, Queue
from tests.conftest import need_root, need_tool
from tests.support.queue import REFUSED, deferred, put

GREY = ("host 127.0.0.1[127.0.0.1] said: 450 4.2.0 <{0}>: Recipient address rejected: "
        "Greylisted, see http://postgrey.example/ (in reply to RCPT TO command)")


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Postfix prints local time; the captured samples were taken in UTC."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def queue(tmp_path: Path) -> Queue:
    q = Queue(str(tmp_path / "q"))
    q.ensure()
    return q


# Verbatim from Postfix 3.7.11's mailq (long ids, the `!` marker for hold): scripts parse it.
SAMPLE_LONG = """\
----Queue ID----- --Size-- ---Arrival Time---- --Sender/Recipient------
4jXmGN2qFnzJF4M        262 Sun Nov 22 23:57:32 alice@example.org
                       (connect to 127.0.0.1[127.0.0.1]:9: Connection refused)
                                               carol@example.com
                                               bob@example.net

4jXmGN2v1gzJF4L!       248 Sun Nov 22 23:57:32 MAILER-DAEMON
                       (connect to 127.0.0.1[127.0.0.1]:9: Connection refused)
                                               dave@example.org

-- 0 Kbytes in 2 Requests.
"""


def test_long_id_sample_byte_for_byte(queue: Queue, utc: None) -> None:
    put(queue, "4jXmGN2qFnzJF4M", "alice@example.org",
        [deferred("carol@example.com"), deferred("bob@example.net")])
    put(queue, "4jXmGN2v1gzJF4L", "", [deferred("dave@example.org")], state=HOLD, size=248)
    assert "".join(listing(queue, 10**7)) == SAMPLE_LONG


def test_reason_runs_long_reasons_unavailable_and_singular_trailer(queue: Queue,
                                                                   utc: None) -> None:
    """Greylisting sample: a reason longer than 76 characters starts at column 0; one reason
    line per run of recipients sharing it; `(reason unavailable)` after a reason; done
    recipients are not listed; `1 Request`; Kbytes rounded down."""
    put(queue, "7148820E81Fxyz", "sender@example.org",
        [deferred("t1@grey.example", GREY.format("t1@grey.example")),
         deferred("t2@grey.example", GREY.format("t2@grey.example")),
         Recipient("sent@x.example", state=SENT), Recipient("b@x.example", state=BOUNCED),
         deferred("t3@grey.example", GREY.format("t2@grey.example")),
         Recipient("new@x.example")], size=2047, arrival=1795391343.0)
    out = "".join(listing(queue, 10**7)).split("\n")
    assert out[1] == "7148820E81Fxyz        2047 Sun Nov 22 23:49:03 sender@example.org"
    assert out[2] == "(" + GREY.format("t1@grey.example") + ")"
    assert out[3] == " " * 47 + "t1@grey.example"
    assert out[4] == "(" + GREY.format("t2@grey.example") + ")"
    assert out[5:7] == [" " * 47 + "t2@grey.example", " " * 47 + "t3@grey.example"]
    assert out[7] == " " * 58 + "(reason unavailable)" and len(out[7]) == 78
    assert out[8] == " " * 47 + "new@x.example"
    assert out[9:] == ["", "-- 1 Kbytes in 1 Request.", ""]
    assert "sent@x.example" not in "\n".join(out) and "b@x.example" not in "\n".join(out)


def test_short_reason_ends_at_column_78(queue: Queue) -> None:
    put(queue, "A1", "s@x.test", [deferred("r@y.test")])
    line = "".join(listing(queue, 10**7)).splitlines()[2]
    assert line == " " * 23 + "(" + REFUSED + ")" and len(line) == 78


def test_empty_queue(queue: Queue, tmp_path: Path) -> None:
    assert "".join(listing(queue, 10**7)) == "Mail queue is empty\n"
    assert "".join(listing(Queue(str(tmp_path / "missing")), 10**7)) == "Mail queue is empty\n"
    assert "".join(json_lines(queue, 10**7)) == ""


def test_active_marker_for_an_entry_being_delivered(queue: Queue) -> None:
    busy = put(queue, "Busy1", "s@x.test", [Recipient("r@y.test")], state=INCOMING)
    put(queue, "Idle1", "s@x.test", [Recipient("r@y.test")], state=INCOMING)
    fd = queue.lock(busy)  # the lock a runner holds while delivering
    try:
        assert active_ids(queue) in ({"Busy1"}, None)  # None: /proc/locks not usable here
        text = "".join(listing(queue, 10**7))
        lines = [x for x in (json.loads(j) for j in json_lines(queue, 10**7))]
    finally:
        os.close(fd)
    assert re.search(r"^Busy1\*\s+262 ", text, re.M) and re.search(r"^Idle1\s+262 ", text, re.M)
    assert {x["queue_id"]: x["queue_name"] for x in lines} == {"Busy1": "active",
                                                               "Idle1": "incoming"}
    assert "".join(listing(queue, 10**7)).count("*") == 0  # released: no longer active


def test_active_marker_without_proc_locks(queue: Queue,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Where /proc/locks cannot be trusted, each entry's lock is probed instead."""
    import pymailtools.queue.active as active

    monkeypatch.setattr(active, "_proc_locks", lambda: None)
    busy = put(queue, "Busy2", "s@x.test", [Recipient("r@y.test")], state=INCOMING)
    fd = queue.lock(busy)
    try:
        assert active.active_ids(queue) is None
        assert "Busy2*" in "".join(listing(queue, 10**7))
    finally:
        os.close(fd)


def test_hostile_sender_and_reason_are_escaped(queue: Queue) -> None:
    """A terminal escape in a reason and CR LF in a sender stay on their line."""
    put(queue, "Evil1", '"\r\n"@x.test', [deferred("r@y.test", "x\x1b]0;x\x07 \u009b2J")])
    text = "".join(listing(queue, 10**7))
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    assert "\u009b" not in text
    lines = text.splitlines()
    assert lines[1].endswith(' "??"@x.test') and lines[2].endswith("(x?]0;x? ?2J)")
    assert len(lines) == 6
    (obj,) = [json.loads(x) for x in json_lines(queue, 10**7)]
    assert obj["sender"] == '"\r\n"@x.test'
    assert obj["recipients"][0]["delay_reason"] == "x\x1b]0;x\x07 \u009b2J"


def test_json_quote_matches_postfix() -> None:
    assert json_quote('a"b\\c/d') == 'a\\"b\\\\c/d'
    assert json_quote("\b\f\n\r\t") == "\\b\\f\\n\\r\\t"
    assert json_quote("\x1b\x00\x7f") == "\\u001B\\u0000\\u007F"
    assert json_quote("caf\u00e9 \udcff") == "caf\u00e9 ?"  # UTF-8 kept, stray bytes '?'


# Verbatim from Postfix 3.7.11's postqueue -j (the entries we can express: deferred, hold).
SAMPLE_JSON = [
    '{"queue_name": "deferred", "queue_id": "6FB4620E81B", "arrival_time": 1795391343, '
    '"message_size": 275, "forced_expire": false, "sender": "alice@example.org", "recipients": '
    '[{"address": "dave@example.com", "delay_reason": "connect to 127.0.0.1[127.0.0.1]:9: '
    'Connection refused"}, {"address": "carol@example.net", "delay_reason": "connect to '
    '127.0.0.1[127.0.0.1]:9: Connection refused"}]}',
    '{"queue_name": "hold", "queue_id": "4jXmGN2v1gzJF4L", "arrival_time": 1795391852, '
    '"message_size": 248, "forced_expire": false, "sender": "MAILER-DAEMON", "recipients": '
    '[{"address": "dave@example.org", "delay_reason": "connect to 127.0.0.1[127.0.0.1]:9: '
    'Connection refused"}]}',
]


def test_json_lines_match_postfix_sample(queue: Queue) -> None:
    put(queue, "6FB4620E81B", "alice@example.org",
        [deferred("dave@example.com"), deferred("carol@example.net")], arrival=1795391343.9,
        size=275)
    put(queue, "4jXmGN2v1gzJF4L", "", [deferred("dave@example.org")], state=HOLD, size=248)
    assert "".join(json_lines(queue, 10**7)).splitlines() == SAMPLE_JSON


def test_selectors_narrow_the_listing(queue: Queue) -> None:
    now = time.time()
    put(queue, "Old1", "spam@evil.test", [deferred("a@gmail.com")], arrival=now - 7200)
    put(queue, "New1", "ok@good.test", [deferred("b@gmail.com", "450 greylisted")],
        arrival=now)
    put(queue, "Held1", "ok@good.test", [deferred("c@example.org")], state=HOLD, arrival=now)

    def ids(sel: Selector) -> set[str]:
        return {i.envelope.id for i in items(queue, 10**7, sel)}

    assert ids(Selector(senders=["spam@evil.test"])) == {"Old1"}
    assert ids(Selector(recipients=["@gmail.com"])) == {"Old1", "New1"}
    assert ids(Selector(older_than=now - 3600)) == {"Old1"}
    assert ids(Selector(newer_than=now - 3600)) == {"New1", "Held1"}
    assert ids(Selector(queues=["hold"])) == {"Held1"}
    assert ids(Selector(reasons=["greylisted"])) == {"New1"}
    text = "".join(listing(queue, 10**7, Selector(recipients=["@gmail.com"],
                                                   senders=["ok@good.test"])))
    assert text.startswith(HEADING) and text.endswith("-- 0 Kbytes in 1 Request.\n")


def test_summary_agrees_with_the_full_parser() -> None:
    env = Envelope("Q1", "s p@x", [Recipient("a b@c", state=DEFERRED, reason="r %\n"),
                                   Recipient("d@e", state=SENT)], arrival=1.5, size=7)
    s = summary(env.to_bytes())
    assert (s.id, s.sender, s.arrival, s.size) == ("Q1", "s p@x", 1.5, 7)
    assert [(r.address, r.state, r.reason) for r in s.recipients] == [
        ("a b@c", DEFERRED, "r %\n"), ("d@e", SENT, "")]
    with pytest.raises(ValueError):
        summary(env.to_bytes()[:-3] + b"9\n")  # wrong end record: torn file


# --- against a real Postfix ---------------------------------------------------------------

@pytest.fixture
def postfix(tmp_path: Path) -> Path:
    """A private Postfix instance (own config and queue directories, no master, no network)."""
    postfix = need_tool("postfix", "postfix")
    need_root()
    conf = tmp_path / "postfix"
    for sub in ("queue", "data"):
        (conf / sub).mkdir(parents=True)
    (conf / "main.cf").write_text(
        f"queue_directory = {conf / 'queue'}\ndata_directory = {conf / 'data'}\n"
        "compatibility_level = 3.6\nmail_owner = postfix\nsetgid_group = postdrop\n"
        "myhostname = mx.example.test\ninet_interfaces = loopback-only\n"
        "enable_long_queue_ids = yes\n")
    subprocess.run([postfix, "-c", str(conf), "post-install", "create-missing"],
                   capture_output=True, check=True)
    return conf


def test_layout_and_json_types_match_real_postfix(postfix: Path, queue: Queue) -> None:
    """The same message in Postfix's queue and ours: the heading, the entry lines and the
    trailer agree once id, size and date are set aside; the JSON keys, their order and the
    value types are Postfix's."""
    sendmail = need_tool("sendmail", "postfix")
    rcpts = ["bob@example.net", "carol@example.com"]
    subprocess.run([sendmail, "-C", str(postfix), "-f", "alice@example.org", *rcpts],
                   input=b"Subject: t\n\nhi\n", capture_output=True, check=True)
    pq = need_tool("postqueue", "postfix")
    theirs = subprocess.run([pq, "-c", str(postfix), "-p"], capture_output=True,
                            check=True).stdout.decode()
    theirs_json = subprocess.run([pq, "-c", str(postfix), "-j"], capture_output=True,
                                 check=True).stdout.decode()
    pf = json.loads(theirs_json)
    put(queue, pf["queue_id"], "alice@example.org", [Recipient(r) for r in rcpts],
        state=INCOMING, arrival=pf["arrival_time"], size=pf["message_size"])
    ours = "".join(listing(queue, 10**7))
    assert ours == theirs
    (mine,) = [json.loads(x) for x in json_lines(queue, 10**7)]
    assert list(mine) == list(pf)
    assert {k: type(v) for k, v in mine.items()} == {k: type(v) for k, v in pf.items()}
    assert [list(r) for r in mine["recipients"]] == [list(r) for r in pf["recipients"]]
    pf["queue_name"] = "incoming"  # it sits in Postfix's maildrop, ours was picked up
    assert mine == pf
    one_line = "".join(json_lines(queue, 10**7))
    assert one_line.count("\n") == 1 and ", " in one_line and '": ' in one_line
