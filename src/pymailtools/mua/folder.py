"""Mail folders as a reader sees them (mbox file or Maildir): an index of the messages, their
headers and text read on demand, and the session's changes stored safely."""

from __future__ import annotations

import errno
import os
import stat
import struct
import sys
import zlib

# operator.py only defines Python versions of these and then takes _operator's C ones:
# importing it costs a third of a millisecond more than the C module alone.
from _operator import add, and_, eq, setitem
from bisect import bisect_left, bisect_right
from itertools import accumulate, compress, repeat

from pymailtools.config import Config
from pymailtools.errors import EX_NOINPUT, EX_NOPERM, EX_TEMPFAIL, MailError
from pymailtools.fileio import write_all
from pymailtools.local.lock import MailboxLock

# Opening a folder imports neither re nor collections (a big share of a small folder's time):
# an mbox file's index is kept in memoryviews, not arrays, whose module imports collections.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from array import array
    from collections.abc import Callable, Iterable, Iterator, Sequence
    from typing import Literal, Protocol

    class Sizes(Protocol):
        def __len__(self) -> int: ...
        def __getitem__(self, i: int, /) -> int: ...

    class Column(Sizes, Protocol):
        """A column of the index: an array or a memoryview of machine integers."""

        def __setitem__(self, i: int, value: int, /) -> None: ...
        def __iter__(self) -> Iterator[int]: ...
        def tobytes(self) -> bytes: ...
        @property
        def itemsize(self) -> int: ...


def _column(code: Literal["q", "H"], data: bytearray) -> memoryview[int]:
    """A column of machine integers (struct format ``code``) over ``data``, not copied."""
    return memoryview(data).cast(code)

# pymailtools.local.mbox (framing, quoting, rewriting) is imported where a message is shown,
# saved or rewritten: listing a folder does without it and its imports.

# Reads of an mbox file: big enough that a system call costs nothing per message, small
# enough that a 200,000-message folder never sits in memory.
BLOCK = 1 << 18
# A Maildir message's first read: the whole file for nearly every message.
HEAD_BLOCK = 1 << 16
# The folder-internal message UW-IMAP and Dovecot keep first in an mbox they rewrote.
PSEUDO_SUBJECT = b"DON'T DELETE THIS MESSAGE -- FOLDER INTERNAL DATA"

# Entry.flags bits: the first two as stored and changeable by the session, then the session's
# marks, then the stored Status: letters as loaded (never changed).
SEEN, OLD, READ, DELETED, SAVED, PRESERVED, TO_MBOX, WAS_SEEN, WAS_OLD = (1 << n for n in range(9))


def clear_of(flags: Column, mask: int) -> bytes:
    """A byte per message: 1 where its flags have none of ``mask``'s bits (all in the low
    byte), else 0; made by C loops from the flags' bytes, for counts and searches over
    every message."""
    if flags.itemsize != 2:
        return bytes(not f & mask for f in flags)
    raw = flags.tobytes()
    low = raw[0::2] if sys.byteorder == "little" else raw[1::2]
    return low.translate(bytes(not b & mask for b in range(256)))


class FolderError(MailError):
    """A folder cannot be opened (66, 77) or safely rewritten (75)."""

    exit_code = EX_TEMPFAIL


def open_error(path: str, e: OSError) -> FolderError:
    code = EX_NOPERM if e.errno in (errno.EACCES, errno.EPERM) else EX_NOINPUT
    return FolderError(f"{path}: {e.strerror}", code)


class _Flag:
    """One bit of an entry's flags as a boolean attribute."""

    def __init__(self, bit: int) -> None:
        self.bit = bit

    def __get__(self, e: Entry, owner: object = None) -> bool:
        return bool(e.box.flags[e.index] & self.bit)

    def __set__(self, e: Entry, value: bool) -> None:
        flags = e.box.flags
        flags[e.index] = flags[e.index] | self.bit if value else flags[e.index] & ~self.bit


class Entry:
    """One message of a folder, as a view of its folder's index: size, lines, stored flags and
    this session's marks. Its headers and text are read through the folder when wanted."""

    __slots__ = ("box", "index")

    seen = _Flag(SEEN)  # stored as read (Status R / Maildir S)
    old = _Flag(OLD)  # stored as no longer new (Status O / in cur/)
    read = _Flag(READ)  # displayed in this session
    deleted = _Flag(DELETED)
    saved = _Flag(SAVED)
    preserved = _Flag(PRESERVED)
    to_mbox = _Flag(TO_MBOX)

    def __init__(self, box: Folder, index: int) -> None:
        self.box = box
        self.index = index

    @property
    def size(self) -> int:
        """Bytes as stored (mbox: From_ line included)."""
        return self.box.sizes[self.index]

    @property
    def lines(self) -> int:
        return self.box.line_count(self.index)

    @property
    def flags(self) -> int:
        return self.box.flags[self.index]

    @property
    def headers(self) -> Headers:
        return Headers(self.box.header_block(self))

    @property
    def message_bytes(self) -> bytes:
        """The RFC 5322 message: without the From_ line, mboxrd quoting undone."""
        return self.box.message_bytes(self)

    @property
    def is_new(self) -> bool:
        """Not yet old (no O stored) nor read in this session: a message stored as read
        but not old (Status: R) is new, as s-nail counts it."""
        return not self.flags & (OLD | READ)

    def letter(self) -> str:
        f = self.flags
        if f & DELETED:
            return "D"
        if f & SAVED:
            return "*"
        if f & PRESERVED:
            return "P"
        if f & TO_MBOX:
            return "M"
        if f & READ:
            return "R"
        if f & SEEN:
            return "O" if f & OLD else "R"  # read, still new: as if read in this session
        return "U" if f & OLD else "N"

    def status_value(self) -> str:
        """The Status: letters to store: R when read, O once a session has seen it."""
        return _status_value(self.flags)


