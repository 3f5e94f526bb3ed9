"""SMTP replies: a code and the lines the server sent, with the size limits we accept.

One type for every SMTP client in the package: the queue's client (smtp/client.py) and
smtpchat's session (chat/) both parse replies into it, line by line, with ``line_code``.
"""

from typing import NamedTuple

# What a server may send us: one line, one whole (multi-line) reply, and its number of lines.
MAX_LINE = 8192
MAX_REPLY = 65536
MAX_LINES = 1000


class Reply(NamedTuple):
    """One complete (possibly multi-line) reply; code 0 means the server's bytes were malformed.

    ``lines`` are the lines as received, codes included, without their line ends."""

    code: int
    lines: list[bytes]

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    @property
    def text(self) -> str:
        """The text after the codes, lines joined by a space (for logs and bounce reasons)."""
        texts = (line[4:].decode("utf-8", "replace").strip() for line in self.lines)
        return " ".join(t for t in texts if t)

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()


def line_code(line: bytes) -> tuple[int, bool] | None:
    """(code, is_last) of one reply line, or None if it is not ``DDD``, ``DDD text`` or ``DDD-``."""
    if len(line) < 3 or not line[:3].isdigit() or not b"2" <= line[:1] <= b"5":
        return None
    if len(line) == 3:
        return int(line[:3]), True
    sep = line[3:4]
    if sep == b" ":
        return int(line[:3]), True
    if sep == b"-":
        return int(line[:3]), False
    return None


def extensions(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) and their parameters, from every line but the first."""
    out: dict[str, str] = {}
    for line in reply.lines[1:]:
        words = line[4:].decode("ascii", "replace").strip().split(None, 1)
        if words:
            out.setdefault(words[0].upper(), words[1] if len(words) > 1 else "")
    return out
