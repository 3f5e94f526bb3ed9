"""Queue administration (postsuper): delete, hold, release, requeue, purge, check, under lock."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

from pymailtools.queue import ids as queueid
from pymailtools.queue import index as qindex
from pymailtools.queue import maildrop
from pymailtools.queue.envelope import CorruptEnvelope
from pymailtools.queue.select import Selector
from pymailtools.queue.store import (
    DEFERRED,
    HOLD,
    INCOMING,
    STATES,
    EntryBusy,
    EntryNotFound,
    Queue,
)

DELETE, HOLD_OP, RELEASE, REQUEUE = "delete", "hold", "release", "requeue"
OPERATIONS = (DELETE, REQUEUE, HOLD_OP, RELEASE)  # Postfix's order of work
# Postfix's default queues per operation ("active" = entries being delivered: always busy).
DEFAULT_QUEUES = {
    DELETE: ("hold", "incoming", "active", "deferred"),
    HOLD_OP: ("incoming", "active", "deferred"),
    RELEASE: ("hold",),
    REQUEUE: ("hold", "incoming", "active", "deferred"),
}
SUMMARY = {DELETE: "Deleted", REQUEUE: "Requeued", HOLD_OP: "Placed on hold",
           RELEASE: "Released from hold"}
DONE = {DELETE: "removed", REQUEUE: "requeued", HOLD_OP: "placed on hold",
        RELEASE: "released from hold"}
BATCH = 256  # entries locked at once: one directory fsync per batch, far below the fd limit
DELETE_BATCH = 4096  # deletes hold no lock past the envelope: only ids wait for the fsync


def summary(op: str, count: int) -> str:
    """Postfix's summary line, singular for one message."""
    return f"{SUMMARY[op]}: {count} message{'' if count == 1 else 's'}"


class Result:
    """What one operation did."""

    def __init__(self) -> None:
        self.count = 0
        self.busy: list[str] = []


class _Locked:
    """One entry locked for an operation: its lock fd, state and id."""

    __slots__ = ("fd", "state", "qid")

    def __init__(self, fd: int, state: str, qid: str) -> None:
        self.fd, self.state, self.qid = fd, state, qid


