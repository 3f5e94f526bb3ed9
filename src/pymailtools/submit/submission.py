"""Submission: stream a message from a file object into the queue, adding what it lacks.

This is sendmail's hot path (cron, scripts): only modules Python has already loaded at start-up,
plus pwd/binascii (C), are imported here. The message is never held in memory whole.
"""

import os
import pwd
import time

from pymailtools import address
from pymailtools.config import Config
from pymailtools.errors import EX_TEMPFAIL, EX_UNAVAILABLE, MailError, TooBigError, UsageError
from pymailtools.queue.envelope import BOUNCED, Envelope, Recipient
from pymailtools.queue.intake import QueueDir, Submission, crash_point

# On sendmail's hot path: no typing (~10 ms of start-up) and no `from __future__ import
# annotations` (importing __future__ costs more than evaluating these annotations); the
# names imported for the type checker alone are quoted where they annotate.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import BinaryIO

    from pymailtools.rewrite import Rewriter

CHUNK = 65536
# Header names (lower case) whose values give recipients under -t.
_RCPT_HEADERS = ("to", "cc", "bcc")
_RESENT_HEADERS = ("resent-to", "resent-cc", "resent-bcc")


class Options:
    """What a front end (sendmail, mail) asks of one submission."""

    __slots__ = ("recipients", "sender", "fullname", "extract", "ignore_dots", "envid", "ret",
                 "notify", "uid", "received", "mailbox_lines")

    def __init__(self, recipients: list[str] | None = None, sender: str | None = None,
                 fullname: str | None = None, extract: bool = False, ignore_dots: bool = False,
                 envid: str = "", ret: str = "", notify: str = "",
                 uid: int | None = None,
                 received: "Callable[[str], str] | None" = None,
                 mailbox_lines: bool = False) -> None:
        self.recipients = list(recipients or [])
        self.sender = sender
        self.fullname = fullname
        self.extract = extract
        self.ignore_dots = ignore_dots
        self.envid = envid
        self.ret = ret
        self.notify = notify
        self.uid = os.getuid() if uid is None else uid
        # The SMTP listener's own Received: header, given the queue id (LF line ends); None
        # for the local-submission one.
        self.received = received
        # Leading mbox From_ lines: dropped as envelope (sendmail, as Postfix's postdrop), or
        # kept as X-Mailbox-Line: headers (the listener, as Postfix's smtpd): over SMTP they
        # are the sender's text ("From the desk of ...").
        self.mailbox_lines = mailbox_lines


def login_name(uid: int) -> tuple[str, str]:
    """(login, GECOS full name) of a uid; the uid as text when it has no passwd entry.
    Looked up once per process (the listener submits thousands of messages as one uid)."""
    known = _LOGINS.get(uid)
    if known is None:
        try:
            pw = pwd.getpwuid(uid)
            known = pw.pw_name, pw.pw_gecos.split(",", 1)[0]
        except KeyError:
            known = str(uid), ""
        _LOGINS[uid] = known
    return known


_LOGINS: dict[int, tuple[str, str]] = {}


def rfc5322_date(t: float) -> str:
    # time.strftime uses the C locale for %a/%b: Python never calls setlocale(LC_TIME).
    return time.strftime("%a, %d %b %Y %H:%M:%S %z", time.localtime(t))


def _clean_phrase(name: str) -> str:
    """A display name safe for one header line: controls → space, quoted or RFC 2047."""
    name = " ".join("".join(" " if ord(c) < 0x20 or c == "\x7f" else c for c in name).split())
    if not name:
        return ""
    if not name.isascii():
        # binascii stays off the submission path unless a name is not ASCII
        import binascii

        b64 = binascii.b2a_base64(name.encode("utf-8"), newline=False).decode("ascii")
        return f"=?utf-8?b?{b64}?="
    if any(c in name for c in '()<>[]:;@\\,."'):
        return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return name


def _is_header_line(line: bytes) -> bool:
    if line[:1] in (b" ", b"\t"):
        return True
    colon = line.find(b":")
    if colon <= 0:
        return False
    return all(33 <= c <= 126 for c in line[:colon])


