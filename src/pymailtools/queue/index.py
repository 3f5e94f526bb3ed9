"""The queue's summary index: what mailq shows of each entry, without opening 100,000 files.

``queue_directory/summaries`` is an append-only cache. Every envelope write appends one line
(``Queue.write_envelope``, before the rename that publishes the envelope)::

    INODE :ID ARRIVAL SIZE :SENDER N  STATE :ADDRESS :REASON  ... (N recipients)

keyed by the inode of the envelope file it describes. Envelope files are never changed in
place (rewrites are new files renamed over the old; hold and release are renames, which keep
the inode), so "the newest line for this inode" describes the file exactly. A reader lists
the state directories (names and inodes only: one getdents per few hundred entries), walks
the index from its end, takes the first line whose (inode, id) is listed, and reads the file
itself for any entry that has no line. The index is never the authority: the runner and
postsuper never read it, and a missing, foreign or stale index only costs speed.

Trust rules: the first line names the boot, file system and queue directory it was written
for (``pymailtools-summaries 2 BOOT_ID DEV INO``); a crash (lines not on disk) or a restored or
copied queue (new inodes) makes it distrusted until ``rebuild`` writes a new one. A failed
append deletes the index, so a line can never be missing while an older one for a reused
inode survives. Appenders hold a shared flock; ``rebuild`` holds the exclusive one.
Appending is in summaries.py (sendmail's hot path loads only that); this module reads the
index and rebuilds it.
"""

from __future__ import annotations

import fcntl
import os

from pymailtools.queue.envelope import CorruptEnvelope, Envelope, read_envelope, unquote
from pymailtools.queue.summaries import _O_CLOEXEC, _RS, _US

# The writing half (sendmail's hot path loads only that module); its names are this
# module's too, as callers have always used them.
from pymailtools.queue.summaries import MAGIC as MAGIC
from pymailtools.queue.summaries import NAME as NAME
from pymailtools.queue.summaries import STATES as STATES
from pymailtools.queue.summaries import append as append
from pymailtools.queue.summaries import file_mode as file_mode
from pymailtools.queue.summaries import header as header
from pymailtools.queue.summaries import path as path
from pymailtools.queue.summaries import record as record
from pymailtools.queue.summaries import set_mode as set_mode

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

_CHUNK = 1 << 18
_INO_BITS = 38  # key = 38 bits of inode, 24 bits of the id's hash, 2 bits of state: < 2**64
_MASK = (1 << _INO_BITS) - 1


# -- reading ------------------------------------------------------------------------------

def key(ino: int, qid: str) -> int:
    """One integer for (inode, id); the id's hash catches an inode reused under another id."""
    return ((ino & _MASK) << 24) | (hash(qid) & 0xFFFFFF)


class Live:
    """The entries in the state directories right now, as sorted keys: about 45 bytes per
    entry, so memory stays nearly flat however long the queue is."""

    def __init__(self, root: str, states: tuple[str, ...] = STATES) -> None:
        # off the submission path: only listings and rebuilds build a Live set
        from bisect import bisect_left

        keys: list[int] = []
        self.counts = dict.fromkeys(STATES, 0)
        for code, state in enumerate(STATES):
            if state not in states:
                continue
            try:
                it = os.scandir(root + "/" + state)
            except (FileNotFoundError, NotADirectoryError):
                continue
            before = len(keys)
            with it:
                for e in it:
                    name = e.name
                    if len(name) <= 32 and name.isascii() and name.isalnum():
                        keys.append(key(e.inode(), name) << 2 | code)
            self.counts[state] = len(keys) - before
        keys.sort()
        # A list, not an array('Q'): bisect reads a list's items without making int objects,
        # and the list had to exist anyway to be sorted (the peak is the same).
        self.keys = keys
        self.used = bytearray(len(keys))
        self._bisect = bisect_left

    def __len__(self) -> int:
        return len(self.keys)

    def slot(self, ino: int, qid: str, code: int) -> int:
        """The index of the unclaimed live entry (ino, qid) in the state numbered ``code``,
        or -1 (also for an invalid id)."""
        if not (len(qid) <= 32 and qid.isascii() and qid.isalnum()):
            return -1
        k = key(ino, qid) << 2 | code
        keys = self.keys
        i = self._bisect(keys, k)
        return i if i < len(keys) and keys[i] == k and not self.used[i] else -1

    def _find(self, k: int) -> int:
        """The index of key ``k`` in keys, or -1."""
        keys = self.keys
        i = self._bisect(keys, k << 2)
        return i if i < len(keys) and keys[i] >> 2 == k else -1

    def claim(self, k: int) -> str | None:
        """The state of the unclaimed live entry with key ``k`` (then claimed), else None."""
        i = self._find(k)
        if i < 0 or self.used[i]:
            return None
        self.used[i] = 1
        return STATES[self.keys[i] & 3]

    def claimed(self, ino: int, qid: str) -> bool:
        i = self._find(key(ino, qid))
        return i >= 0 and bool(self.used[i])


