"""postsuper's whole-queue path: when -d ALL / -h ALL may swap whole state directories
(queue/bulk.py, constant time), and settling what a swap left, in a detached process."""

from __future__ import annotations

import os

from pymailtools.admin.postsuper import DELETE, HOLD_OP
from pymailtools.qmgr.trigger import detach
from pymailtools.queue import bulk
from pymailtools.queue.bulk import Outcome
from pymailtools.queue.store import DEFERRED, HOLD, INCOMING, Queue


def whole(op: str, queue: Queue, queues: list[str]) -> tuple[Outcome | None, list[str]]:
    """-d ALL / -h ALL on whole directories: (outcome or None, the queues still to do entry
    by entry). Only where "active" needs no entry-by-entry look: with both of its
    directories; entry by entry where renameat2 is missing."""
    names = set(queues)
    if "active" in names and not {INCOMING, DEFERRED} <= names:
        return None, queues
    try:
        if op == DELETE:
            return bulk.delete_all(queue, [s for s in (HOLD, INCOMING, DEFERRED)
                                           if s in names]), []
        if op == HOLD_OP and DEFERRED in names:
            outcome = bulk.hold_all(queue)
            if outcome is not None:
                return outcome, [q for q in queues if q == INCOMING]
    except bulk.Unsupported:
        pass
    return None, queues


def settle_in_background(queue: Queue, held_skipped: list[str]) -> None:
    """Run settle() in a detached process (reclaiming 100,000 entries' space takes a while)."""
    if detach():
        try:
            # Not niced: the admin is waiting for the disk space, and most of the time is
            # the device's, not the CPU's.
            bulk.settle(queue, held_skipped)
        finally:
            os._exit(0)