class _Input:
    """Line/chunk reader applying sendmail's input rules: CRLF → LF, lone '.' ends input."""

    def __init__(self, src: "BinaryIO", ignore_dots: bool) -> None:
        self.src = src
        self.ignore_dots = ignore_dots
        self.ended = False

    def line(self) -> bytes:
        """One normalised line (with its LF unless at EOF); b'' at the end of input."""
        if self.ended:
            return b""
        line = self.src.readline(CHUNK)
        if line.endswith(b"\r") and len(line) == CHUNK:
            line += self.src.read(1)  # keep a CRLF split by the length bound together
        if line.endswith(b"\n"):
            body = line[:-1].rstrip(b"\r")
            line = body + b"\n"
        else:
            body = line.rstrip(b"\r") if line and len(line) < CHUNK else line
            line = body
        if not self.ignore_dots and body == b".":
            self.ended = True
            return b""
        if not line:
            self.ended = True
        return line

    def chunks(self, at_line_start: bool) -> "Iterator[bytes]":
        """The rest of the input in large normalised chunks (the body fast path)."""
        carry = b""
        while not self.ended:
            data = self.src.read(CHUNK)
            if not data:
                self.ended = True
                break
            data = carry + data
            nl = data.rfind(b"\n")
            if nl < 0 and len(data) < 4 * CHUNK:
                carry = data
                continue
            if nl < 0:  # a very long line: pass it on, keeping a trailing CR for its LF
                keep = 1 if data.endswith(b"\r") else 0
                out, carry = data[: len(data) - keep], data[len(data) - keep :]
                at_line_start = False
                yield out
                continue
            out, carry = data[: nl + 1], data[nl + 1 :]
            while b"\r\n" in out:
                out = out.replace(b"\r\n", b"\n")
            if not self.ignore_dots:
                if at_line_start and out.startswith(b".\n"):
                    self.ended = True
                    return
                dot = out.find(b"\n.\n")
                if dot >= 0:
                    self.ended = True
                    yield out[: dot + 1]
                    return
            at_line_start = True
            yield out
        if carry:
            tail = carry[:-1] if carry.endswith(b"\r") else carry
            if self.ignore_dots or not (at_line_start and tail == b"."):
                yield tail


def submit(config: Config, src: "BinaryIO", opts: Options, queue: QueueDir | None = None) -> str:
    """Queue the message read from ``src``; return its queue id once it is durable.

    ``queue``: one the caller has already set up (``Queue.ensure``), as the runner and the SMTP
    listener do once at their start; without it, the queue of ``config``, created as needed.
    Raises UsageError (no recipients), AddressError, TooBigError, QueueWriteError.
    """
    sub, env = stage(config, src, opts, queue)
    return sub.commit(env)


def stage(config: Config, src: "BinaryIO", opts: Options,
          queue: QueueDir | None = None) -> "tuple[Submission, Envelope]":
    """``submit`` up to its commit: the message written (not yet fsynced) and its envelope.
    The caller commits it (``Submission.commit``, or ``intake.commit_group`` with others) or
    aborts it."""
    if not opts.recipients and not opts.extract:
        raise UsageError(
            "Recipient addresses must be specified on the command line or via the -t option")
    user, gecos = login_name(opts.uid)
    origin = config.myorigin
    sender = address.qualify(user, origin) if opts.sender is None else opts.sender
    recipients: list[str] = list(opts.recipients)
    rw: Rewriter | None = None
    if config.rewrites:
        # Only with a rewriting key set: sendmail's hot path imports nothing more otherwise.
        from pymailtools import rewrite

        rw = rewrite.for_config(config)
    if queue is None:
        queue = QueueDir(config.queue_directory)
        if os.geteuid() == 0 or not os.path.isdir(queue.root):
            queue.ensure(config.public_listing)
    sub = queue.submission()
    try:
        _copy_message(config, src, sub, opts, sender, gecos, recipients, rw)
    except BaseException:
        sub.abort()
        raise
    if not recipients:
        sub.abort()
        raise UsageError("no recipient addresses found in message header")
    rcpts = []
    if rw is None:
        seen: set[str] = set()
        for r in recipients:
            if r.lower() not in seen:
                seen.add(r.lower())
                rcpts.append(Recipient(r, orcpt=r, notify=opts.notify))
    else:
        try:
            for a in (sender, *recipients):
                rw.check_envelope(a)
            sender = rw.sender(sender) if sender else sender
            rewritten = rw.recipients(recipients)
        except MailError as e:
            sub.abort()
            raise _not_queued(e) from None
        except BaseException:
            sub.abort()
            raise
        for r, orig, refused in rewritten:
            if refused is None:
                rcpts.append(Recipient(r, orcpt=orig, notify=opts.notify))
            else:  # bounced by the queue manager's first run, with this reason
                rcpts.append(Recipient(r, orcpt=orig, notify=opts.notify, state=BOUNCED,
                                       status=refused.status, reason=refused.reason))
    env = Envelope(sub.id, sender, rcpts, arrival=time.time(), uid=opts.uid, user=user,
                   envid=opts.envid, ret=opts.ret)
    return sub, env


