"""The envelope record: sender, per-recipient state and schedule, in a self-validating text file.

One line per field, every string field percent-quoted so that no byte a sender or a remote
server chose (CR, LF, NUL, space) can ever start a new record; the file ends with
``end N`` where N counts the lines before it, so a torn or foreign file is recognised.
A new entry's state file may instead be its message file itself (a second name for it):
the message, then the envelope, then a trailer line ``pymailtools-entry <message length>
<envelope length>`` (``read_envelope`` finds the envelope in either form).
Cheap to import: no re, no json.
"""

import os

MAGIC = "pymailtools-envelope 1"
ENTRY_TRAILER = b"pymailtools-entry "
_HEAD_READ = 65536

PENDING = "pending"
SENT = "sent"
DEFERRED = "deferred"
BOUNCED = "bounced"
RCPT_STATES = (PENDING, SENT, DEFERRED, BOUNCED)

_HEX = frozenset("0123456789ABCDEFabcdef")


class CorruptEnvelope(ValueError):
    """Raised when an envelope file is torn, foreign or malformed."""


def trailer(fd: int, size: int, magic: bytes) -> tuple[int, int]:
    """(message length, envelope length) from the last line of a file of ``size`` bytes: the
    message, the envelope, then ``magic M E``. CorruptEnvelope unless all three add up."""
    tail_len = min(size, 128)
    return parse_trailer(os.pread(fd, tail_len, size - tail_len), size, magic)


def parse_trailer(tail: bytes, size: int, magic: bytes) -> tuple[int, int]:
    """``trailer`` of the last (up to 128) bytes ``tail`` of a file of ``size`` bytes."""
    line = tail[:-1].rpartition(b"\n")[2]
    if not tail.endswith(b"\n") or not line.startswith(magic):
        raise CorruptEnvelope("no trailer (incomplete file)")
    try:
        msg_len, env_len = (int(x) for x in line[len(magic):].split(b" "))
    except ValueError:
        raise CorruptEnvelope("bad trailer") from None
    if msg_len < 0 or env_len <= 0 or msg_len + env_len + len(line) + 1 != size:
        raise CorruptEnvelope("trailer does not match the file size")
    return msg_len, env_len


def read_envelope(fd: int) -> bytes:
    """The envelope bytes of an open state file: all of a plain envelope file, or the envelope
    part of a message file published under its state name (``ENTRY_TRAILER``)."""
    data = os.pread(fd, _HEAD_READ, 0)
    if data.startswith(MAGIC.encode()) or not data:
        if len(data) == _HEAD_READ:  # a big envelope (thousands of recipients)
            parts, pos = [data], len(data)
            while chunk := os.pread(fd, 1 << 18, pos):
                parts.append(chunk)
                pos += len(chunk)
            data = b"".join(parts)
        # (a message that happens to begin with our magic line still ends in the trailer)
        if not data[:-1].rpartition(b"\n")[2].startswith(ENTRY_TRAILER):
            return data
    if len(data) < _HEAD_READ:
        # The whole file is in hand (a short read of a regular file is its end): take the
        # envelope from it rather than reading the trailer and the envelope once more.
        msg_len, env_len = parse_trailer(data[-128:], len(data), ENTRY_TRAILER)
        return data[msg_len:msg_len + env_len]
    msg_len, env_len = trailer(fd, os.fstat(fd).st_size, ENTRY_TRAILER)
    return os.pread(fd, env_len, msg_len)


def quote(s: str) -> str:
    """':' + s with %, white space, control characters and DEL as %XX (UTF-8 kept)."""
    if s.isascii() and s.isprintable() and " " not in s and "%" not in s:
        return ":" + s  # the usual case (addresses, ids), in C
    out = [":"]
    for ch in s:
        if ch > " " and ch != "%" and ch != "\x7f":  # printable ASCII but %, or non-ASCII
            out.append(ch)
        else:
            out.append(f"%{ord(ch):02X}")
    return "".join(out)


def unquote(field: str) -> str:
    if not field.startswith(":"):
        raise CorruptEnvelope(f"bad string field {field[:40]!r}")
    s = field[1:]
    if "%" not in s:
        return s
    # Every "%" starts an escape (a literal one is "%25"), so a whole escape can be replaced
    # in C; spaces are by far the most common (reasons, full names), 7 us a reason before.
    s = s.replace("%20", " ")
    if "%" not in s:
        return s
    # split on "%": each later part starts with two hex digits (the loop this replaced went
    # character by character: mailq spent most of its time here on reasons with spaces)
    parts = s.split("%")
    out = [parts[0]]
    for part in parts[1:]:
        if len(part) < 2 or part[0] not in _HEX or part[1] not in _HEX:
            raise CorruptEnvelope("bad %-escape")
        out.append(chr(int(part[:2], 16)))
        out.append(part[2:])
    return "".join(out)