def _status_value(flags: int) -> str:
    return ("R" if flags & (SEEN | READ) else "") + "O"


class EntryList:
    """A folder's messages in order, each made as a view of the index when asked for."""

    def __init__(self, box: Folder, make: Callable[[Folder, int], Entry]) -> None:
        self.box = box
        self.make = make

    def __len__(self) -> int:
        return len(self.box.flags)

    def __getitem__(self, i: int) -> Entry:
        n = len(self.box.flags)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("message number out of range")
        return self.make(self.box, i)

    def __iter__(self) -> Iterator[Entry]:
        box, make = self.box, self.make
        return (make(box, k) for k in range(len(box.flags)))


class Headers:
    """A message's header block as stored: the From_ line apart, fields looked up as
    compat32's ``raw_items`` gives them (8-bit bytes as surrogate escapes, folding kept)."""

    __slots__ = ("from_line", "_block", "_start", "_lower")

    def __init__(self, block: bytes) -> None:
        self.from_line = ""
        # The fields start after the From_ line: _start - 1 is a newline or -1.
        self._start = 0
        if block.startswith(b"From "):
            nl = block.find(b"\n")
            end = len(block) if nl < 0 else nl
            self.from_line = block[5:end].rstrip(b"\r").decode("utf-8", "replace")
            self._start = end + 1
        self._block = block
        self._lower: bytes | None = None

    def get(self, name: str) -> str | None:
        """The first field ``name``'s value; None when there is none. The spelling with this
        case is looked for first: a differently cased field before it is not seen."""
        key = _KEYS.get(name)
        if key is None:
            key = _KEYS.setdefault(name, b"\n" + name.encode("ascii") + b":")
        block, start = self._block, self._start
        pos = _value_at(block, key, start)
        if pos < 0:
            if self._lower is None:
                self._lower = block.lower()
            pos = _value_at(self._lower, key.lower(), start)
            if pos < 0:
                return None
        end = block.find(b"\n", pos)
        while end >= 0 and block[end + 1 : end + 2] in (b" ", b"\t"):
            end = block.find(b"\n", end + 1)
        value = block[pos : len(block) if end < 0 else end]
        return value.lstrip(b" \t").rstrip(b"\r\n").decode("ascii", "surrogateescape")

    def raw_items(self) -> list[tuple[str, str]]:
        """Every field in order; the block ends at its first line that is not one."""
        items: list[tuple[str, str]] = []
        for line in self._block[self._start :].split(b"\n"):
            if line[:1] in (b" ", b"\t"):
                if items:
                    prev, text = items[-1]
                    items[-1] = (prev, text + "\n" + line.decode("ascii", "surrogateescape"))
                continue
            name, colon, value = line.partition(b":")
            if not colon or any(c < 33 or c > 126 for c in name):
                break
            items.append((name.decode("ascii", "surrogateescape"),
                          value.lstrip(b" \t").decode("ascii", "surrogateescape")))
        return [(n, v.rstrip("\r\n")) for n, v in items]


_KEYS: dict[str, bytes] = {}  # field name -> b"\nName:"


def _value_at(block: bytes, key: bytes, start: int) -> int:
    """Where the value of the first field ``key`` (b"\\nName:") begins in a header block whose
    fields begin at ``start``; -1 when there is none."""
    if start:
        pos = block.find(key, start - 1)
    elif block.startswith(key[1:]):
        return len(key) - 1
    else:
        pos = block.find(key)
    return -1 if pos < 0 else pos + len(key)


