"""Delivery status notifications (RFC 3464): the bounce and delay reports sent to a sender."""

import os
import time
from collections.abc import Iterable
from email.utils import formatdate, make_msgid
from typing import BinaryIO

from pymailtools.config import Config
from pymailtools.queue.envelope import Envelope, Recipient

# Postfix's bounce_size_limit: above it only the headers go back (Postfix >= 2.4 does the same).
BOUNCE_SIZE_LIMIT = 50000
# RFC 5322 allows 998; keep report lines well short of it after folding.
_MAX_FIELD = 900
_FOLD_AT = 78
_MAX_LINE = 990
_CHUNK = 8192

FAILED = "failed"
DELAYED = "delayed"
_SUBJECTS = {
    FAILED: "Undelivered Mail Returned to Sender",
    DELAYED: "Delayed Mail (still being retried)",
}
_DEFAULT_STATUS = {FAILED: "5.0.0", DELAYED: "4.0.0"}


def should_bounce(env: Envelope) -> bool:
    """False for a message with the null sender: a bounce is never bounced (RFC 5321 6.1)."""
    return env.sender != ""


def make_dsn(config: Config, env: Envelope, message: BinaryIO, recipients: list[Recipient],
             *, action: str = FAILED, now: float | None = None) -> bytes:
    """The complete DSN message (LF line ends) for ``recipients`` of ``env``, to be queued from
    ``<>`` to ``env.sender``. ``message`` is read from its current position, at most
    BOUNCE_SIZE_LIMIT + 1 bytes, so a huge queue file costs no more than a small one."""
    if action not in _SUBJECTS:
        raise ValueError(f"action must be {FAILED!r} or {DELAYED!r}, not {action!r}")
    if not recipients:
        raise ValueError("a delivery status notification needs at least one recipient")
    if now is None:
        now = time.time()
    host = _ascii_field(config.myhostname)
    full = env.ret.lower() == "full"
    original, complete = _read_original(message, full)
    headers = _header_block(original)
    if full and complete:
        attached, ctype, description = original, "message/rfc822", "Undelivered Message"
    else:
        attached, ctype = headers, "text/rfc822-headers"
        description = "Undelivered Message Headers"
    attached = attached.replace(b"\r\n", b"\n")
    if attached and not attached.endswith(b"\n"):
        attached += b"\n"

    notice = _notice(config, env, recipients, action, now).encode("utf-8")
    report = _report(config, env, recipients, action).encode("ascii")
    parts = [
        (b"Content-Description: Notification\n"
         + _text_type(notice) + b"\n" + notice),
        (b"Content-Description: Delivery report\n"
         b"Content-Type: message/delivery-status\n\n" + report),
        (b"Content-Description: " + description.encode() + b"\n"
         b"Content-Type: " + ctype.encode() + b"\n"
         + _cte(attached) + b"\n" + attached),
    ]
    boundary = _boundary(env.id, host, parts)

    head = [
        f"From: MAIL DELIVERY SYSTEM <MAILER-DAEMON@{host}>",
        # No angle brackets from the sender: they could add a second address to To:.
        f"To: <{_text_field(env.sender).replace('<', '').replace('>', '')}>",
        f"Subject: {_SUBJECTS[action]}",
        f"Date: {formatdate(now, localtime=True)}",
        f"Message-ID: {make_msgid(domain=host)}",
    ]
    orig_id = _message_id(headers)
    if orig_id:
        # Lets the sender's mail client thread the report under the message it refers to.
        head += [f"In-Reply-To: {orig_id}", f"References: {orig_id}"]
    head += [
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
    ]
    eight_bit = any(_has_8bit(p) for p in parts)
    head.append(f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}")
    out = [("\n".join(head) + "\n\nThis is a MIME-encapsulated message.\n\n").encode("utf-8")]
    for part in parts:
        out.append(b"--" + boundary.encode() + b"\n" + part)
        if not part.endswith(b"\n"):
            out.append(b"\n")
        out.append(b"\n")
    out.append(b"--" + boundary.encode() + b"--\n")
    return b"".join(out)


