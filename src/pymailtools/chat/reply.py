"""SMTP replies: a code and its lines, parsed strictly from the bytes the server sent."""

from typing import NamedTuple

# Size limits for what a server may send us, as aiosmtplib has them: a broken or hostile server
# must not make us buffer without end.
MAX_LINE = 8192
MAX_REPLY = 65536
MAX_LINES = 1000


class Reply(NamedTuple):
    """One complete (possibly multi-line) reply; code 0 means the server's bytes were malformed."""

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
        """The text after the codes, lines joined by newlines (for JSON and error messages)."""
        return "\n".join(line[4:].decode("utf-8", "replace") for line in self.lines)

    def __str__(self) -> str:
        return "\n".join(line.decode("utf-8", "replace") for line in self.lines)


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