def _not_queued(e: MailError) -> MailError:
    """A rewriting failure as submission reports it. A temporary one (a table that cannot
    answer now, a virtual alias limit) must not exit 75: callers such as PHP's mail() take 75
    for "queued", and nothing is."""
    if e.exit_code != EX_TEMPFAIL:
        return e
    return MailError(f"message not queued: {e}", EX_UNAVAILABLE)


def _copy_message(config: Config, src: "BinaryIO", sub: Submission, opts: Options, sender: str,
                  gecos: str, recipients: list[str], rw: "Rewriter | None") -> None:
    """Write the message into ``sub``: our headers, the caller's headers, then the body."""
    inp = _Input(src, opts.ignore_dots)
    limit = config.message_size_limit
    # Pieces are gathered up to CHUNK and written together: a small message (our headers,
    # the separator, the body) is one write system call instead of three.
    pending: list[bytes] = []
    held = 0

    def out(data: bytes) -> None:
        nonlocal held
        if limit and sub.size + held + len(data) > limit:
            raise TooBigError("message file too big")
        pending.append(data)
        held += len(data)
        if held >= CHUNK:
            flush()

    def flush() -> None:
        nonlocal held
        if pending:
            sub.write(pending[0] if len(pending) == 1 else b"".join(pending))
            pending.clear()
            held = 0

    # Leading mbox From_ lines are envelope, not message (Postfix skips ^>*From ).
    mailbox_lines: list[bytes] = []
    line = inp.line()
    while line.lstrip(b">").startswith(b"From "):
        if opts.mailbox_lines:
            mailbox_lines.append(b"X-Mailbox-Line: " + line.rstrip(b"\n") + b"\n")
        line = inp.line()

    headers: list[bytes] = []  # one entry per header, continuation lines included
    size = 0
    while line and line != b"\n" and size < config.header_size_limit:
        if not _is_header_line(line) or (line[:1] in b" \t" and not headers):
            break
        if line[:1] in b" \t":
            headers[-1] += line
        else:
            headers.append(line)
        size += len(line)
        line = inp.line()
    after = line  # the blank separator, the first body line, or b'' at EOF
    overflow = size >= config.header_size_limit  # `after` is still a header line

    names = [h.split(b":", 1)[0].strip().lower().decode("ascii", "replace") for h in headers]
    if opts.extract:
        use = _RESENT_HEADERS if any(n.startswith("resent-") for n in names) else _RCPT_HEADERS
        for n, h in zip(names, headers, strict=True):
            if n in use:
                value = h.split(b":", 1)[1].decode("utf-8", "surrogateescape")
                recipients.extend(address.parse_recipients(value.replace("\n", " "),
                                                           config.myorigin))
        headers = [h for n, h in zip(names, headers, strict=True)
                   if n not in ("bcc", "resent-bcc")]
    now = time.time()
    host = config.myhostname
    if opts.received is not None:
        top = opts.received(sub.id)
    else:
        top = (f"Received: by {host} (pymailtools, from userid {opts.uid})\n"
               f"\tid {sub.id}; {rfc5322_date(now)}\n")
    extra = []
    if "date" not in names:
        extra.append(f"Date: {rfc5322_date(now)}\n")
    if "message-id" not in names:
        extra.append(f"Message-ID: <{sub.id}@{host}>\n")
    if "from" not in names:
        name = _clean_phrase(opts.fullname if opts.fullname is not None
                             else os.environ.get("NAME", gecos))
        addr = sender or f"MAILER-DAEMON@{host}"
        extra.append(f"From: {name} <{addr}>\n" if name else f"From: {addr}\n")
    added = "".join(extra).encode("utf-8", "surrogateescape")
    if rw is not None:  # canonical maps and masquerading of the header addresses
        try:
            headers = [rw.header(h) for h in headers]
            added = b"".join(rw.header(h) for h in added.splitlines(keepends=True))
        except MailError as e:
            raise _not_queued(e) from None
    out(top.encode("utf-8", "surrogateescape") + b"".join(mailbox_lines) + b"".join(headers)
        + added)
    if after == b"\n" or overflow:
        out(after)
    elif after:
        out(b"\n" + after)  # the body began without a separator: supply one
    crash_point("after_headers")
    at_line_start = not after or after.endswith(b"\n")
    for chunk in inp.chunks(at_line_start):
        out(chunk)
        crash_point("mid_write")
    flush()