class Folder:
    """What read mode uses of a folder; ``MboxFolder`` and ``MaildirFolder`` implement it,
    and nothing in read mode reaches past it.

    The index is a few numbers per message, in folder order: ``sizes``, ``flags`` (the bits
    above: stored flags, then the session's marks, which the reader sets) and ``line_count``.
    ``entries[i]`` is an ``Entry`` view of message i. Headers and text are fetched when wanted:
    per message (``header_block``, ``message_bytes``, ``mbox_bytes``) or in batches
    (``header_blocks``, for summaries). ``changed`` says whether quitting would store
    anything; ``save`` stores the session's flags, keeping only the messages whose indices it
    is given, and reports mail that arrived meanwhile; ``close`` ends the session."""

    path: str
    entries: EntryList
    sizes: Sizes
    lines: Sequence[int]
    flags: Column

    def line_count(self, i: int) -> int:
        """Lines of message ``i`` as stored."""
        return self.lines[i]

    def header_block(self, e: Entry) -> bytes:
        """The message's header block as stored (an mbox From_ line first), without the
        blank line that ends it."""
        raise NotImplementedError

    def header_blocks(self, entries: Iterable[Entry]) -> Iterator[bytes]:
        """``header_block`` of each entry, in order; folders fetch them in batches."""
        return (self.header_block(e) for e in entries)

    def message_bytes(self, e: Entry) -> bytes:
        """The RFC 5322 message (headers and body, no mbox framing)."""
        raise NotImplementedError

    def mbox_bytes(self, e: Entry) -> bytes:
        """The message framed for appending to an mbox file, its Status: as the session left
        it."""
        raise NotImplementedError

    def changed(self) -> bool:
        """Whether quitting would change anything stored."""
        raise NotImplementedError

    def save(self, config: Config, keep: list[int],
             before_write: Callable[[], None] | None = None) -> int:
        """Store the session's changes: only the entries whose indices are in ``keep`` stay.
        Returns messages that arrived.
        ``before_write`` runs before anything stored changes (an mbox file's with it locked
        and verified): read mode copies messages to ~/mbox there."""
        raise NotImplementedError

    def close(self) -> None:
        """Let go of what the folder holds open."""


_STATUS_VALUES = {letters.encode(): (SEEN | WAS_SEEN if "R" in letters else 0)
                  | (OLD | WAS_OLD if "O" in letters else 0)
                  for letters in ("", "R", "O", "RO", "OR")}


