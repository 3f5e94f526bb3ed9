"""Tests for qmgr/bounce.py: RFC 3464 reports as a mail client parses them."""

import email
import email.policy
import io
from email.message import EmailMessage, Message
from email.utils import parsedate_to_datetime

import pytest

from pymailtools.config import Config
from pymailtools.qmgr.bounce import BOUNCE_SIZE_LIMIT, make_dsn, should_bounce
from pymailtools.queue.envelope import Envelope, Recipient

ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 5 * 86400
ORIGINAL = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <20231114.ABC@example.org>\r\n"
    b"\r\n"
    b"SECRET BODY LINE\r\n"
)


def envelope(*recipients: Recipient, sender: str = "alice@example.org", ret: str = "") -> Envelope:
    return Envelope("4Xq7Lm2Za", sender, list(recipients), arrival=ARRIVAL, ret=ret)


def bounced(address: str = "bob@example.net", **kw: object) -> Recipient:
    values: dict = {"status": "5.1.1", "state": "bounced", "last_try": NOW - 60,
                    "reason": "550 5.1.1 <bob@example.net>: Recipient address rejected: "
                              "User unknown in local recipient table"}
    values.update(kw)
    return Recipient(address, **values)


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def dsn_blocks(msg: EmailMessage) -> list[Message]:
    report = msg.get_payload()[1]
    assert report.get_content_type() == "message/delivery-status"
    blocks = report.get_payload()
    assert isinstance(blocks, list)
    return blocks


def make(config: Config, env: Envelope, original: bytes = ORIGINAL, **kw: object) -> bytes:
    return make_dsn(config, env, io.BytesIO(original), env.recipients, now=NOW, **kw)


def test_structure_and_top_headers(config: Config) -> None:
    env = envelope(bounced())
    data = make(config, env)
    assert b"\r" not in data, "LF line ends only"
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in msg.get_payload()] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert msg["From"] == "MAIL DELIVERY SYSTEM <MAILER-DAEMON@host.example.test>"
    assert b"\nTo: <alice@example.org>\n" in data
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"].endswith("@host.example.test>")
    assert msg["In-Reply-To"] == "<20231114.ABC@example.org>"
    assert abs(parsedate_to_datetime(msg["Date"]).timestamp() - NOW) < 1
    assert all(not part.defects for part in msg.walk())


def test_notification_text_uses_postfix_wording(config: Config) -> None:
    msg = parse(make(config, envelope(bounced())))
    text = msg.get_payload()[0].get_content()
    assert text.startswith("This is the mail system at host host.example.test.\n")
    assert "I'm sorry to have to inform you that your message could not" in text
    assert ("<bob@example.net>: 550 5.1.1 <bob@example.net>: Recipient address rejected: "
            "User unknown in local recipient table\n") in text


def test_delivery_status_fields(config: Config) -> None:
    env = envelope(
        bounced(orcpt="Bob@Example.NET"),
        bounced("carol@example.net", status="5.2.2", reason="mailbox is full", last_try=0.0),
    )
    blocks = dsn_blocks(parse(make(config, env)))
    assert len(blocks) == 3
    head, bob, carol = blocks
    assert head["Reporting-MTA"] == "dns; host.example.test"
    assert head["X-Pymailtools-Queue-ID"] == "4Xq7Lm2Za"
    assert parsedate_to_datetime(head["Arrival-Date"]).timestamp() == ARRIVAL
    assert bob["Final-Recipient"] == "rfc822; bob@example.net"
    assert bob["Original-Recipient"] == "rfc822; Bob@Example.NET"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Diagnostic-Code"].startswith("smtp; 550 5.1.1 <bob@example.net>:")
    assert parsedate_to_datetime(bob["Last-Attempt-Date"]).timestamp() == NOW - 60
    assert carol["Final-Recipient"] == "rfc822; carol@example.net"
    assert carol["Original-Recipient"] is None
    assert carol["Status"] == "5.2.2"
    assert carol["Diagnostic-Code"] == "x-unix; mailbox is full"
    assert carol["Last-Attempt-Date"] is None