def trusted(root: str, fd: int) -> int:
    """The offset of the first line after a header written for this boot and queue, or 0
    when the index cannot be trusted."""
    first = os.pread(fd, 512, 0).partition(b"\n")
    if not first[1]:
        return 0
    try:
        want = header(root)
    except OSError:
        return 0
    return len(first[0]) + 1 if first[0] + b"\n" == want else 0


def _reverse_lines(fd: int, start: int, end: int) -> Iterator[bytes]:
    """Complete lines between ``start`` and ``end``, last first; a final fragment without its
    newline (an append in progress, or torn) is skipped."""
    pos, tail, skipping = end, b"", True
    while pos > start:
        n = min(_CHUNK, pos - start)
        pos -= n
        block = os.pread(fd, n, pos)
        if skipping:
            i = block.rfind(b"\n")
            if i < 0:
                continue  # still inside the final fragment
            skipping = False
            lines = block[:i].split(b"\n")
        else:
            lines = (block + tail).split(b"\n")
        tail = lines[0]
        yield from reversed(lines[1:])
    if tail and not skipping:
        yield tail


def _index_lines(root: str) -> Iterator[str]:
    """The lines of a trusted index, newest first; nothing when there is none to trust."""
    try:
        fd = os.open(path(root), os.O_RDONLY | os.O_NOFOLLOW | _O_CLOEXEC)
    except OSError:
        return
    try:
        start = trusted(root, fd)
        if start:
            for line in _reverse_lines(fd, start, os.fstat(fd).st_size):
                yield line.decode("utf-8", "surrogateescape")
    finally:
        os.close(fd)


def parse(text: str) -> tuple[int, str, list[str]] | None:
    """(inode, id, fields) of a well-formed line, else None."""
    t = text.partition(_US)[0].split(" ")
    if len(t) < 9 or not t[0].isdigit() or t[1][:1] != ":":
        return None
    qid = t[1][1:]
    if not (len(qid) <= 32 and qid.isascii() and qid.isalnum()):
        return None
    n = t[5]
    if not n.isdigit() or len(t) != 6 + 3 * int(n):
        return None
    return int(t[0]), qid, t


_REASONS: dict[str, str] = {}  # a backlog shares a few reasons: unquote each once
_DONE = ("sent", "bounced")
_WAITING = ("pending", "deferred")


def _reason(quoted: str) -> str:
    """Unquote a reason and remember it (an empty reason is cheap and not remembered)."""
    if len(_REASONS) > 1024:
        _REASONS.clear()
    reason = _REASONS[quoted] = unquote(quoted)
    return reason


def rows(root: str, live: Live, state: str) -> Iterator[tuple[str, int, float, str,
                                                              list[tuple[str, str]]]]:
    """(id, size, arrival, sender, [(address, reason) of each recipient not done]) of each
    live entry in ``state`` the index describes, newest line first; each is claimed in
    ``live``. Yields nothing when there is no trusted index."""
    code = STATES.index(state)
    for line in _index_lines(root):
        p = parse(line)
        if p is None:
            continue
        ino, qid, t = p
        i = live.slot(ino, qid, code)
        if i < 0:
            continue
        try:
            pending = []
            for j in range(6, len(t), 3):
                if t[j] in _WAITING:
                    pending.append((unquote(t[j + 1]), _REASONS.get(t[j + 2]) or _reason(t[j + 2])))
                elif t[j] not in _DONE:
                    raise CorruptEnvelope("bad recipient state")
            row = (qid, int(t[3]), float(t[2]), unquote(t[4]), pending)
        except ValueError:  # CorruptEnvelope too: read from the envelope instead
            continue
        live.used[i] = 1
        yield row


def rendered(root: str, live: Live, state: str) -> Iterator[tuple[str, int, float, str, str]]:
    """(id, size, arrival, mailq text after the date, postqueue -j object after queue_name) of
    each live entry in ``state`` the index describes, as rows() but without parsing the
    fields: the plain listings of 100,000 entries."""
    code = STATES.index(state)
    for line in _index_lines(root):
        fields, _, tails = line.partition(_US)
        mailq, sep, json = tails.partition(_US)
        t = fields.split(" ", 4)
        if not sep or len(t) < 5 or not t[0].isdigit() or t[1][:1] != ":":
            continue
        i = live.slot(int(t[0]), t[1][1:], code)
        if i < 0:
            continue
        try:
            row = (t[1][1:], int(t[3]), float(t[2]), mailq.replace(_RS, "\n"), json)
        except ValueError:
            continue
        live.used[i] = 1
        yield row


