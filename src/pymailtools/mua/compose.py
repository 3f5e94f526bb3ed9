"""Building a new message (headers, text body, attachments) as RFC 5322 / MIME bytes."""

from __future__ import annotations

import mimetypes
import os
import stat
from dataclasses import dataclass, field
from email.message import EmailMessage, Message
from email.policy import SMTP
from email.utils import formataddr, formatdate, make_msgid, quote

from pymailtools import address
from pymailtools.errors import EX_NOINPUT, AddressError, MailError, UsageError

# LF line ends: the queue stores LF (submit normalises anyway) and the SMTP client adds CRs.
POLICY = SMTP.clone(linesep="\n")
# Headers the composer writes itself from its own fields; -a 'Name: value' may not add a second.
_OWN = frozenset({"to", "cc", "bcc", "subject", "from", "date", "message-id"})
_CONTENT = frozenset({"content-type", "content-transfer-encoding", "mime-version"})
# Attachments larger than this are refused before anything is read into memory.
MAX_ATTACHMENT = 64 * 1024 * 1024


class AttachmentError(MailError):
    """An -a / ~a file is missing, unreadable or not a regular file (66)."""

    exit_code = EX_NOINPUT


def check_header_text(value: str, what: str) -> str:
    """Refuse CR, LF and NUL, the characters that could start a new header (exit 64)."""
    for ch in ("\r", "\n", "\x00"):
        if ch in value:
            raise UsageError(f"{what} contains a line break or NUL character: {value!r}")
    return value


def strip_controls(value: str) -> str:
    """Other C0 controls and DEL (ESC sequences) never reach a header: a terminal showing the
    header later would obey them."""
    return "".join(c for c in value if c == "\t" or not (ord(c) < 0x20 or c == "\x7f"))


def is_header_argument(arg: str) -> bool:
    """Whether ``arg`` has the shape ``Name: value`` of a bsd-mailx ``-a`` header."""
    name, colon, _ = arg.partition(":")
    return bool(colon) and bool(name) and all(33 <= ord(c) <= 126 for c in name)


@dataclass
class Attachment:
    """A file to attach: its bytes, MIME type and the name shown to the recipient."""

    filename: str
    data: bytes
    maintype: str
    subtype: str

    @classmethod
    def from_path(cls, path: str) -> Attachment:
        """Read ``path``; non-regular files (FIFOs, devices, /proc) are refused, never read."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise AttachmentError(f"{path}: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise AttachmentError(f"{path}: not a regular file")
            if st.st_size > MAX_ATTACHMENT:
                raise AttachmentError(f"{path}: file too large to attach", 65)
            data = f.read(MAX_ATTACHMENT + 1)
        ctype, encoding = mimetypes.guess_type(os.path.basename(path), strict=False)
        if encoding is not None:  # .gz etc.: the bytes are compressed
            ctype = "application/octet-stream"
        elif ctype is None:  # no telling extension: plain text if it reads as such
            ctype = "text/plain" if _looks_like_text(data) else "application/octet-stream"
        maintype, _, subtype = ctype.partition("/")
        name = os.path.basename(path)
        # A name from argv may carry undecodable bytes (surrogates): show a safe form.
        name = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return cls(name, data, maintype, subtype)


@dataclass
class Draft:
    """A message being composed: what the command line, the headers given and ~ escapes set."""

    to: list[str] = field(default_factory=list)
    cc: list[str] = field(default_factory=list)
    bcc: list[str] = field(default_factory=list)
    subject: str = ""
    sender: str = ""  # -r / from=: "Name <addr>" or an address; "" = the user
    body: bytes = b""
    attachments: list[Attachment] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)  # extra, in order

    def add_header(self, text: str) -> None:
        """Add a ``Name: value`` header (bsd-mailx -a, ~: lines from --read-recipients)."""
        check_header_text(text, "header")
        name, _, value = text.partition(":")
        name, value = name.strip(), value.strip()
        low = name.lower()
        if low in ("to", "cc", "bcc"):
            getattr(self, low).append(value)
        elif low == "subject":
            self.subject = value
        elif low == "from":
            self.sender = value
        else:
            self.headers.append((name, value))

    def is_empty(self) -> bool:
        return not self.body.strip() and not self.attachments


@dataclass
class Identity:
    """Who sends: the envelope sender and the From header's display name and address."""

    envelope: str
    name: str
    addr: str


def identity(sender: str, login: str, gecos: str, origin: str) -> Identity:
    """The From identity: ``-r``'s "Name <addr>" when given, else login@myorigin with GECOS."""
    if sender:
        check_header_text(sender, "sender")
        env = address.parse_sender(sender, origin)
        found = address.parse_list(sender)
        name = found[0][0] if found else ""
        return Identity(env, strip_controls(name), env)
    addr = address.qualify(login, origin)
    return Identity(addr, strip_controls(gecos), addr)


def envelope_recipients(draft: Draft, origin: str) -> list[str]:
    """To, Cc and Bcc as envelope addresses; pipe and file names are never recipients here."""
    out: list[str] = []
    for value in (*draft.to, *draft.cc, *draft.bcc):
        check_header_text(value, "recipient")
        for _, addr in address.parse_list(value):
            refuse_pipe_or_file(addr)
        out.extend(address.parse_recipients(value, origin))
    first: dict[str, str] = {}  # lowercased -> the first spelling
    for r in out:
        first.setdefault(r.lower(), r)
    return list(first.values())