def test_typed_orcpt_is_kept_and_bad_status_replaced(config: Config) -> None:
    env = envelope(bounced(orcpt="rfc822;bob+x@example.net", status="5.1.1\r\nBcc: x"),
                   bounced("carol@example.net", status="2.0.0"))
    bob, carol = dsn_blocks(parse(make(config, env)))[1:]
    assert bob["Original-Recipient"] == "rfc822; bob+x@example.net"
    assert bob["Status"] == "5.0.0"
    assert carol["Status"] == "5.0.0"


def test_expired_recipient_keeps_temporary_status(config: Config) -> None:
    env = envelope(bounced(status="4.4.7", reason="delivery time expired (message expired)"))
    bob = dsn_blocks(parse(make(config, env)))[1]
    assert (bob["Action"], bob["Status"]) == ("failed", "4.4.7")


def test_delay_notice_never_claims_permanent_status(config: Config) -> None:
    bob = dsn_blocks(parse(make(config, envelope(bounced()), action="delayed")))[1]
    assert bob["Status"] == "4.0.0"


def test_non_ascii_address_keeps_report_ascii(config: Config) -> None:
    data = make(config, envelope(bounced("jürgen@example.net")))
    report = data.split(b"Content-Type: message/delivery-status\n\n", 1)[1].split(b"\n--", 1)[0]
    assert report.isascii()
    bob = dsn_blocks(parse(data))[1]
    assert bob["Final-Recipient"] == "utf-8; j\\x{FC}rgen@example.net"
    assert "<jürgen@example.net>:" in parse(data).get_payload()[0].get_content()


@pytest.mark.parametrize("ret", ["", "hdrs", "HDRS"])
def test_headers_returned_body_not(config: Config, ret: str) -> None:
    data = make(config, envelope(bounced(), ret=ret))
    assert b"SECRET BODY LINE" not in data
    part = parse(data).get_payload()[2]
    assert part.get_content_type() == "text/rfc822-headers"
    headers = part.get_content()
    assert "Subject: quarterly numbers\n" in headers
    assert "Message-ID: <20231114.ABC@example.org>" in headers


def test_ret_full_returns_whole_message(config: Config) -> None:
    msg = parse(make(config, envelope(bounced(), ret="full")))
    part = msg.get_payload()[2]
    assert part.get_content_type() == "message/rfc822"
    inner = part.get_payload()[0]
    assert inner["Subject"] == "quarterly numbers"
    assert inner.get_content() == "SECRET BODY LINE\n"