def _status_windows() -> dict[bytes, int]:
    """The usual Status: values by the four bytes after the colon, as stored (the letters
    count in capitals only): " RO\\n", " R\\n" and the first byte of the next line (a field
    name, a continuation, the blank line), and so on (CRLF too). Other windows are read as
    the whole field is."""
    table = {}
    nexts = [bytes((c,)) for c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz \t\n"]
    for letters in (b"R", b"O", b"RO", b"OR"):
        for eol in (b"\n", b"\r\n"):
            key = b" " + letters + eol
            if len(key) < 4:
                table.update(dict.fromkeys(map(key.__add__, nexts), _STATUS_VALUES[letters]))
            else:
                table[key[:4]] = _STATUS_VALUES[letters]
    return table


_STATUS_WINDOWS = _status_windows()


def _field_flags(data: bytes, at: int, end: int) -> int:
    """Flags of the one Status: field (its name in any case) whose line starts after the
    newline at ``at``, in a message ending at ``end``: an R anywhere in its value makes
    the message read, an O old (capitals only, as mailx reads them)."""
    nl = data.find(b"\n", at + 8, end)
    value = data[at + 8 : end if nl < 0 else nl]
    flags = (SEEN | WAS_SEEN) if b"R" in value else 0
    return flags | (OLD | WAS_OLD) if b"O" in value else flags


def _status_flags(data: bytes, start: int, end: int) -> int:
    """WAS_SEEN | WAS_OLD | SEEN | OLD as the Status: fields of the header fields in
    ``data[start:end]`` say together (``data[start - 1]`` is the From_ line's newline when
    ``start``)."""
    if not start:
        return _status_flags(b"\n" + data[:end], 1, end + 1)
    data = data[start - 1 : end]
    names = data.lower()  # field names in any case
    flags = 0
    pos = names.find(b"\nstatus:")
    while pos >= 0:
        flags |= _field_flags(data, pos, len(data))
        pos = names.find(b"\nstatus:", pos + 8)
    return flags


def _with_status(head: bytes, flags: int, eol: bytes = b"\n") -> bytes:
    """A header block (after the From_ line) with its Status: fields replaced by what the
    session leaves; the new field ends as the block's last line does, or in ``eol`` (the
    From_ line's end) when the block is empty."""
    lines = head.split(b"\n")
    kept = [ln for ln in lines if not ln[:7].lower() == b"status:"]
    body = b"\n".join(kept)
    if head:
        eol = b"\r\n" if head.endswith(b"\r\n") else b"\n"
    if body and not body.endswith(b"\n"):
        body += eol
    return body + f"Status: {_status_value(flags)}".encode() + eol


def _needs_status(f: int) -> bool:
    return bool(f & (SEEN | READ)) != bool(f & WAS_SEEN) or not f & WAS_OLD


class MboxEntry(Entry):
    """A message of an mbox file: where it starts and how long its header block is."""

    __slots__ = ()

    @property
    def start(self) -> int:
        return self.box.starts[self.index]  # type: ignore[attr-defined, no-any-return]

    @property
    def head(self) -> int:
        """From_ line and header fields, without the blank line that ends them."""
        return self.box.head(self.index)  # type: ignore[attr-defined, no-any-return]


class _Index:
    """The index of an mbox file, built in one pass over it in large blocks (cut at message
    starts, so that no block is read twice), with the CRC of the whole: where each message
    starts and its stored Status: flags. Sizes follow from the starts; header lengths and
    line counts are found when a message is shown."""

    def __init__(self) -> None:
        self.starts = bytearray()  # native 8-byte integers
        self.flags = bytearray()  # native 2-byte integers
        self.first = -1  # where the first message starts
        self.crc = 0
        self.size = 0

    def scan(self, fd: int) -> None:
        pos = 0
        while True:
            window = os.pread(fd, BLOCK, pos)
            if not window:
                break
            parts = window.rsplit(b"\nFrom ")  # backwards: faster than split here
            end = len(window)
            if end == BLOCK:  # more may follow: the block ends where its last message starts
                if len(parts) == 1:  # one message longer than the block
                    pos = self._long(fd, pos, window)
                    continue
                end -= len(parts.pop()) + 5
            self.crc = zlib.crc32(memoryview(window)[:end], self.crc)
            self._add(window, parts, end, pos)
            pos += end
        self.size = pos

    def _add(self, data: bytes, parts: list[bytes], end: int, pos: int) -> None:
        """Index ``data[:end]``, split at "\\nFrom " into ``parts``: whole messages starting
        at file offset ``pos`` (or the text before the first message at offset 0). The work
        per message is done by C loops (``map`` over lists, searches), never by Python code;
        the Status: fields are found by one search over the block, and only the messages
        that have one cost more."""
        # where each message starts in data, then where the last one ends
        starts = list(accumulate(map(add, map(len, parts), repeat(6)), initial=-5))
        del parts
        if data.startswith(b"From "):
            starts[0] = 0
        else:  # text before the first message (the first block only)
            del starts[0]
        n = len(starts) - 1
        if not n:
            return
        self.starts += struct.pack(f"{n}q", *map(add, starts[:n], repeat(pos)))
        if self.first < 0:
            self.first = pos + starts[0]
        if end == len(data) and not data.endswith(b"\n"):  # the file's last line
            data += b"\n"  # so that every line of the block ends in a newline
        flags = bytearray(2 * n)
        # Every "\nstatus:" (the name in any case) in the block: where each name starts, from
        # the lengths of the pieces between them.
        pieces = data.lower().rsplit(b"\nstatus:")
        if len(pieces) > 1:
            names = list(accumulate(map(add, map(len, pieces), repeat(8)), initial=-7))
            del names[0], names[-1], pieces
            # only those of this block's messages (not the text before them, nor the
            # partial message after them)...
            first, last = bisect_left(names, starts[0]), bisect_left(names, end)
            if first or last < len(names):
                names = names[first:last]
            # ... in a header block: no blank line between the message's start and the field
            ks = list(map(bisect_right, repeat(starts[1:]), names))
            fronts = list(map(starts.__getitem__, ks))
            head = bytes(map(eq, repeat(-1), map(data.find, repeat(b"\n\n"), fronts, names)))
            if b"\r" in data:  # (one memchr) CRLF lines: a blank line may be "\r\n"
                head = bytes(map(and_, head, map(eq, repeat(-1), map(
                    data.find, repeat(b"\n\r\n"), fronts, names))))
            if 0 in head:
                names, ks = list(compress(names, head)), list(compress(ks, head))
            # the windows as stored, not lowercased: "Status: r" is no flag
            windows = map(data.__getitem__, map(slice, map(add, names, repeat(7)),
                                                 map(add, names, repeat(11))))
            values = list(map(_STATUS_WINDOWS.get, windows, repeat(-1)))
            if -1 in values:  # anything else: as the field is read one by one
                for j, v in enumerate(values):
                    if v < 0:
                        values[j] = _field_flags(data, names[j] - 1, starts[ks[j] + 1])
            if len(set(ks)) < len(ks):  # a message with several Status: fields: they add up
                merged: dict[int, int] = {}
                for k, v in zip(ks, values, strict=True):
                    merged[k] = merged.get(k, 0) | v
                ks, values = list(merged), list(merged.values())
            column = memoryview(flags).cast("H")
            # (typeshed's setitem takes sequences and mappings, not memoryviews)
            any(map(setitem, repeat(column), ks, values))  # type: ignore[arg-type]
            column.release()
        self.flags += flags

    def _long(self, fd: int, pos: int, window: bytes) -> int:
        """Index the message at ``pos``, longer than a block (``window`` its first); returns
        where the next one starts."""
        if self.first < 0:
            if not window.startswith(b"From "):  # text before the first message: no entry
                return self._skip(fd, pos, window)
            self.first = pos
        end = self._through(fd, pos)
        self.starts += struct.pack("q", pos)
        self.flags += struct.pack("H", _find_head(fd, pos, end)[1])
        return end

    def _skip(self, fd: int, pos: int, window: bytes) -> int:
        return self._through(fd, pos)

    def _through(self, fd: int, pos: int) -> int:
        """Where the next message starts (or the file ends) from ``pos``, the CRC taken of
        everything up to there, once."""
        off = pos
        held = b""  # the previous block's last bytes: a separator may straddle two
        while True:
            chunk = os.pread(fd, BLOCK, off)
            data = held + chunk
            base = off - len(held)
            q = data.find(b"\nFrom ", 1 if base == pos else 0)
            if q >= 0 or not chunk:
                done = data if q < 0 else data[: q + 1]
                self.crc = zlib.crc32(done, self.crc)
                return base + len(done)
            held = data[-5:]
            self.crc = zlib.crc32(data[:-5], self.crc)
            off += len(chunk)


def _blank_line(data: bytes, start: int = 0, end: int | None = None) -> int:
    """Where the line before the first blank line of ``data[start:end]`` ends (its newline),
    or -1. A blank line is empty or a lone CR: a mailbox written with CRLF line ends (a
    Windows tool, a copy from an IMAP server) ends its header blocks with "\r\n"."""
    cut = data.find(b"\n\n", start, end)
    crlf = data.find(b"\n\r\n", start, end if cut < 0 else cut + 2)  # (one starting before)
    return cut if crlf < 0 else crlf


def body_start(message: bytes) -> int:
    """Where the body of ``message`` begins: after its first blank line (LF or CRLF), or at
    its end when it has none."""
    cut = _blank_line(message)
    return len(message) if cut < 0 else cut + (2 if message[cut + 1] == 10 else 3)


def _head_length(data: bytes) -> int:
    """Length of the header block (From_ line and fields, without the blank line ending
    them) of the whole message ``data``: a message without a blank line is all header."""
    cut = _blank_line(data)
    return cut + 1 if cut >= 0 else len(data)


def _find_head(fd: int, start: int, end: int) -> tuple[int, int]:
    """(header length, stored Status: flags) of the message at ``start``..``end``."""
    size = HEAD_BLOCK
    while True:
        data = os.pread(fd, min(size, end - start), start)
        hstart = data.find(b"\n") + 1 if data.startswith(b"From ") else 0
        cut = _blank_line(data, max(0, hstart - 1))
        if cut >= 0 or len(data) >= end - start:
            head = len(data) if cut < 0 else cut + 1
            return head, _status_flags(data, hstart, head)
        size *= 4


class _Sizes:
    """Message sizes of an mbox folder, from where each message and the next start."""

    def __init__(self, box: MboxFolder) -> None:
        self.box = box

    def __len__(self) -> int:
        return len(self.box.starts)

    def __getitem__(self, i: int) -> int:
        starts = self.box.starts
        if i < 0:
            i += len(starts)
        end = starts[i + 1] if i + 1 < len(starts) else self.box.size
        return end - starts[i]


def _pseudo(block: bytes) -> bool:
    """Whether a first message's header block is UW-IMAP's / Dovecot's folder-internal one."""
    h = Headers(block)
    return ((h.get("X-IMAP") is not None or h.get("X-IMAPbase") is not None)
            and (h.get("Subject") or "").strip().encode("ascii", "surrogateescape")
            == PSEUDO_SUBJECT)


class MboxFolder(Folder):
    """An mbox file, indexed under a shared lock and read on demand; rewritten under the
    delivery locks by copying the unchanged bytes."""

    lines: memoryview[int]  # -1: not counted yet

    def __init__(self, path: str, fd: int, st: os.stat_result) -> None:
        self.path = path
        self.fd = fd  # kept open: message text is read through it, even if renamed over
        self.ino = (st.st_dev, st.st_ino)
        index = _Index()
        index.scan(fd)
        self.size = index.size
        # What was loaded, to notice another program's rewrite before ours replaces it.
        self.crc = index.crc
        self.starts, self.flags = _column("q", index.starts), _column("H", index.flags)
        self.sizes = _Sizes(self)
        # Header lengths and line counts when first wanted (-1: not yet).
        self.heads = _column("q", bytearray(b"\xff") * len(index.starts))
        self.lines = _column("q", bytearray(b"\xff") * len(index.starts))
        # Bytes kept as they are before the first message: text before any From_ line, and
        # the folder-internal message, which nobody reading locally may see or remove.
        self.prefix = index.first if self.starts else index.size
        self.entries = EntryList(self, MboxEntry)
        if self.starts and _pseudo(self.header_block(self.entries[0])):
            self.prefix += self.sizes[0]
            self.starts, self.heads = self.starts[1:], self.heads[1:]
            self.lines, self.flags = self.lines[1:], self.flags[1:]

    def head(self, i: int) -> int:
        """Length of message ``i``'s header block (From_ line and fields, without the blank
        line that ends them)."""
        if self.heads[i] < 0:
            start = self.starts[i]
            self.heads[i] = _find_head(self.fd, start, start + self.sizes[i])[0]
        return self.heads[i]

    def line_count(self, i: int) -> int:
        if self.lines[i] < 0:
            start, n = self.starts[i], self.sizes[i]
            count = 0
            for off in range(start, start + n, BLOCK):
                count += os.pread(self.fd, min(BLOCK, start + n - off), off).count(b"\n")
            self.lines[i] = count
        return self.lines[i]

    @classmethod
    def load(cls, path: str, config: Config) -> MboxFolder:
        fd, st = _open_file(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            # Shared fcntl lock while reading, so we never index half an appended message.
            lock = MailboxLock(path, fd, config)
            locked = True
            try:
                lock.acquire()
            except OSError:
                locked = False  # read-only media, NFS without locks: read anyway
            try:
                return cls(path, fd, st)
            finally:
                if locked:
                    lock.release()
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def header_block(self, e: Entry) -> bytes:
        return os.pread(self.fd, self.head(e.index), self.starts[e.index])

    def header_blocks(self, entries: Iterable[Entry]) -> Iterator[bytes]:
        """Read in large blocks; header lengths and line counts of the messages a block
        holds whole are taken from it."""
        buf = b""
        base = 0
        starts, heads, lines, sizes = self.starts, self.heads, self.lines, self.sizes
        for e in entries:
            i = e.index
            start, size, head = starts[i], sizes[i], heads[i]
            if start < base or start + (size if head < 0 else head) > base + len(buf):
                base = start
                buf = os.pread(self.fd, max(BLOCK, head), base)
            s = start - base
            if s + size <= len(buf):
                if head < 0:
                    heads[i] = head = _head_length(buf[s : s + size])
                if lines[i] < 0:
                    lines[i] = buf.count(b"\n", s, s + size)
            elif head < 0:
                head = self.head(i)
                if s + head > len(buf):
                    base = start
                    buf = os.pread(self.fd, max(BLOCK, head), base)
                    s = 0
            yield buf[s : s + head]

    def stored_bytes(self, e: Entry) -> bytes:
        """The entry as stored: From_ line, headers, quoted body."""
        return _pread_all(self.fd, self.sizes[e.index], self.starts[e.index])

    def message_bytes(self, e: Entry) -> bytes:
        raw = self.stored_bytes(e)
        from pymailtools.local import mbox

        if not raw.startswith(b"From "):
            return raw
        return mbox.unquote(raw[raw.find(b"\n") + 1 :])

    def _status_entry(self, i: int, raw: bytes) -> bytes:
        """``raw`` (the start of entry ``i``: its header block at least) with the session's
        Status: when it differs from the stored one."""
        flags = self.flags[i]
        if not _needs_status(flags):
            return raw
        head = self.head(i)
        hstart = raw.find(b"\n") + 1 if raw.startswith(b"From ") else 0
        eol = b"\r\n" if raw[:hstart].endswith(b"\r\n") else b"\n"
        return raw[:hstart] + _with_status(raw[hstart:head], flags, eol) + raw[head:]

    def mbox_bytes(self, e: Entry) -> bytes:
        raw = self._status_entry(e.index, self.stored_bytes(e))
        from pymailtools.local import mbox

        if raw.startswith(b"From "):
            return mbox.end_entry(raw)
        return frame_message(Headers(self.header_block(e)), raw)

    def changed(self) -> bool:
        return any(f & (DELETED | TO_MBOX) or _needs_status(f) for f in self.flags)

    def _write_content(self, keep: list[int], out: int, fd: int, size: int,
                       verify: Callable[[int], None]) -> tuple[int, int]:
        """Write the new content to ``out``: the prefix, the kept entries (their Status:
        updated), then what arrived since loading. Reads the old content in large blocks and
        passes its CRC to ``verify`` before anything arrived is read. Returns (offset of
        the first byte that differs from the old content, messages that arrived)."""
        from pymailtools.local import mbox

        reader = _BlockReader(fd)
        writer = _BlockWriter(out)
        kept = bytearray(len(self.flags))
        for i in keep:
            kept[i] = 1
        same = -1
        if self.prefix:
            writer.write(reader.read(0, self.prefix))
        pos = self.prefix
        starts, heads, flags, n = self.starts, self.heads, self.flags, len(kept)
        for i in range(n):
            if not kept[i]:
                continue
            start, changed = starts[i], _needs_status(flags[i])
            size_i = (starts[i + 1] if i + 1 < n else self.size) - start
            if same < 0 and (start != pos or changed):
                same = writer.offset
            if changed and size_i <= HEAD_BLOCK:  # whole, from the buffer: its header block too
                raw = reader.read(start, size_i)
                if len(raw) != size_i:
                    raise OSError(errno.EIO, "mailbox shorter than indexed")
                if heads[i] < 0:
                    heads[i] = _head_length(raw)
                writer.write(self._status_entry(i, raw))
            elif changed:
                head = self.head(i)
                writer.write(self._status_entry(i, reader.read(start, head)))
                writer.copy(reader, start + head, size_i - head)
            else:
                writer.copy(reader, start, size_i)
            pos = start + size_i
        if same < 0 and pos != self.size:
            same = writer.offset
        verify(reader.crc_to(self.size))
        arrived = 0
        if size > self.size:
            if same < 0:
                same = writer.offset
            new = _pread_all(fd, size - self.size, self.size)  # new mail: small
            arrived = new.startswith(b"From ") + new.count(b"\nFrom ")
            writer.write(mbox.separator(writer.last))
            writer.write(new)
        writer.flush()
        return (writer.offset if same < 0 else same), arrived

    def save(self, config: Config, keep: list[int],
             before_write: Callable[[], None] | None = None) -> int:
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise FolderError(f"{self.path}: is a symbolic link; not rewritten") from None
                raise open_error(self.path, e) from None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                    raise FolderError(f"{self.path}: not a regular file with one link; "
                                      "not rewritten")
                with MailboxLock(self.path, fd, config):
                    # Renamed over by another reader while we waited: start again on the new one.
                    if _current_inode(self.path) != (st.st_dev, st.st_ino):
                        continue
                    return self._rewrite(fd, st, keep, before_write)
            finally:
                os.close(fd)
        raise FolderError(f"{self.path}: kept being replaced; not rewritten")

    def _rewrite(self, fd: int, st: os.stat_result, keep: list[int],
                 before_write: Callable[[], None] | None) -> int:
        """With the locks held: the new content, checked against what was loaded, in place of
        the old. Returns messages that arrived meanwhile."""
        from pymailtools.local import mbox

        size = os.fstat(fd).st_size
        if size < self.size:
            raise self._changed_error()
        arrived = 0

        def verify(crc: int) -> None:
            if crc != self.crc:
                raise self._changed_error()

        def fill(out: int) -> int:
            nonlocal arrived
            same, arrived = self._write_content(keep, out, fd, size, verify)
            return same

        try:
            mbox.rewrite_with(self.path, fd, st, fill, before_write)
        except OSError as e:
            raise FolderError(f"{self.path}: {e.strerror}") from None
        return arrived

    def _changed_error(self) -> FolderError:
        return FolderError(f"{self.path}: changed by another program while open;"
                           " your changes were not saved")


class _BlockReader:
    """Sequential reads of a file through one large buffer, taking the CRC of the bytes as
    they pass (each byte once, in order, up to the point the CRC is asked for)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        self.base = 0
        self.crc = 0
        self.hashed = 0

    def _hash_to(self, end: int) -> None:
        while self.hashed < end:
            data = self.read_raw(self.hashed, min(BLOCK, end - self.hashed))
            if not data:
                break
            self.crc = zlib.crc32(data, self.crc)
            self.hashed += len(data)

    def read_raw(self, offset: int, n: int) -> bytes:
        if self.base <= offset and offset + n <= self.base + len(self.buf):
            return self.buf[offset - self.base : offset - self.base + n]
        if n >= BLOCK:
            return _pread_all(self.fd, n, offset)
        self.buf = os.pread(self.fd, BLOCK, offset)
        self.base = offset
        return self.buf[:n]

    def read(self, offset: int, n: int) -> bytes:
        self._hash_to(offset)
        data = self.read_raw(offset, n)
        if offset == self.hashed:
            self.crc = zlib.crc32(data, self.crc)
            self.hashed += len(data)
        return data

    def crc_to(self, end: int) -> int:
        self._hash_to(end)
        return self.crc if self.hashed == end else -1


class _BlockWriter:
    """Large writes from the start of a new file; remembers the last two bytes written."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()
        self.offset = 0
        self.last = b""

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.buf += data
        self.offset += len(data)
        self.last = (self.last + data)[-2:]
        if len(self.buf) >= BLOCK:
            self.flush()

    def copy(self, reader: _BlockReader, offset: int, n: int) -> None:
        end = offset + n
        while offset < end:
            data = reader.read(offset, min(BLOCK, end - offset))
            if not data:
                raise OSError(errno.EIO, "mailbox shorter than indexed")
            self.write(data)
            offset += len(data)

    def flush(self) -> None:
        if self.buf:
            write_all(self.fd, self.buf, self.offset - len(self.buf))
            self.buf.clear()


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    parts = []
    got = 0
    while got < n:
        data = os.pread(fd, min(n - got, 1 << 24), offset + got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def _open_file(path: str, flags: int) -> tuple[int, os.stat_result]:
    """Open an mbox folder file (a new one mode 0600): FolderError when that fails or it is
    not a regular file."""
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        raise open_error(path, e) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise FolderError(f"{path}: not a regular file", EX_NOINPUT)
    return fd, st


def _current_inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


_READ_FLAGS = os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK


class MaildirEntry(Entry):
    """A message of a Maildir: its file name and whether it is under new/ or cur/."""

    __slots__ = ()

    @property
    def key(self) -> str:
        return self.box.keys[self.index]  # type: ignore[attr-defined, no-any-return]

    @property
    def subdir(self) -> str:
        return self.box.subdirs[self.index]  # type: ignore[attr-defined, no-any-return]


class MaildirFolder(Folder):
    """A Maildir: new/ and cur/ files; flags live in the ``:2,`` suffix of the name. Loading
    only lists and stats the files: a message's lines are counted when its text is first read
    (its header block, for a summary), or when asked for."""

    lines: array[int]  # -1: not counted yet

    def __init__(self, path: str) -> None:
        self.path = path.rstrip("/")
        found = []
        for sub in ("new", "cur"):
            d = os.path.join(self.path, sub)
            try:
                names = os.listdir(d)
            except OSError as e:
                raise open_error(d, e) from None
            d += "/"
            for name in names:
                if name.startswith("."):
                    continue
                try:
                    st = os.stat(d + name)
                except OSError:
                    continue  # moved or removed by another reader meanwhile
                found.append((st.st_mtime, name, sub, st.st_size))
        found.sort()
        self.keys = [name for _, name, _, _ in found]
        self.subdirs = [sub for _, _, sub, _ in found]
        from array import array  # a Maildir's index only: an mbox file's does without

        self.sizes = array("q", [size for _, _, _, size in found])
        self.lines = array("q", [-1]) * len(found)
        self.flags = array("H", [(SEEN | WAS_SEEN if "S" in name.rpartition(":2,")[2]
                                  and ":2," in name else 0) | (OLD if sub == "cur" else 0)
                                 for _, name, sub, _ in found])
        self.entries = EntryList(self, MaildirEntry)

    def _file(self, e: Entry) -> str:
        return f"{self.path}/{self.subdirs[e.index]}/{self.keys[e.index]}"

    def line_count(self, i: int) -> int:
        if self.lines[i] < 0:
            count = 0
            try:
                fd = os.open(f"{self.path}/{self.subdirs[i]}/{self.keys[i]}", _READ_FLAGS)
                try:
                    while data := os.read(fd, BLOCK):
                        count += data.count(b"\n")
                finally:
                    os.close(fd)
            except OSError:
                pass  # moved or removed by another reader meanwhile
            self.lines[i] = count
        return self.lines[i]

    def header_block(self, e: Entry) -> bytes:
        try:
            fd = os.open(self._file(e), _READ_FLAGS)
        except OSError:
            return b""  # moved or removed by another reader meanwhile
        try:
            data = os.read(fd, HEAD_BLOCK)
            if len(data) < HEAD_BLOCK:  # the whole file: its lines come for free
                self.lines[e.index] = data.count(b"\n")
            cut = _blank_line(data)
            while cut < 0 and len(data) < e.size:
                more = os.read(fd, BLOCK)
                if not more:
                    break
                data += more
                cut = _blank_line(data)
        except OSError:
            return b""
        finally:
            os.close(fd)
        return data if cut < 0 else data[: cut + 1]

    def message_bytes(self, e: Entry) -> bytes:
        try:
            with open(self._file(e), "rb") as f:
                return f.read()
        except OSError as err:
            raise FolderError(f"{self._file(e)}: {err.strerror}") from None

    def mbox_bytes(self, e: Entry) -> bytes:
        return frame_message(e.headers, self.message_bytes(e))

    def changed(self) -> bool:
        return any(f & (DELETED | TO_MBOX) or (f & READ and not f & SEEN) for f in self.flags) \
            or "new" in self.subdirs

    def save(self, config: Config, keep: list[int],
             before_write: Callable[[], None] | None = None) -> int:
        if before_write is not None:
            before_write()
        kept = bytearray(len(self.flags))
        for i in keep:
            kept[i] = 1
        top = self.path + "/"
        for i, key in enumerate(self.keys):
            src = f"{top}{self.subdirs[i]}/{key}"
            try:
                if not kept[i]:
                    os.unlink(src)
                    continue
                base, _, flags = key.partition(":2,")
                if self.flags[i] & READ:
                    flags += "S"
                if len(flags) > 1:
                    flags = "".join(sorted(set(flags)))
                dst = f"{top}cur/{base}:2,{flags}"
                if dst != src:
                    os.rename(src, dst)
            except FileNotFoundError:
                continue  # another reader already moved it
        return 0


def frame_message(h: Headers, message: bytes) -> bytes:
    """A message without a From_ line, framed as our deliverer frames it (sender from its
    Return-Path)."""
    from pymailtools.local import mbox

    sender = "MAILER-DAEMON"
    rp = h.get("Return-Path")
    if rp:
        sender = " ".join(rp.split()).strip().strip("<>") or sender
    return mbox.frame(message, sender)


def load(path: str, config: Config) -> Folder:
    """The folder at ``path``: a Maildir when it is a directory with cur/ and new/."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise open_error(path, e) from None
    if stat.S_ISDIR(st.st_mode):
        if os.path.isdir(os.path.join(path, "cur")) and os.path.isdir(os.path.join(path, "new")):
            return MaildirFolder(path)
        raise FolderError(f"{path}: is a directory, not a mailbox", EX_NOINPUT)
    return MboxFolder.load(path, config)


def append_mbox(path: str, messages: list[bytes], config: Config) -> bool:
    """Append framed messages to the mbox ``path`` under the delivery locks; True if created."""
    from pymailtools.local import mbox

    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
    created = not os.path.lexists(path)
    fd, _ = _open_file(path, flags)
    try:
        with MailboxLock(path, fd, config) as lock:
            mbox.append_framed(fd, lock, b"".join(messages))
    finally:
        os.close(fd)
    return created
