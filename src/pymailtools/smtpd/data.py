"""Reading SMTP DATA in bulk: aiosmtpd's rules, without a coroutine call per line.

aiosmtpd reads DATA one CRLF-terminated line at a time (``StreamReader.readuntil``), about a
fifth of the listener's CPU for ordinary mail. ``read_data`` takes whatever has arrived and
applies the same rules to all of it at once, with bytes methods:

* only CRLF ends a line, and a line that is exactly ``.`` ends the data: a bare LF or CR
  before or after a dot ends nothing (no SMTP smuggling through here);
* a line longer than ``line_limit`` bytes with its CRLF makes the data "too long", more than
  ``size_limit`` bytes in all (0: no limit) "too much" (a message with both may be called
  either); the rest is still read up to the end, but not kept;
* a leading dot is removed from every line (RFC 5321 section 4.5.2).

Bytes after the end (pipelined commands) go back to the reader. Checked against a copy of
aiosmtpd's loop on random streams in tests/smtpd/test_smtpd_fastpath.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

TOO_LONG = "too long"
TOO_MUCH = "too much"
CHUNK = 65536
_END = b"\r\n.\r\n"


async def read_data(reader: asyncio.StreamReader, size_limit: int, line_limit: int,
                    progress: Callable[[], None] | None = None) -> tuple[bytes, str]:
    """(content, problem): the message with its dots unstuffed and CRLF line ends, and "",
    TOO_LONG or TOO_MUCH (the content is then empty). IncompleteReadError at end of file.
    ``progress`` is called after each read that brought data (the session's idle timer: a
    slow client sending a large message is not idle)."""
    buf = bytearray(b"\r\n")  # the CRLF before the first line: DATA starts at a line start
    line_start = 2  # where the first line not yet checked begins in buf
    while True:
        end = buf.find(_END, line_start - 2)
        stop = len(buf) if end < 0 else end + 2
        lines = bytes(buf[line_start:stop]).split(b"\r\n")
        tail = lines.pop()  # the unfinished line; b"" when stop is at a line start
        problem = _check(lines, tail, line_start - 2, size_limit, line_limit)
        if end >= 0:
            _give_back(reader, buf[end + 5:])
            if problem:
                return b"", problem
            return bytes(buf[:end + 2]).replace(b"\r\n.", b"\r\n")[2:], ""
        if problem:
            await _skip(reader, buf[-4:], progress)
            return b"", problem
        line_start = stop - len(tail)
        buf += await _more(reader, buf, progress)


def _check(lines: list[bytes], tail: bytes, offset: int, size_limit: int,
           line_limit: int) -> str:
    """The problem with complete ``lines`` (without their CRLF) and the unfinished ``tail``
    after them, ``offset`` bytes into the data; "" if none yet."""
    longest = line_limit - 2  # what a line may hold before its CRLF
    # A tail of more than line_limit - 1 bytes is too long whatever comes next; "." and
    # ".\r" may be the end marker, which counts for nothing.
    if len(tail) > longest + 1 or any(len(line) > longest for line in lines):
        return TOO_LONG
    counted = 0 if tail in (b".", b".\r") else len(tail)
    if size_limit and offset + sum(map(len, lines)) + 2 * len(lines) + counted > size_limit:
        return TOO_MUCH
    return ""


async def _skip(reader: asyncio.StreamReader, last: bytes | bytearray,
                progress: Callable[[], None] | None) -> None:
    """Read and drop the rest of a refused message, up to its end marker; ``last``: the last
    bytes read, where the marker may begin."""
    buf = bytearray(last)
    while (end := buf.find(_END)) < 0:
        del buf[:-4]
        buf += await _more(reader, buf, progress)
    _give_back(reader, buf[end + 5:])


async def _more(reader: asyncio.StreamReader, buf: bytearray,
                progress: Callable[[], None] | None) -> bytes:
    chunk = await reader.read(CHUNK)
    if not chunk:
        raise asyncio.IncompleteReadError(bytes(buf), None)
    if progress is not None:
        progress()
    return chunk


def _give_back(reader: asyncio.StreamReader, rest: bytes | bytearray) -> None:
    """Return bytes read past the end marker (the client's next commands) to the front of the
    reader's buffer, before what it still holds: a read takes at most CHUNK bytes, and the
    buffer may hold more (feed_data would put them after those, out of order: body lines
    of the next message run as commands). Dropped after end of file, as aiosmtpd drops the
    commands it has not read by then."""
    if rest and not reader.at_eof():
        # asyncio's StreamReader has no public "unread"; its unread bytes are this bytearray
        reader._buffer[:0] = rest  # type: ignore[attr-defined]  # private in asyncio