def unindexed(root: str, live: Live, states: tuple[str, ...] = STATES
              ) -> Iterator[tuple[str, str, int]]:
    """(state, id, dir fd) of the live entries in ``states`` that no index line described (to
    be read directly); the directory fd is valid until the next item."""
    if live.used.count(0) == 0:
        return  # the common case: the index described every entry
    for state in STATES:
        if state not in states or not live.counts[state]:
            continue
        try:
            dfd = os.open(root + "/" + state, os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            continue
        try:
            with os.scandir(dfd) as it:
                for e in it:
                    name = e.name
                    if (len(name) <= 32 and name.isascii() and name.isalnum()
                            and not live.claimed(e.inode(), name)):
                        yield state, name, dfd
        finally:
            os.close(dfd)


# -- rebuilding ---------------------------------------------------------------------------

def rebuild(root: str) -> int:
    """Write a fresh index of the live entries (the newest line of each, the others read from
    their envelopes) and swap it in. Appenders wait only for the swap: the lines they add
    while the new index is being built are copied over under the exclusive lock.
    Returns the number of lines written before that tail."""
    p = path(root)
    try:
        old = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | _O_CLOEXEC)
    except FileNotFoundError:
        old = -1
    tmp = f"{root}/tmp/{NAME}.{os.getpid()}"
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | _O_CLOEXEC, 0o600)
    try:
        live = Live(root)
        buf, count, end = [header(root)], 0, 0
        if old >= 0:
            start, end = trusted(root, old), _line_end(old, os.fstat(old).st_size)
            if start:
                recent: set[str] = set()  # ids of the newest lines kept (the pending check)
                for n, line in enumerate(_reverse_lines(old, start, end)):
                    q = parse(line.decode("utf-8", "surrogateescape"))
                    if q is None:
                        continue
                    if live.claim(key(q[0], q[1])) is None and (
                            n >= PENDING_LINES or q[1] in recent
                            or not _pending(root, q[1], q[0])):
                        continue
                    if n < PENDING_LINES:
                        recent.add(q[1])
                    buf.append(line + b"\n")
                    count += 1
                    if len(buf) >= 4096:
                        _write(out, buf)
        for _state, qid, dfd in unindexed(root, live):
            try:
                fd = os.open(qid, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC,
                             dir_fd=dfd)
            except OSError:
                continue
            try:
                ino = os.fstat(fd).st_ino
                env = Envelope.from_bytes(read_envelope(fd))
            except (CorruptEnvelope, OSError, UnicodeError):
                continue
            finally:
                os.close(fd)
            if env.id == qid:
                buf.append(record(env, ino))
                count += 1
                if len(buf) >= 4096:
                    _write(out, buf)
        _write(out, buf)
        os.fchmod(out, file_mode(root))
        _swap(root, old, end, out, tmp)
    finally:
        os.close(out)
        if old >= 0:
            os.close(old)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    return count


# A line is appended before its envelope is published (renamed into a state directory), so
# the newest lines may describe entries that are not listed yet: the rebuild keeps those among
# the last PENDING_LINES that describe such an entry (the newest line of each). More appenders
# than that publishing at the very moment of a rebuild would be needed to lose a line (and a
# lost line only costs speed).
PENDING_LINES = 256


def _pending(root: str, qid: str, ino: int) -> bool:
    """Does the line (``ino``, ``qid``) describe an entry published since the rebuild listed
    the queue, or being published (its message file exists, no state file yet)? A line of an
    older envelope (a state file with another inode is listed) is not. An orphan kept this way
    is harmless: readers take only lines whose file is listed."""
    for state in STATES:
        try:
            return os.lstat(f"{root}/{state}/{qid}").st_ino == ino
        except FileNotFoundError:
            continue
    return os.path.lexists(f"{root}/messages/{qid}")


def _line_end(fd: int, size: int) -> int:
    """The offset just after the last newline before ``size`` (a line being appended is not
    complete: it belongs to the tail)."""
    pos = size
    while pos > 0:
        n = min(_CHUNK, pos)
        i = os.pread(fd, n, pos - n).rfind(b"\n")
        if i >= 0:
            return pos - n + i + 1
        pos -= n
    return 0


def _swap(root: str, old: int, end: int, out: int, tmp: str) -> None:
    """Under the exclusive lock: copy what was appended to the old index since ``end``, then
    rename the new one over it. If another process rebuilt meanwhile, keep theirs."""
    p = path(root)
    lock = os.open(p, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | _O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        st = os.fstat(lock)
        if old >= 0 and os.fstat(old).st_ino != st.st_ino:
            return
        if old >= 0:
            pos = end
        else:  # created meanwhile by an appender: its lines (after its header) are the tail
            first = os.pread(lock, 512, 0)
            pos = first.find(b"\n") + 1 if st.st_size else 0
        while chunk := os.pread(lock, _CHUNK, pos):
            _write(out, [chunk])
            pos += len(chunk)
        os.rename(tmp, p)
    finally:
        os.close(lock)


def _write(fd: int, buf: list[bytes]) -> None:
    data = memoryview(b"".join(buf))
    buf.clear()
    while data:
        data = data[os.write(fd, data):]


def maybe_rebuild(root: str, live_count: int | None = None) -> bool:
    """Rebuild when the index has grown well past its live lines (every retry appends one)
    or is not trusted; cheap when it has not: the header is read, nothing else."""
    try:
        fd = os.open(path(root), os.O_RDONLY | os.O_NOFOLLOW | _O_CLOEXEC)
    except OSError:
        return False
    try:
        size, ok = os.fstat(fd).st_size, trusted(root, fd) > 0
    finally:
        os.close(fd)
    if ok and size < (4 << 20):
        return False
    if live_count is None:
        live_count = len(Live(root))
    if ok and size < 3 * 256 * max(live_count, 1):
        return False
    rebuild(root)
    return True
