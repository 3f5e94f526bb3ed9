"""The queue listing in Postfix's mailq format (long-id layout), byte for byte."""

import os
import time
from collections.abc import Iterator
from typing import NamedTuple

from pymailtools import pickup
from pymailtools.envelope import CorruptEnvelope, Envelope
from pymailtools.queue import DEFERRED, HOLD, INCOMING, MAILDROP, EntryBusy, EntryNotFound, Queue

HEADING = "%-17s %8s %-19s %s\n" % (
    "----Queue ID-----", "--Size--", "---Arrival Time----", "--Sender/Recipient------")


class Item(NamedTuple):
    state: str  # maildrop, incoming, deferred, hold
    envelope: Envelope
    active: bool


def printable(s: str) -> str:
    """Unprintable characters as '?', like Postfix, so one field stays one line."""
    return "".join(c if c.isprintable() else "?" for c in s)


def items(queue: Queue, max_message: int) -> Iterator[Item]:
    """Entries in Postfix's scan order: maildrop, incoming (active marked), deferred, hold."""
    drop = os.path.join(queue.root, MAILDROP)
    try:
        names = sorted(os.listdir(drop))
    except OSError:
        names = []
    for name in names:
        try:
            fd = os.open(os.path.join(drop, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            d = pickup.read(fd, max_message)
            d.envelope.id = name
            yield Item(MAILDROP, d.envelope, False)
        except (CorruptEnvelope, OSError, UnicodeError):
            pass
        finally:
            os.close(fd)
    for state in (INCOMING, DEFERRED, HOLD):
        for qid in queue.ids(state):
            try:
                _, env = queue.load(qid, state)
            except (CorruptEnvelope, OSError, UnicodeError):
                continue
            yield Item(state, env, state != HOLD and _locked(queue, qid))


def _locked(queue: Queue, qid: str) -> bool:
    try:
        fd = queue.lock(qid)
    except EntryBusy:
        return True
    except (EntryNotFound, OSError):
        return False
    os.close(fd)
    return False


def format_item(item: Item) -> str:
    env = item.envelope
    marker = "!" if item.state == HOLD else ("*" if item.active else "")
    when = time.asctime(time.localtime(env.arrival))[:19]
    sender = printable(env.sender) if env.sender else "MAILER-DAEMON"
    lines = ["%-17s %8d %19.19s %s\n" % (env.id + marker, env.size, when, sender)]
    previous = ""
    for r in env.recipients:
        if r.done:
            continue
        reason = printable(r.reason)
        if reason != previous:
            text = reason or "reason unavailable"
            lines.append("%*s(%s)\n" % (max(0, 76 - len(text)), "", text))
            previous = reason
        lines.append("%47s%s\n" % ("", printable(r.address)))
    return "".join(lines)


def listing(queue: Queue, max_message: int) -> Iterator[str]:
    """The complete mailq text, piece by piece (streams: 100,000 entries need no list)."""
    count = size = 0
    for item in items(queue, max_message):
        yield (HEADING if count == 0 else "\n") + format_item(item)
        count += 1
        size += item.envelope.size
    if count == 0:
        yield "Mail queue is empty\n"
    else:
        yield "\n-- %d Kbytes in %d Request%s.\n" % (size // 1024, count, "" if count == 1 else "s")
