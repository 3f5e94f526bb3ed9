"""The queue listing: Postfix's mailq text (long-id layout) and postqueue -j JSON, streamed."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple, TypeVar

from pymailtools.queue import index as qindex
from pymailtools.queue import maildrop
from pymailtools.queue.active import active_ids, is_active, probe_active
from pymailtools.queue.envelope import DEFERRED as RCPT_DEFERRED
from pymailtools.queue.envelope import (
    MAGIC,
    PENDING,
    RCPT_STATES,
    CorruptEnvelope,
    Envelope,
    Recipient,
    unquote,
)
from pymailtools.queue.format import json_tail, mailq_tail
from pymailtools.queue.select import Selector
from pymailtools.queue.store import (
    DEFERRED,
    HOLD,
    INCOMING,
    MAILDROP,
    EntryNotFound,
    Queue,
    envelope_bytes,
)

T = TypeVar("T")
HEADING = "%-17s %8s %-19s %s\n" % (
    "----Queue ID-----", "--Size--", "---Arrival Time----", "--Sender/Recipient------")
EMPTY = "Mail queue is empty\n"


class Item(NamedTuple):
    state: str  # maildrop, incoming, deferred, hold
    envelope: Envelope
    active: bool  # a runner holds the entry's lock: Postfix's "active" queue

    @property
    def queue_name(self) -> str:
        return "active" if self.active else self.state


# The head of an envelope exactly as Envelope.to_bytes writes it; one C-level match per entry.
_HEAD = re.compile(MAGIC + r"\nid (:[^\n]*)\narrival ([^\n]*)\nsender (:[^\n]*)\nuid [^\n]*"
                   r"\nuser [^\n]*\norigin [^\n]*\nsize ([^\n]*)\nenvid [^\n]*\nret [^\n]*"
                   r"\nwarned [^\n]*\n")


def summary(data: bytes) -> Envelope:
    """The fields a listing shows (id, arrival, sender, size; per recipient state, address,
    reason), parsed from an envelope as Envelope.to_bytes writes it; anything else goes to
    Envelope.from_bytes, the authority. Much faster: mailq reads 100,000 of these."""
    text = data.decode("utf-8", "surrogateescape")
    m = _HEAD.match(text)
    if m is None:
        return Envelope.from_bytes(data)
    lines = text[m.end():].split("\n")
    n = len(lines) - 2  # recipient records, then "end N", then "" after the final newline
    if n < 1 or lines[-1] or lines[n] != f"end {n + 11}":
        return Envelope.from_bytes(data)
    rcpts = []
    for line in lines[:n]:
        p = line.split(" ")
        if len(p) != 10 or p[0] != "rcpt" or p[1] not in RCPT_STATES:
            return Envelope.from_bytes(data)
        a, r = p[5], p[9]  # inline the common case of unquote: nothing escaped
        rcpts.append(Recipient(a[1:] if a[:1] == ":" and "%" not in a else unquote(a),
                               state=p[1],
                               reason=r[1:] if r == ":" else unquote(r)))
    try:
        return Envelope(unquote(m[1]), unquote(m[3]), rcpts, arrival=float(m[2]),
                        size=int(m[4]))
    except ValueError as e:
        raise CorruptEnvelope(f"bad record: {e}") from None


def _maildrop_items(queue: Queue, max_message: int) -> Iterator[Item]:
    for name in maildrop.names(queue):
        try:
            env = maildrop.load(queue, name, max_message)
        except (CorruptEnvelope, OSError, UnicodeError):
            continue
        yield Item(MAILDROP, env, False)


class Row(NamedTuple):
    """What a listing shows of one entry: cheap to make from an index line (no Envelope)."""
    state: str
    active: bool
    id: str
    size: int
    arrival: float
    sender: str
    pending: list[tuple[str, str]]  # (address, reason) of each recipient not yet done

    @property
    def queue_name(self) -> str:
        return "active" if self.active else self.state


def _row(state: str, env: Envelope, active: bool) -> Row:
    return Row(state, active, env.id, env.size, env.arrival, env.sender,
               [(r.address, r.reason) for r in env.recipients if not r.done])


UNKNOWN = "(unknown)"  # the sender of an entry only root can read (see _stat_row)


def _stat_row(state: str, qid: str, dfd: int) -> Row | None:
    """What an ordinary user can tell of an entry the index does not describe (no index
    after a reboot, or no line yet) and whose envelope is private: its id and state, and the
    earliest time its file shows (arrival, for a new entry). Size 0, sender unknown, no
    recipients: honest rather than invented. None when it is gone."""
    try:
        st = os.stat(qid, dir_fd=dfd, follow_symlinks=False)
    except OSError:
        return None
    return Row(state, False, qid, 0, min(st.st_mtime, st.st_ctime), UNKNOWN, [])


def rows(queue: Queue, max_message: int, selector: Selector | None = None,
         unread: list[str] | None = None) -> Iterator[Row]:
    """Maildrop entries first, then every entry of incoming, deferred and hold: those the
    summary index describes (no file opened), then the others, read from their envelopes.
    Entries a runner is delivering are marked active."""
    for _, row in _walk(queue, max_message, selector, _same, None, unread):
        yield row


def _same(row: Row) -> Row:
    return row


def _walk(queue: Queue, max_message: int, selector: Selector | None,
          render: Callable[[Row], T], fast: Callable[..., T] | None,
          unread: list[str] | None = None) -> Iterator[tuple[int, T]]:
    """(size, render(row)) of each entry. With ``fast`` and no selector, entries the index
    describes skip the Row: fast(state, active, id, size, arrival, mailq tail, JSON tail),
    their text being in the index already (the plain listings of 100,000 entries).
    Entries neither the index nor this user can read are listed as _stat_row tells (unless
    a selector needs their fields) and their ids appended to ``unread``."""
    sel = selector or Selector()
    if sel.wants_state(MAILDROP):
        for item in _maildrop_items(queue, max_message):
            if sel.matches(item.envelope):
                yield item.envelope.size, render(_row(MAILDROP, item.envelope, False))
    states = tuple(s for s in (INCOMING, DEFERRED, HOLD) if sel.wants_state(s))
    if not states:
        return
    locked = active_ids(queue)
    live = qindex.Live(queue.root, states)
    fields = sel.needs_envelope
    if not sel.empty or locked is None:
        fast = None
    for state in states:  # Postfix's scan order
        if not live.counts[state]:
            continue
        if fast is not None and locked is not None:  # 100,000 entries: keep this loop lean
            hold = state == HOLD
            for qid, size, arrival, mq, js in qindex.rendered(queue.root, live, state):
                yield size, fast(state, not hold and qid in locked, qid, size, arrival, mq, js)
        else:
            for qid, size, arrival, sender, pending in qindex.rows(queue.root, live, state):
                active = _active(queue, state, qid, locked)
                if sel.matches_queue(state, active) and (
                        not fields or sel.matches_fields(arrival, sender, pending)):
                    yield size, render(Row(state, active, qid, size, arrival, sender, pending))
        for _, qid, dfd in qindex.unindexed(queue.root, live, (state,)):
            try:
                env = summary(envelope_bytes(qid, dfd))
            except PermissionError:
                row = _stat_row(state, qid, dfd)
                if row is not None and sel.matches_queue(state, False) and not fields:
                    if unread is not None:
                        unread.append(qid)
                    yield 0, render(row)
                continue
            except (CorruptEnvelope, OSError, UnicodeError):
                continue  # gone meanwhile, or corrupt: postsuper -s moves it aside
            if env.id == qid:
                active = _active(queue, state, qid, locked)
                if sel.matches_queue(state, active) and sel.matches(env):
                    yield env.size, render(_row(state, env, active))


def _active(queue: Queue, state: str, qid: str, locked: set[str] | None) -> bool:
    return state != HOLD and is_active(queue, qid, locked)


def items(queue: Queue, max_message: int, selector: Selector | None = None,
          unread: list[str] | None = None) -> Iterator[Item]:
    """The rows as Items with a summary Envelope (pending recipients only): the table view."""
    for row in rows(queue, max_message, selector, unread):
        rcpts = [Recipient(a, state=RCPT_DEFERRED if r else PENDING, reason=r)
                 for a, r in row.pending]
        env = Envelope(row.id, row.sender, rcpts, arrival=row.arrival, size=row.size)
        yield Item(row.state, env, row.active)


_DATES: dict[int, str] = {}


def _asctime(t: int) -> str:
    """asctime(localtime(t)) without the year. Cached per minute (one localtime call per
    minute of arrivals, not per entry) when the zone's offset is whole minutes, as today's."""
    minute = t - t % 60
    s = _DATES.get(minute)
    if s is None:
        if len(_DATES) > 4096:
            _DATES.clear()
        tm = time.localtime(minute)
        if tm.tm_sec:  # an offset with seconds (historical zones): per second, uncached
            return time.asctime(time.localtime(t))[:19]
        s = _DATES[minute] = time.asctime(tm)[:17]
    return s + "%02d" % (t - minute)


def _mailq_text(state: str, active: bool, qid: str, size: int, arrival: float,
                tail: str, json: str = "") -> str:
    marker = "!" if state == HOLD else ("*" if active else "")
    return "%-17s %8d %s" % (qid + marker, size, _asctime(int(arrival))) + tail


def _json_text(state: str, active: bool, qid: str, size: int, arrival: float, tail: str,
               json: str) -> str:
    return '{"queue_name": "%s", ' % ("active" if active else state) + json + "\n"


def format_row(row: Row) -> str:
    """One entry in the long-id layout: id+markers, size, date, sender, reasons, recipients."""
    return _mailq_text(row.state, row.active, row.id, row.size, row.arrival,
                       mailq_tail(row.sender, row.pending))


def listing(queue: Queue, max_message: int, selector: Selector | None = None,
            unread: list[str] | None = None) -> Iterator[str]:
    """The complete mailq text, piece by piece (streams: 100,000 entries need no list)."""
    count = size = 0
    for n, text in _walk(queue, max_message, selector, format_row, _mailq_text, unread):
        yield (HEADING if count == 0 else "\n") + text
        count += 1
        size += n
    if count == 0:
        yield EMPTY
    else:
        yield "\n-- %d Kbytes in %d Request%s.\n" % (size // 1024, count, "" if count == 1 else "s")


def json_row(row: Row) -> str:
    """One postqueue -j line: Postfix's keys, order, separators and types."""
    return ('{"queue_name": "%s", ' % row.queue_name
            + json_tail(row.id, row.arrival, row.size, row.sender, row.pending) + "\n")


def json_lines(queue: Queue, max_message: int, selector: Selector | None = None,
               unread: list[str] | None = None) -> Iterator[str]:
    """postqueue -j: one object per line; an empty queue prints nothing."""
    for _, text in _walk(queue, max_message, selector, json_row, _json_text, unread):
        yield text


def find_item(queue: Queue, qid: str, max_message: int) -> Item | None:
    """The entry with this id (validated by the caller), wherever it is, or None."""
    try:
        state, env = queue.load(qid)
    except EntryNotFound:
        try:
            return Item(MAILDROP, maildrop.load(queue, qid, max_message), False)
        except FileNotFoundError:
            return None
    return Item(state, env, state != HOLD and probe_active(queue, qid))