def refuse_pipe_or_file(addr: str) -> None:
    """mailx delivers to "|cmd" and "/path" names; a script's argument must never do that."""
    if addr.startswith(("|", "/", "./", "../", "~/", "+")) or ("/" in addr and "@" not in addr):
        raise AddressError(f"pipe and file recipients are not allowed: {addr}")


def _address_header(values: list[str], origin: str) -> str:
    """An address list header value: each mailbox re-rendered so names get RFC 2047 later."""
    parts = []
    for value in values:
        for name, addr in address.parse_list(value):
            if addr:
                parts.append(_mailbox(strip_controls(name), address.qualify(addr, origin)))
    return ", ".join(parts)


def _mailbox(name: str, addr: str) -> str:
    """``Name <addr>`` for a header. formataddr cannot take an internationalised address
    (RFC 6531): such a message is written with a UTF-8 policy (see ``build``), so the address
    goes in as it is and only the name is quoted when it needs it."""
    if addr.isascii():
        return formataddr((name, addr))
    if not name:
        return addr
    if any(c in name for c in '()<>@,:;."[]\\'):
        name = '"' + quote(name) + '"'
    return f"{name} <{addr}>"


def _user_content_type(draft: Draft) -> Message | None:
    """The Content-Type given with -a 'Content-Type: ...', parsed, or None."""
    for name, value in draft.headers:
        if name.lower() == "content-type":
            m = Message()
            m["Content-Type"] = value
            return m
    return None


def _looks_like_text(data: bytes) -> bool:
    return b"\x00" not in data and _text(data) is not None


def _text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def build(draft: Draft, ident: Identity, *, origin: str, hostname: str,
          date: float | None = None) -> bytes:
    """The finished message bytes (LF line ends). Bcc is never written into the headers.

    The text body is utf-8 when not ASCII; the transfer encoding is chosen by the email
    package so that no line is longer than the SMTP policy allows. A user Content-Type that is
    not text/* (or a Content-Transfer-Encoding) means the body is already MIME: it is sent as is.
    """
    check_header_text(draft.subject, "subject")
    for name, value in draft.headers:
        check_header_text(value, f"header {name}")
    # An internationalised address cannot be RFC 2047-encoded: such a message is SMTPUTF8,
    # its headers raw UTF-8 (RFC 6532), as sendmail accepts and the SMTP client announces.
    eai = not ident.addr.isascii() or any(
        not addr.isascii() for value in (*draft.to, *draft.cc) for _, addr in
        address.parse_list(value))
    msg = EmailMessage(policy=POLICY.clone(utf8=True) if eai else POLICY)
    msg["Date"] = formatdate(date, localtime=True)
    msg["From"] = _mailbox(ident.name, ident.addr)
    if draft.to:
        msg["To"] = _address_header(draft.to, origin)
    if draft.cc:
        msg["Cc"] = _address_header(draft.cc, origin)
    if draft.subject:
        msg["Subject"] = strip_controls(draft.subject)
    msg["Message-ID"] = make_msgid(domain=hostname)
    for name, value in draft.headers:
        if name.lower() not in _OWN and name.lower() not in _CONTENT:
            msg[name] = strip_controls(value)
    ctype = _user_content_type(draft)
    raw = any(n.lower() == "content-transfer-encoding" for n, _ in draft.headers) or (
        ctype is not None and ctype.get_content_maintype() != "text")
    if raw:
        if draft.attachments:
            raise UsageError("cannot attach files to a body given its own MIME Content-Type")
        for name, value in draft.headers:
            if name.lower() in _CONTENT:
                msg[name] = value
        head = msg.as_bytes()  # headers and the blank line: there is no payload yet
        return head + draft.body.replace(b"\r\n", b"\n")
    subtype = ctype.get_content_subtype() if ctype is not None else "plain"
    charset = ctype.get_param("charset") if ctype is not None else None
    _set_body(msg, draft.body, subtype, str(charset) if isinstance(charset, str) else None)
    for att in draft.attachments:
        if att.maintype == "text" and (text := _text(att.data)) is not None:
            msg.add_attachment(text, subtype=att.subtype, filename=att.filename)
        else:
            maintype, subtype = ((att.maintype, att.subtype) if att.maintype != "text"
                                 else ("application", "octet-stream"))
            msg.add_attachment(att.data, maintype=maintype, subtype=subtype,
                               filename=att.filename)
    return msg.as_bytes()


def _set_body(msg: EmailMessage, body: bytes, subtype: str, charset: str | None) -> None:
    body = body.replace(b"\r\n", b"\n")
    text = _text(body)
    if text is not None:
        msg.set_content(text, subtype=subtype, charset=charset or "utf-8")
        if text.isascii() and charset is None:
            msg.set_param("charset", "us-ascii")
        return
    # Not UTF-8: the bytes go out untouched, labelled as such (RFC 1428's unknown-8bit).
    longest = max((len(line) for line in body.split(b"\n")), default=0)
    cte = "8bit" if longest <= 998 else "base64"
    msg.set_content(body, maintype="text", subtype=subtype, cte=cte)
    msg.set_param("charset", charset or "unknown-8bit")


def reply_subject(subject: str) -> str:
    return subject if subject[:3].lower() == "re:" else f"Re: {subject}"