def _read_original(message: BinaryIO, full: bool) -> tuple[bytes, bool]:
    """Up to BOUNCE_SIZE_LIMIT bytes: the whole message when ``full`` and it fits (complete is
    True), else enough to hold the header block. Never reads more than limit + 1 bytes."""
    if full:
        data = _read_at_most(message, BOUNCE_SIZE_LIMIT + 1)
        if len(data) <= BOUNCE_SIZE_LIMIT:
            return data, True
        return data[:BOUNCE_SIZE_LIMIT], False
    # Headers only: stop at the blank line, so a 100 MB body is never touched. readline with a
    # size keeps one endless line from being read whole.
    buf = bytearray()
    while len(buf) < BOUNCE_SIZE_LIMIT:
        line = message.readline(BOUNCE_SIZE_LIMIT - len(buf))
        if not line:
            break
        buf += line
        if line in (b"\n", b"\r\n"):
            break
    return bytes(buf), False


def _read_at_most(message: BinaryIO, limit: int) -> bytes:
    buf = bytearray()
    while len(buf) < limit:
        chunk = message.read(min(_CHUNK, limit - len(buf)))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _header_block(data: bytes) -> bytes:
    """The header lines of ``data`` (without the blank line), cut at the last whole line."""
    data = data.replace(b"\r\n", b"\n")
    if data.startswith(b"\n"):
        return b""
    end = data.find(b"\n\n")
    if end >= 0:
        return data[: end + 1]
    # No blank line within the limit: keep only complete lines (a cut header is still a header).
    cut = data.rfind(b"\n")
    return data[: cut + 1] if cut >= 0 else b""


def _message_id(headers: bytes) -> str:
    """The original Message-ID when it is a plain ``<...>`` token, else "" (never copy junk)."""
    value: str | None = None
    for raw in headers.decode("ascii", "replace").split("\n"):
        line = raw.rstrip("\r")
        if value is not None:
            if line[:1] in (" ", "\t"):
                value += line.strip()
                continue
            break
        name, colon, rest = line.partition(":")
        if colon and name.strip().lower() == "message-id":
            value = rest.strip()
    if not value or len(value) > 250 or not (value.startswith("<") and value.endswith(">")):
        return ""
    if not all("!" <= ch <= "~" for ch in value) or value.count("<") != 1:
        return ""
    return value