def peek(data: bytes) -> tuple[str, str, list[tuple[str, float, str]]]:
    """(id, sender, [(state, next try, address) of each recipient]) of an envelope's bytes,
    without building the envelope: half the work of ``Envelope.from_bytes``, for choosing
    where an entry goes. It checks less: the entry is read with from_bytes before anything
    is delivered. CorruptEnvelope when it cannot tell."""
    qid = sender = None
    rcpts: list[tuple[str, float, str]] = []
    try:
        for line in data.decode("utf-8", "surrogateescape").split("\n"):
            if line.startswith("rcpt "):
                p = line.split(" ", 6)
                rcpts.append((p[1], float(p[3]), unquote(p[5])))
            elif line.startswith("id "):
                qid = unquote(line[3:])
            elif line.startswith("sender "):
                sender = unquote(line[7:])
    except (IndexError, ValueError) as e:
        raise CorruptEnvelope(f"bad record: {e}") from None
    if qid is None or sender is None or not rcpts:
        raise CorruptEnvelope("no id, sender or recipient")
    return qid, sender, rcpts


class Recipient:
    """One envelope recipient and its delivery state."""

    __slots__ = ("address", "orcpt", "notify", "state", "attempts", "next_try", "last_try",
                 "status", "reason")

    def __init__(self, address: str, orcpt: str = "", notify: str = "", state: str = PENDING,
                 attempts: int = 0, next_try: float = 0.0, last_try: float = 0.0,
                 status: str = "", reason: str = "") -> None:
        self.address = address
        self.orcpt = orcpt
        self.notify = notify
        self.state = state
        self.attempts = attempts
        self.next_try = next_try
        self.last_try = last_try
        self.status = status
        self.reason = reason

    @property
    def done(self) -> bool:
        return self.state in (SENT, BOUNCED)

    def __repr__(self) -> str:
        return f"Recipient({self.address!r}, state={self.state!r}, reason={self.reason!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipient) and all(
            getattr(self, a) == getattr(other, a) for a in self.__slots__
        )


class Envelope:
    """Everything about a queued message except its bytes."""

    __slots__ = ("id", "arrival", "sender", "uid", "user", "origin", "size", "envid", "ret",
                 "warned", "recipients")

    def __init__(self, id: str, sender: str, recipients: list[Recipient], *,
                 arrival: float = 0.0, uid: int = -1, user: str = "", origin: str = "sendmail",
                 size: int = 0, envid: str = "", ret: str = "", warned: bool = False) -> None:
        self.id = id
        self.sender = sender
        self.recipients = recipients
        self.arrival = arrival
        self.uid = uid
        self.user = user
        self.origin = origin
        self.size = size
        self.envid = envid
        self.ret = ret
        self.warned = warned

    @property
    def next_try(self) -> float:
        """When the earliest undelivered recipient is due (0 when none is waiting)."""
        times = [r.next_try for r in self.recipients if not r.done]
        return min(times) if times else 0.0

    @property
    def done(self) -> bool:
        return all(r.done for r in self.recipients)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Envelope) and all(
            getattr(self, a) == getattr(other, a) for a in self.__slots__
        )

    def to_bytes(self) -> bytes:
        lines = [
            MAGIC,
            f"id {quote(self.id)}",
            f"arrival {self.arrival!r}",
            f"sender {quote(self.sender)}",
            f"uid {int(self.uid)}",
            f"user {quote(self.user)}",
            f"origin {quote(self.origin)}",
            f"size {int(self.size)}",
            f"envid {quote(self.envid)}",
            f"ret {quote(self.ret)}",
            f"warned {int(self.warned)}",
        ]
        for r in self.recipients:
            lines.append(
                f"rcpt {r.state} {int(r.attempts)} {float(r.next_try)!r} {float(r.last_try)!r} "
                f"{quote(r.address)} {quote(r.orcpt)} {quote(r.notify)} {quote(r.status)} "
                f"{quote(r.reason)}"
            )
        lines.append(f"end {len(lines)}")
        return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")

    @classmethod
    def from_bytes(cls, data: bytes) -> "Envelope":
        text = data.decode("utf-8", "surrogateescape")
        if not text.endswith("\n"):
            raise CorruptEnvelope("no final newline (torn file)")
        lines = text[:-1].split("\n")
        if not lines or lines[0] != MAGIC:
            raise CorruptEnvelope("not a pymailtools envelope")
        if lines[-1] != f"end {len(lines) - 1}":
            raise CorruptEnvelope("missing or wrong end record (torn file)")
        fields: dict[str, str] = {}
        rcpts: list[Recipient] = []
        try:
            for line in lines[1:-1]:
                key, _, value = line.partition(" ")
                if key == "rcpt":
                    p = value.split(" ")
                    if len(p) != 9 or p[0] not in RCPT_STATES:
                        raise CorruptEnvelope("bad rcpt record")
                    rcpts.append(Recipient(
                        unquote(p[4]), unquote(p[5]), unquote(p[6]), p[0], int(p[1]),
                        float(p[2]), float(p[3]), unquote(p[7]), unquote(p[8])))
                elif key in fields or not key:
                    raise CorruptEnvelope(f"duplicate or empty record {key!r}")
                else:
                    fields[key] = value
            env = cls(
                unquote(fields["id"]), unquote(fields["sender"]), rcpts,
                arrival=float(fields["arrival"]), uid=int(fields["uid"]),
                user=unquote(fields["user"]), origin=unquote(fields["origin"]),
                size=int(fields["size"]), envid=unquote(fields["envid"]),
                ret=unquote(fields["ret"]), warned=fields["warned"] == "1",
            )
        except (KeyError, ValueError) as e:
            if isinstance(e, CorruptEnvelope):
                raise
            raise CorruptEnvelope(f"bad record: {e}") from None
        if not rcpts:
            raise CorruptEnvelope("no recipients")
        return env
