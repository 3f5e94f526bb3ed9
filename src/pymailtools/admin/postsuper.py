"""Queue administration (postsuper): delete, hold, release, requeue, purge, check, under lock."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator

from pymailtools.admin.listing import _is_id, _names, _read
from pymailtools.queue import index as qindex
from pymailtools.queue.envelope import CorruptEnvelope, Envelope
from pymailtools.queue.select import Selector
from pymailtools.queue.store import (
    CORRUPT,
    DEFERRED,
    HISTORY,
    HOLD,
    INCOMING,
    MAILDROP,
    STATES,
    EntryBusy,
    EntryNotFound,
    Queue,
    fsync_dir,
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
                for qid in _names(os.path.join(self.root, state)):
                    yield state, qid

    def named(self, ids: Iterable[str], queues: Iterable[str]) -> Iterator[tuple[str, str]]:
        """(state, id) for ids (already validated) wherever they are among the queues."""
        dirs, _ = self.states_for(queues)
        for qid in ids:
            for state in dirs:
                if os.path.lexists(os.path.join(self.root, state, qid)):
                    yield state, qid
                    break

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
                if op == DELETE and state in allowed and self._delete_orphan(state, qid):
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
        if state in allowed and os.path.lexists(os.path.join(self.root, state, qid)):
            return state
        for s in allowed:
            if s != state and os.path.lexists(os.path.join(self.root, s, qid)):
                return s
        return None

    def _selected(self, state: str, qid: str, sel: Selector) -> bool:
        try:
            env = Envelope.from_bytes(_read(os.path.join(self.root, state, qid)))
        except (CorruptEnvelope, OSError, UnicodeError):
            return False
        return env.id == qid and sel.matches(env)

    def _act(self, op: str, e: _Locked) -> bool:
        """The first, atomic step of ``op`` on a locked entry; False if there was nothing to do."""
        src = os.path.join(self.root, e.state, e.qid)
        try:
            if op == DELETE:
                os.unlink(src)  # the envelope first: without it the entry no longer exists
            elif op == HOLD_OP:
                if e.state == HOLD:
                    return False
                os.rename(src, os.path.join(self.root, HOLD, e.qid))
            elif op == RELEASE:
                if e.state != HOLD:
                    return False
                # rename keeps the mtime, i.e. the retry schedule the entry had
                os.rename(src, os.path.join(self.root, DEFERRED, e.qid))
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
            for d in dirs:
                fsync_dir(os.path.join(self.root, d))
        if op == DELETE:
            # Only now that the envelopes' removal is on disk: a crash in between leaves
            # orphaned message files (postsuper -p removes them), never a half entry.
            # (Threads do not help here: parallel unlinks only contend in the journal.)
            ids = [e.qid for e in batch]
            for kind in ("messages", HISTORY):
                _unlink_all(os.path.join(self.root, kind), ids)
        for e in batch:
            if e.fd >= 0:
                os.close(e.fd)
        batch.clear()

    def _delete_orphan(self, state: str, qid: str) -> bool:
        """An envelope whose message file is gone (nothing to lock): remove what is left."""
        path = os.path.join(self.root, state, qid)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        fsync_dir(os.path.join(self.root, state))
        try:
            os.unlink(os.path.join(self.root, HISTORY, qid))
        except FileNotFoundError:
            pass
        return True

    # -- maintenance (-p, -s) -------------------------------------------------------------

    def purge(self, grace: float = 3600.0, now: float | None = None) -> list[str]:
        """Remove temp files, orphaned message and history files older than ``grace``
        (left by crashes); return their paths relative to the queue."""
        now = time.time() if now is None else now
        removed = []
        for name in _names(os.path.join(self.root, "tmp"), ids_only=False):
            path = os.path.join(self.root, "tmp", name)
            if _older(path, now - grace) and _unlink(path):
                removed.append(f"tmp/{name}")
        for kind in ("messages", HISTORY):
            for qid in _names(os.path.join(self.root, kind)):
                if self._listed(qid) or not _older(os.path.join(self.root, kind, qid),
                                                   now - grace):
                    continue
                try:
                    fd = self.queue.lock(qid) if kind == "messages" else -1
                except (EntryBusy, EntryNotFound):
                    continue
                try:
                    if not self._listed(qid) and _unlink(os.path.join(self.root, kind, qid)):
                        removed.append(f"{kind}/{qid}")
                finally:
                    if fd >= 0:
                        os.close(fd)
        for name in _names(os.path.join(self.root, MAILDROP), ids_only=False):
            path = os.path.join(self.root, MAILDROP, name)
            # a submission that died while writing (ID.PID.tmp); a day, as pickup waits
            if not _is_id(name) and _older(path, now - max(grace, 86400.0)) and _unlink(path):
                removed.append(f"{MAILDROP}/{name}")
        return removed

    def _listed(self, qid: str) -> bool:
        return any(os.path.lexists(os.path.join(self.root, s, qid)) for s in STATES)

    def check(self) -> list[tuple[str, str]]:
        """Move entries that cannot be delivered (unreadable, torn, foreign, message missing or
        of the wrong size) and stray files in the state directories to corrupt/.
        Return (name, reason) for each; entries being delivered are left alone."""
        moved = []
        for state in STATES:
            d = os.path.join(self.root, state)
            for name in _names(d, ids_only=False):
                if not _is_id(name):
                    if _quarantine_stray(self.root, state, name):
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
            if not os.path.lexists(os.path.join(self.root, state, qid)):
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


def _unlink_all(directory: str, names: list[str]) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in names:
            try:
                os.unlink(name, dir_fd=dfd)
            except FileNotFoundError:
                pass
    finally:
        os.close(dfd)


def _older(path: str, cutoff: float) -> bool:
    try:
        return os.lstat(path).st_mtime < cutoff
    except FileNotFoundError:
        return False


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _quarantine_stray(root: str, state: str, name: str) -> bool:
    """A file whose name is not an id never becomes a path of ours: keep it under a safe name."""
    safe = "".join(c if c.isascii() and c.isalnum() else "_" for c in name)[:64]
    dst = os.path.join(root, CORRUPT, f"stray-{state}-{safe}-{time.time_ns()}")
    try:
        os.rename(os.path.join(root, state, name), dst)
    except FileNotFoundError:
        return False
    fsync_dir(os.path.join(root, CORRUPT))
    return True