def _notice(config: Config, env: Envelope, recipients: Iterable[Recipient], action: str,
            now: float) -> str:
    host = _text_field(config.myhostname)
    if action == FAILED:
        lines = [
            f"This is the mail system at host {host}.",
            "",
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It's attached below.",
        ]
    else:
        hours = max(0, int((now - env.arrival) // 3600))
        days = max(1, config.maximal_queue_lifetime // 86400)
        lines = [
            f"This is the mail system at host {host}.",
            "",
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            f"Your message could not be delivered for more than {hours} hour(s).",
            f"It will be retried until it is {days} day(s) old.",
        ]
    lines += [
        "",
        "For further assistance, please send mail to postmaster.",
        "",
        "If you do so, please include this problem report. You can",
        "delete your own text from the attached returned message.",
        "",
        "                   The mail system",
        "",
    ]
    for r in recipients:
        reason = _text_field(r.reason) or ("delivery temporarily suspended" if action == DELAYED
                                           else "undeliverable")
        lines.append(f"<{_text_field(r.address)}>: {reason}"[:_MAX_LINE])
    return "\n".join(lines) + "\n"


def _report(config: Config, env: Envelope, recipients: Iterable[Recipient], action: str) -> str:
    """The message/delivery-status body: one per-message block, one block per recipient."""
    blocks = [[
        f"Reporting-MTA: dns; {_ascii_field(config.myhostname)}",
        f"X-Pymailtools-Queue-ID: {_ascii_field(env.id)}",
    ]]
    if env.sender:
        blocks[0].append(f"X-Pymailtools-Sender: {_address_field(env.sender)}")
    if env.envid:
        blocks[0].insert(0, f"Original-Envelope-Id: {_ascii_field(env.envid)}")
    if env.arrival:
        blocks[0].append(f"Arrival-Date: {formatdate(env.arrival, localtime=True)}")
    for r in recipients:
        # RFC 3464 2.3 order: Original-Recipient comes first.
        block = [f"Original-Recipient: {_orcpt_field(r.orcpt)}"] if r.orcpt else []
        block += [
            f"Final-Recipient: {_address_field(r.address)}",
            f"Action: {action}",
            f"Status: {_status(r.status, action)}",
        ]
        reason = _ascii_field(r.reason)
        if reason:
            kind = "smtp" if reason[:3].isdigit() else "x-unix"
            block.append(f"Diagnostic-Code: {kind}; {reason}")
        if r.last_try:
            block.append(f"Last-Attempt-Date: {formatdate(r.last_try, localtime=True)}")
        if action == DELAYED and env.arrival:
            until = env.arrival + config.maximal_queue_lifetime
            block.append(f"Will-Retry-Until: {formatdate(until, localtime=True)}")
        blocks.append(block)
    return "\n\n".join("\n".join(_fold(line) for line in block) for block in blocks) + "\n"


def _status(status: str, action: str) -> str:
    """The RFC 3463 code when it is well formed and fits the action, else a generic one.

    A failed recipient may carry 4.x.x: mail that expired after temporary failures keeps its
    last temporary status (4.4.7 or the last reply), as Postfix reports it."""
    parts = status.split(".")
    well_formed = (len(parts) == 3 and all(p.isascii() and p.isdigit() for p in parts)
                   and len(parts[0]) == 1 and len(parts[1]) <= 3 and len(parts[2]) <= 3)
    allowed = "45" if action == FAILED else "4"
    if well_formed and parts[0] in allowed:
        return status
    return _DEFAULT_STATUS[action]


def _address_field(address: str) -> str:
    """``rfc822; addr``, or RFC 6533's ``utf-8; addr`` with \\x{HEX} for a non-ASCII address."""
    kind = "rfc822" if address.isascii() else "utf-8"
    return f"{kind}; {_ascii_field(address)}"


def _orcpt_field(orcpt: str) -> str:
    # ORCPT from an SMTP client already carries its type ("rfc822;bob@x"); ours is a bare address.
    kind, semi, addr = orcpt.partition(";")
    if semi and kind.strip() and all(ch.isalnum() or ch == "-" for ch in kind.strip()):
        return f"{_ascii_field(kind.strip())}; {_ascii_field(addr.strip())}"
    return _address_field(orcpt)


def _text_field(value: str) -> str:
    """One line of text: every control character (CR, LF, NUL, ESC, DEL, C1) becomes white
    space and runs of white space one space, so a remote reply or an address can never start a
    header or report field of its own, nor make an empty continuation line when folded."""
    out = "".join(" " if (ch < " " or "\x7f" <= ch <= "\x9f" or ch in "\u2028\u2029"
                          or "\ud800" <= ch <= "\udfff") else ch for ch in value)
    return " ".join(out.split())[:_MAX_FIELD]


def _ascii_field(value: str) -> str:
    """A text field for the delivery-status part, which must be US-ASCII (RFC 3464): non-ASCII
    characters become RFC 6533's \\x{HEX}; the result stays within _MAX_FIELD."""
    out, size = [], 0
    for ch in _text_field(value):
        piece = ch if ch.isascii() else f"\\x{{{ord(ch):X}}}"
        size += len(piece)
        if size > _MAX_FIELD:
            break
        out.append(piece)
    return "".join(out)


def _fold(line: str) -> str:
    """Fold a long field at spaces; continuation lines start with white space, so they stay
    part of the same field for every parser."""
    if len(line) <= _FOLD_AT:
        return line
    out, cur = [], ""
    for word in line.split(" "):
        if cur and len(cur) + 1 + len(word) > _FOLD_AT:
            out.append(cur)
            cur = " " + word
        else:
            cur = f"{cur} {word}" if cur else word
    out.append(cur)
    return "\n".join(out)


def _text_type(body: bytes) -> bytes:
    if _has_8bit(body):
        return b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n"
    return b"Content-Type: text/plain; charset=us-ascii\n"


def _cte(body: bytes) -> bytes:
    return b"Content-Transfer-Encoding: 8bit\n" if _has_8bit(body) else b""


def _has_8bit(data: bytes) -> bool:
    return not data.isascii()


def _boundary(qid: str, host: str, parts: list[bytes]) -> str:
    """A boundary that occurs in none of the parts (the original is copied verbatim)."""
    while True:
        token = os.urandom(12).hex()
        boundary = f"{_ascii_field(qid)}.{int(time.time())}.{token}/{host}"
        # RFC 2046: at most 70 characters from a restricted set; keep it conservative.
        boundary = "".join(ch for ch in boundary if ch.isalnum() or ch in "./-_")[:70]
        marker = b"--" + boundary.encode()
        if not any(marker in p for p in parts):
            return boundary