class Admin:
    """Applies postsuper's operations to a queue; every entry is changed under its lock."""

    def __init__(self, queue: Queue, *, on_done: Callable[[str, str], None] | None = None,
                 on_busy: Callable[[str], None] | None = None) -> None:
        self.queue = queue
        self.root = queue.root
        self.on_done = on_done
        self.on_busy = on_busy

    # -- choosing entries -----------------------------------------------------------------

    @staticmethod
    def states_for(queues: Iterable[str]) -> tuple[tuple[str, ...], bool]:
        """(state directories to scan, whether only entries being delivered are wanted)."""
        names = set(queues)
        dirs = [s for s in (INCOMING, DEFERRED, HOLD) if s in names]
        only_active = "active" in names and not ({INCOMING, DEFERRED} <= names)
        if "active" in names:
            dirs += [s for s in (INCOMING, DEFERRED) if s not in dirs]
        return tuple(dirs), only_active

    def scan(self, op: str, queues: Iterable[str]) -> Iterator[tuple[str, str]]:
        """(state, id) of every entry in the queues, streamed; the destination of a move is
        scanned first so that no entry is met twice."""
        dirs, _ = self.states_for(queues)
        order = {REQUEUE: (INCOMING, DEFERRED, HOLD), RELEASE: (DEFERRED, HOLD)}.get(
            op, (HOLD, INCOMING, DEFERRED))
        for state in order:
            if state in dirs:
                for qid in self.queue.names(state):
                    yield state, qid

    def named(self, ids: Iterable[str], queues: Iterable[str]) -> Iterator[tuple[str, str]]:
        """(state, id) for ids (already validated) wherever they are among the queues."""
        dirs, _ = self.states_for(queues)
        for qid in ids:
            try:
                state = self.queue.find(qid, dirs)
            except EntryNotFound:
                continue
            yield state, qid

    # -- the operations -------------------------------------------------------------------

    def apply(self, op: str, candidates: Iterable[tuple[str, str]], queues: Iterable[str],
              selector: Selector | None = None) -> Result:
        """Lock each candidate, re-check where it is, and apply ``op``, in batches."""
        dirs, only_active = self.states_for(queues)
        allowed = tuple(s for s in dirs if not only_active)
        sel = selector if selector is not None and selector.needs_envelope else None
        result = Result()
        batch: list[_Locked] = []
        seen: set[str] = set()  # requeue rewrites entries in incoming; meet none twice
        for state, qid in candidates:
            if qid in seen:
                continue
            try:
                fd = self.queue.lock(qid)
            except EntryBusy:
                result.busy.append(qid)
                if self.on_busy:
                    self.on_busy(qid)
                continue
            except EntryNotFound:
                if op == DELETE and state in allowed and self.queue.remove_orphan(state, qid):
                    self._done(result, op, qid)
                continue
            try:
                where = self._where(state, qid, allowed)
                if where is None or (sel is not None and not self._selected(where, qid, sel)):
                    os.close(fd)
                    continue
            except BaseException:
                os.close(fd)
                raise
            entry = _Locked(fd, where, qid)
            try:
                acted = self._act(op, entry)
            except BaseException:
                os.close(fd)
                raise
            if not acted:
                os.close(fd)
                continue
            if op == REQUEUE and where == INCOMING:
                seen.add(qid)
            if op == DELETE:
                # Without its envelope the entry is gone for every runner (they look for it
                # again once they hold the lock), so the lock can go now; the data files
                # follow once the removal is on disk.
                os.close(fd)
                entry.fd = -1
            batch.append(entry)
            self._done(result, op, qid)
            if len(batch) >= (DELETE_BATCH if op == DELETE else BATCH):
                self._finish(op, batch)
                batch = []
        self._finish(op, batch)
        return result

    def _done(self, result: Result, op: str, qid: str) -> None:
        result.count += 1
        if self.on_done:
            self.on_done(qid, DONE[op])

    def _where(self, state: str, qid: str, allowed: tuple[str, ...]) -> str | None:
        """The entry's state now that we hold its lock (a runner may have moved it)."""
        first = (state,) if state in allowed else ()
        try:
            return self.queue.find(qid, first + tuple(s for s in allowed if s != state))
        except EntryNotFound:
            return None

    def _selected(self, state: str, qid: str, sel: Selector) -> bool:
        try:
            _, env = self.queue.load(qid, state)
        except (CorruptEnvelope, OSError, UnicodeError):
            return False
        return sel.matches(env)

    def _act(self, op: str, e: _Locked) -> bool:
        """The first, atomic step of ``op`` on a locked entry; False if there was nothing to do."""
        try:
            if op == DELETE:
                # the envelope first: without it the entry no longer exists
                return self.queue.discard(e.state, e.qid)
            elif op == HOLD_OP:
                if e.state == HOLD:
                    return False
                self.queue.move(e.qid, e.state, HOLD, sync=False)
            elif op == RELEASE:
                if e.state != HOLD:
                    return False
                # a move keeps the mtime, i.e. the retry schedule the entry had
                self.queue.move(e.qid, e.state, DEFERRED, sync=False)
            elif op == REQUEUE:
                self._requeue(e)
        except FileNotFoundError:
            return False
        return True

    def _requeue(self, e: _Locked) -> None:
        """Due now, all pending recipients, from any state (held entries are released)."""
        _, env = self.queue.load(e.qid, e.state)
        for r in env.recipients:
            if not r.done:
                r.next_try = 0.0
        self.queue.save(env, e.state, INCOMING)

    def _finish(self, op: str, batch: list[_Locked]) -> None:
        """Make a batch durable (one fsync per directory), then drop data files and locks."""
        if not batch:
            return
        dirs = {e.state for e in batch}
        if op == HOLD_OP:
            dirs.add(HOLD)
        elif op == RELEASE:
            dirs.add(DEFERRED)
        if op != REQUEUE:  # Queue.save synced its own moves
            self.queue.sync(*dirs)
        if op == DELETE:
            # Only now that the envelopes' removal is on disk: a crash in between leaves
            # orphaned message files (postsuper -p removes them), never a half entry.
            # (Threads do not help here: parallel unlinks only contend in the journal.)
            self.queue.remove_files([e.qid for e in batch])
        for e in batch:
            if e.fd >= 0:
                os.close(e.fd)
        batch.clear()

    # -- maintenance (-p, -s) -------------------------------------------------------------

    def purge(self, grace: float = 3600.0, now: float | None = None) -> list[str]:
        """Remove temp files, orphaned message and history files older than ``grace``, and
        maildrop submissions that died while being written, older than a day at least (as
        pickup waits); return their paths relative to the queue."""
        return (self.queue.purge(grace, now)
                + maildrop.purge(self.queue, max(grace, maildrop.STALE_TEMP), now))

    def check(self) -> list[tuple[str, str]]:
        """Move entries that cannot be delivered (unreadable, torn, foreign, message missing or
        of the wrong size) and stray files in the state directories to corrupt/.
        Return (name, reason) for each; entries being delivered are left alone."""
        moved = []
        for state in STATES:
            for name in self.queue.names(state, ids_only=False):
                if not queueid.is_valid(name):
                    if self.queue.quarantine_stray(state, name):
                        moved.append((f"{state}/{name}", "not a queue id"))
                    continue
                reason = self._check_entry(state, name)
                if reason:
                    moved.append((name, reason))
        qindex.rebuild(self.root)  # the listing's summary index, from the entries left
        return moved

    def _check_entry(self, state: str, qid: str) -> str:
        try:
            fd = self.queue.lock(qid)
        except EntryBusy:
            return ""
        except EntryNotFound:
            try:
                self.queue.find(qid, (state,))
            except EntryNotFound:
                return ""
            self.queue.quarantine(qid, state)
            return "message file missing"
        try:
            try:
                _, env = self.queue.load(qid, state)
                self.queue.message(fd, env).close()
            except FileNotFoundError:
                return ""
            except (CorruptEnvelope, OSError, UnicodeError) as e:
                self.queue.quarantine(qid, state)
                return str(e) or type(e).__name__
            return ""
        finally:
            os.close(fd)