def test_ret_full_over_limit_returns_headers_only(config: Config) -> None:
    big = ORIGINAL + (b"x" * 70 + b"\r\n") * (BOUNCE_SIZE_LIMIT // 60)
    assert len(big) > BOUNCE_SIZE_LIMIT
    data = make(config, envelope(bounced(), ret="full"), big)
    assert len(data) < BOUNCE_SIZE_LIMIT
    part = parse(data).get_payload()[2]
    assert part.get_content_type() == "text/rfc822-headers"
    assert b"SECRET BODY LINE" not in data


def test_delay_notice(config: Config) -> None:
    env = envelope(Recipient("bob@example.net", state="deferred", status="4.4.1",
                             reason="connect to mx.example.net[192.0.2.1]:25: Connection refused"))
    msg = parse(make(config, env, action="delayed"))
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert "THIS IS A WARNING ONLY" in msg.get_payload()[0].get_content()
    bob = dsn_blocks(msg)[1]
    assert bob["Action"] == "delayed"
    assert bob["Status"] == "4.4.1"
    assert bob["Diagnostic-Code"].startswith("x-unix; connect to mx.example.net")
    until = parsedate_to_datetime(bob["Will-Retry-Until"]).timestamp()
    assert until == ARRIVAL + config.maximal_queue_lifetime


def test_unknown_action_rejected(config: Config) -> None:
    with pytest.raises(ValueError):
        make(config, envelope(bounced()), action="relayed")
    with pytest.raises(ValueError):
        make_dsn(config, envelope(bounced()), io.BytesIO(ORIGINAL), [], now=NOW)


@pytest.mark.parametrize("evil", ["\r\nBcc: x", "\nBcc: x", "\rBcc: x", "\n\nBcc: x",
                                  "\x00\x1b[2J\x85Bcc: x", "\u2028Bcc: x"])
def test_control_characters_never_make_fields(config: Config, evil: str) -> None:
    env = envelope(
        bounced(reason="550 no such user" + evil, orcpt="bob@example.net" + evil),
        bounced("carol@example.net" + evil, reason="mailbox full" + evil),
        sender="alice@example.org" + evil,
    )
    data = make(config, env)
    msg = parse(data)
    assert "Bcc" not in msg
    assert not any(line.lstrip(b"> ").startswith(b"Bcc") for line in data.split(b"\n"))
    top = data.split(b"\n\n", 1)[0].split(b"\n")
    to = [line for line in top if line.startswith(b"To:")]
    assert len(to) == 1 and to[0].startswith(b"To: <alice@example.org ")
    blocks = dsn_blocks(msg)
    assert len(blocks) == 3, "no extra report block"
    for block in blocks:
        assert "Bcc" not in block
    assert set(blocks[1].keys()) == {"Original-Recipient", "Final-Recipient", "Action", "Status",
                                     "Diagnostic-Code", "Last-Attempt-Date"}
    assert "Bcc: x" in blocks[1]["Diagnostic-Code"], "kept as text inside the field"
    text = msg.get_payload()[0].get_content()
    assert text.count("\n<") == 2, "one notification line per recipient"
    assert all(not part.defects for part in msg.walk())


def test_long_reason_is_folded_within_its_field(config: Config) -> None:
    reason = "550 " + " ".join(["word"] * 400)
    data = make(config, envelope(bounced(reason=reason)))
    assert max(len(line) for line in data.split(b"\n")) < 998
    bob = dsn_blocks(parse(data))[1]
    assert " ".join(bob["Diagnostic-Code"].split()).startswith("smtp; 550 word word")


def test_original_with_boundary_like_lines(config: Config) -> None:
    original = b"Subject: x\n--4Xq7Lm2Za.\n--\n\nbody\n--4Xq7Lm2Za.--\n"
    msg = parse(make(config, envelope(bounced(), ret="full"), original))
    assert len(msg.get_payload()) == 3


class HugeMessage(io.RawIOBase):
    """A 100 MB message that fails the test if more than 1 MB of it is ever read."""

    def __init__(self, head: bytes, size: int = 100 * 1024 * 1024) -> None:
        self.head = head
        self.size = size
        self.pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        n = min(len(buf), self.size - self.pos)
        if self.pos + n > 1024 * 1024:
            raise AssertionError("make_dsn read more than 1 MB of the message")
        for i in range(n):
            at = self.pos + i
            buf[i] = self.head[at] if at < len(self.head) else 0x61 if at % 76 else 0x0A
        self.pos += n
        return n


@pytest.mark.parametrize("ret", ["", "full"])
@pytest.mark.parametrize("head", [ORIGINAL, b"Subject: " ])  # the second never ends its headers
def test_large_message_is_not_read_whole(config: Config, ret: str, head: bytes) -> None:
    message = io.BufferedReader(HugeMessage(head))
    data = make_dsn(config, envelope(bounced(), ret=ret), message, [bounced()], now=NOW)
    assert len(data) < 2 * BOUNCE_SIZE_LIMIT
    assert parse(data).get_payload()[2].get_content_type() == "text/rfc822-headers"


def test_should_bounce() -> None:
    assert should_bounce(envelope(bounced()))
    assert not should_bounce(envelope(bounced(), sender=""))
