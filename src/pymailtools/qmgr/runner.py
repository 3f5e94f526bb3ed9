"""The queue runner: takes due entries under lock, routes and delivers, defers, bounces."""

import io
import marshal
import os
import sys
import time
from typing import BinaryIO

from pymailtools import log
from pymailtools.config import Config
from pymailtools.errors import ConfigError, DeliveryError
from pymailtools.local import agent, route
from pymailtools.local.group import GROUP_MESSAGES, Group
from pymailtools.local.targets import Remote
from pymailtools.log import Logger, make_line
from pymailtools.qmgr.transport import DISCARD, ERROR, LOCAL, RETRY, Route, Router
from pymailtools.queue import index as qindex
from pymailtools.queue.envelope import (
    BOUNCED,
    DEFERRED,
    SENT,
    CorruptEnvelope,
    Envelope,
    Recipient,
    peek,
)
from pymailtools.queue.store import (
    DEFERRED as Q_DEFERRED,
)
from pymailtools.queue.store import (
    INCOMING,
    Attempt,
    EntryBusy,
    EntryNotFound,
    Queue,
    crash_point,
    entry_envelope,
)
from pymailtools.submit.pickup import pickup
from pymailtools.submit.submission import Options, submit

TYPE_CHECKING = False
if TYPE_CHECKING:  # asyncio, aiosmtplib and dnspython load only when a remote recipient is due
    import asyncio

    from pymailtools.qmgr.dispatch import Destination, Dispatcher, Job
    from pymailtools.smtp.client import Outcome

# Entries held locked at once while their remote recipients are sent: large enough to keep
# sessions busy across destinations, small enough for the file descriptor limit.
BATCH = 256
# Local deliveries wait for the disk (an fsync of the file and of the directory each): with
# this many entries or more that have only local recipients, they are shared among forked
# processes, one mailbox's entries always in the same one (no two workers ever wait for each
# other's mailbox lock), and one after the other there, so that they share its lock and
# fsyncs (local.group). LOCAL_WORKERS_PER_CPU per processor we may run on, at most
# LOCAL_WORKERS: enough to keep the processors busy while others wait for an fsync; more
# only add their fork and copied pages (measured on 2 processors: 8 workers deliver a
# Maildir message with a quarter less user CPU than 16, and 4 leave the disk waits showing).
LOCAL_PARALLEL_MIN = 32
LOCAL_WORKERS = 16
LOCAL_WORKERS_PER_CPU = 4
# Envelopes the look at each entry keeps for the workers (see Runner._open), at most: a
# bound on the memory a long queue takes.
LOCAL_LOOKED_MAX = 20000
# Bytes of one group number in the local workers' work list (a pipe).
WORK_RECORD = 4
# Rounds of notices delivered at the end of a run. A notice comes from the null sender and so
# never causes another; the bound only keeps a future kind of notice from chaining without end.
NOTICE_ROUNDS = 3


class Progress:
    """What a front end implements to show a long run (sendmail -q on a terminal)."""

    def add_total(self, n: int) -> None:
        """``n`` more entries will be looked at."""

    def advance(self, stats: "Stats") -> None:
        """One entry is done; ``stats`` are the run's counts so far."""


class _Entry:
    """A locked queue entry in the middle of a run."""

    def __init__(self, qid: str, state: str, env: Envelope, msg: BinaryIO, fd: int,
                 now: float) -> None:
        self.qid = qid
        self.state = state
        self.env = env
        self.msg = msg
        self.fd = fd
        self.now = now
        self.bounced: list[Recipient] = []
        self.attempted = False
        self.remote: list[Recipient] = []
        self.routes: dict[str, Route] = {}  # remote recipient -> its SMTP route
        self.jobs: list[Job] = []
        self._data: bytes | None = None

    def data(self) -> bytes:
        """The message as SMTP DATA, made once however many destinations it goes to."""
        if self._data is None:
            # smtp.client (asyncio, aiosmtplib, dnspython) only when a remote recipient is due
            from pymailtools.smtp.client import encode_data

            self.msg.seek(0)
            self._data = encode_data(self.msg.read())
        return self._data

    def close(self) -> None:
        """Release the lock (idempotent)."""
        if self.fd >= 0:
            self.msg.close()
            os.close(self.fd)
            self.fd = -1
            self._data = None


class Stats:
    """What one run did, for -v summaries and tests."""

    def __init__(self) -> None:
        self.delivered = 0
        self.deferred = 0
        self.bounced = 0
        self.busy = 0
        self.corrupt = 0
        self.results: list[tuple[str, str, str, str]] = []  # (qid, rcpt, status, detail)


def _capture_library_warnings(target: Logger) -> None:
    """Send the warnings of the routing modules (Python logging, logger "pymailtools") to
    the runner's log. When logging is not loaded yet, log.library_warning calls this before
    the first one: a queue run that has none never loads logging (its traceback, threading,
    string... some 15 ms)."""
    import logging

    class ToLogger(logging.Handler):
        runner_log = True

        def emit(self, record: logging.LogRecord) -> None:
            target.warning(record.getMessage())

    lib = logging.getLogger("pymailtools")
    for h in [h for h in lib.handlers if getattr(h, "runner_log", False)]:
        lib.removeHandler(h)
    lib.addHandler(ToLogger(logging.WARNING))
    lib.propagate = False


class Runner:
    """One queue run (or a background loop of them) over a queue directory."""

    def __init__(self, cfg: Config, *, prog: str = "sendmail", verbose: bool = False) -> None:
        self.cfg = cfg
        self.queue = Queue(cfg.queue_directory)
        self.log = Logger(prog, to_syslog=cfg.syslog, verbose=verbose)
        target = self.log
        if "logging" in sys.modules:
            _capture_library_warnings(target)  # loaded anyway: at once, as it always was
            log.before_library_warning = None
        else:
            log.before_library_warning = lambda: _capture_library_warnings(target)
        self.router = Router(cfg)
        for why in self.router.errors:
            self.log.error(f"routing: {why}")
        self.stats = Stats()
        self.seen: set[str] = set()
        self._history: dict[str, list[Attempt]] = {}  # attempts of this pass, per entry
        self._notices: list[str] = []  # ids of the notices queued and not yet delivered
        self._busy: dict[str, str] = {}  # mailboxes found locked in this run, and why
        self.stopping = False  # set (by a signal handler) to end the run after this batch
        self.progress: Progress | None = None
        self._remote: Dispatcher | None = None
        self._remote_error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker = False  # a forked local delivery worker (never forks its own)
        # Envelopes read in incoming/ to choose the workers: id -> (inode of the file, its
        # envelope's bytes)
        self._looked: dict[str, tuple[int, bytes]] = {}
        # Group commit of local deliveries (local.group), during _run_entries: the entries
        # whose deliveries wait for the group's fsync before their queue update, and the
        # deliveries reported only then (envelope, recipient, detail, relay, time).
        self._group: Group | None = None
        self._pending: list[_Entry] = []
        self._provisional: list[tuple[Envelope, Recipient, str, str, float]] = []

    # -- scheduling -----------------------------------------------------------------------

    def run(self, ids: list[str] | None = None, site: str | None = None,
            force: bool = False, housekeeping: bool = False) -> Stats:
        """Deliver due entries (or ``ids``, or those with a recipient at ``site``) once.

        ``housekeeping`` also removes debris of crashed submissions older than a day.
        """
        self._busy.clear()
        if os.geteuid() == 0 or self.queue.direct_access():
            self.queue.ensure(self.cfg.public_listing, repair=True)
        if housekeeping and self.queue.direct_access():
            self.queue.purge(grace=86400)
        if ids is None and self.queue.direct_access():
            pickup(self.queue, self.cfg, self.log)
        try:
            while not self.stopping:
                if ids is not None:
                    todo = []
                    for qid in ids:
                        try:
                            todo.append((self.queue.find(qid), qid))
                        except EntryNotFound:
                            continue
                else:
                    todo = self._all() if force else self.queue.due()
                # Entries queued during this run (new submissions) get a pass of their own.
                todo = [(s, q) for s, q in todo if q not in self.seen and s != "hold"]
                if not todo:
                    break
                if self.progress is not None:
                    self.progress.add_total(len(todo))
                self._run_entries(todo, force=force, site=site)
                # The notices this pass queued go out now, whatever the run is limited to
                # (the next look at the queue would hold them to ``site`` as well).
                self._deliver_notices()
                if ids is not None:
                    break
        finally:
            self._close_remote()
        if self.queue.direct_access():
            # every deferral appended an index line: compact it when it has grown (one stat)
            qindex.maybe_rebuild(self.queue.root)
        return self.stats

    def _all(self) -> list[tuple[str, str]]:
        return [(s, q) for s in (INCOMING, Q_DEFERRED) for q in self.queue.ids(s)]

    def background(self, lock_fd: int) -> None:
        """Run until nothing new is due; then release the lock and look once more (see trigger)."""
        while True:
            self.run()
            os.close(lock_fd)
            if self.stopping:
                return
            fresh = [q for q in self.queue.ids(INCOMING) if q not in self.seen]
            if not fresh:
                return
            again = self.queue.try_run_lock()
            if again is None:
                return  # another runner took over and will deliver them
            lock_fd = again

    # -- entries --------------------------------------------------------------------------

    def process(self, qid: str, state: str, *, force: bool = False,
                site: str | None = None) -> None:
        """Deliver one entry (local and remote recipients) and record the outcome."""
        try:
            self._run_entries([(state, qid)], force=force, site=site)
            self._deliver_notices()
        finally:
            self._close_remote()

    def _run_entries(self, todo: list[tuple[str, str]], *, force: bool,
                     site: str | None) -> None:
        """Local recipients are delivered entry by entry; entries with remote recipients are
        kept locked and sent in batches, so one destination's messages share sessions.

        Consecutive local deliveries into one mailbox share its lock and fsync (local.group):
        their entries are kept locked and updated only once the group is synced."""
        if (len(todo) >= LOCAL_PARALLEL_MIN and not self._worker and self._loop is None
                and self.progress is None and self.queue.direct_access()):
            todo = self._local_workers(todo, force=force, site=site)
        batch: list[_Entry] = []
        group = self._group = Group()
        try:
            for state, qid in todo:
                if self.stopping:
                    break
                self.seen.add(qid)
                entry = self._open(qid, state)
                if entry is None:
                    self._advance()
                    continue
                try:
                    self._local_pass(entry, force=force, site=site)
                except BaseException:
                    entry.close()
                    raise
                if entry.remote:
                    batch.append(entry)
                    if len(batch) >= BATCH:
                        self._commit()  # while the batch is ours to close if it raises
                        todo_now, batch = batch, []
                        self._remote_pass(todo_now)
                elif group.pending:
                    self._pending.append(entry)
                    if group.full() or len(self._pending) >= GROUP_MESSAGES:
                        self._commit()
                else:
                    try:
                        self._commit()  # what is left of the group is durable already
                    except BaseException:
                        entry.close()
                        raise
                    self._finish_entry(entry)
            self._commit()
            if batch:
                todo_now, batch = batch, []
                self._remote_pass(todo_now)
        finally:
            for entry in batch:  # only after an exception: they stay as they were
                entry.close()
            self._drop_group()

    def _commit(self) -> None:
        """Sync the group, report its deliveries (all deferred when its fsync failed), then
        update the queue entries that waited for it."""
        group = self._group
        if group is None:
            return
        group.sync()
        if not (self._provisional or self._pending):
            group.failure = None
            return
        # Test hook (PYMAILTOOLS_TEST_CRASH_AT): die with the group synced, its entries not
        # yet updated.
        crash_point("group_synced")
        failure, group.failure = group.failure, None
        provisional, self._provisional = self._provisional, []
        for env, r, detail, relay, now in provisional:
            if failure is not None:
                self._record(env, r, DEFERRED, failure.status, failure.reason, since=now)
            else:
                self._record(env, r, SENT, "2.0.0", detail, since=now, relay=relay)
        pending, self._pending = self._pending, []
        for n, entry in enumerate(pending):
            try:
                self._finish_entry(entry)
            except BaseException:
                for rest in pending[n + 1:]:
                    rest.close()
                raise

    def _drop_group(self) -> None:
        """After the run or an exception: release the group's mailboxes; entries still
        waiting for it are left as they were (delivered again by the next run)."""
        group, self._group = self._group, None
        pending, self._pending = self._pending, []
        self._provisional = []
        for entry in pending:
            entry.close()
        if group is not None:
            try:
                group.sync()
            except Exception as e:
                self.log.warning(f"releasing mailboxes: {e}")

    def _local_workers(self, todo: list[tuple[str, str]], *, force: bool,
                       site: str | None) -> list[tuple[str, str]]:
        """Deliver the entries whose due recipients are all local in forked workers, grouped
        by their first due recipient (one group, one worker at a time); return the entries
        left to this process (remote recipients, unreadable, or fewer than two groups).
        Each worker runs the ordinary entry loop (locks, fsyncs, notices) and sends its
        counts back."""
        now = time.time()
        keyed: dict[str, list[tuple[str, str]]] = {}
        rest: list[tuple[str, str]] = []
        routes: dict[tuple[str, str], bool] = {}
        for n, (state, qid) in enumerate(todo):
            if n == LOCAL_PARALLEL_MIN and len(rest) * 2 > n:
                self._looked.clear()
                return todo  # mostly remote (a relay's queue): not worth a look at each
            key = self._local_key(qid, state, force=force, site=site, now=now, routes=routes)
            if key is None:
                rest.append((state, qid))
            else:
                keyed.setdefault(key, []).append((state, qid))
        if len(keyed) < 2:
            self._looked.clear()
            return todo
        groups = _groups(keyed)
        sys.stdout.flush()
        sys.stderr.flush()
        # The work list: each worker takes the next recipient's group (its number, WORK_RECORD
        # bytes) whenever it is done with one, so that the workers finish together whatever
        # their luck with the processors and the disk.
        work_r, work_w = os.pipe()
        children: list[tuple[int, int]] = []
        try:
            for _ in range(min(_local_worker_count(), len(groups))):
                rfd, wfd = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(rfd)
                    os.close(work_w)
                    self._run_worker(groups, work_r, wfd, force=force, site=site)  # no return
                os.close(wfd)
                children.append((pid, rfd))
        finally:
            os.close(work_r)
            try:
                _post_work(work_w, len(groups))
            finally:
                os.close(work_w)  # the workers' end of the list
        for pid, rfd in children:
            with os.fdopen(rfd, "rb") as r:
                reply = r.read()
            _, status = os.waitpid(pid, 0)
            try:
                # marshal: built in (json would load re), and the reply is our own child's
                counts = marshal.loads(reply)
                if not isinstance(counts, dict):
                    raise ValueError("not a dict")
            except (ValueError, EOFError, TypeError):
                self.log.error(f"a local delivery worker failed (status {status}); "
                               "the entries it had taken wait for the next run")
                continue
            for name in ("delivered", "deferred", "bounced", "busy", "corrupt"):
                setattr(self.stats, name, getattr(self.stats, name) + counts[name])
            self.stats.results += [(a, b, c, d) for a, b, c, d in counts["results"]]
        self.seen.update(qid for group in groups for _, qid in group)
        self._looked.clear()  # now: while the workers ran, each page it frees would be copied
        return rest

    def _local_key(self, qid: str, state: str, *, force: bool, site: str | None,
                   now: float, routes: dict[tuple[str, str], bool] | None = None) -> str | None:
        """The first due recipient's address when every due recipient of the entry is
        routed locally (or to error, retry, discard); None otherwise. ``routes`` keeps the
        answers of earlier entries: (address, sender) -> routed locally."""
        try:
            if state == INCOMING:
                # Only what the choice needs: the worker parses the whole envelope (see _open)
                data, ino = self.queue.envelope_file(qid, state)
                found, sender, rcpts = peek(data)
                if found != qid:
                    return None
                if len(self._looked) < LOCAL_LOOKED_MAX:
                    self._looked[qid] = (ino, data)
            else:
                _, env = self.queue.load(qid, state)
                sender = env.sender
                rcpts = [(r.state, r.next_try, r.address) for r in env.recipients]
        except (EntryNotFound, CorruptEnvelope, OSError, UnicodeError):
            return None
        if routes is None:
            routes = {}
        key = None
        for rstate, next_try, address in rcpts:
            if rstate in (SENT, BOUNCED) or (site and not _matches_site(address, site)):
                continue
            if not force and next_try > now:
                continue
            local = routes.get((address, sender))
            if local is None:
                local = routes[address, sender] = self.router.route(
                    address, sender).transport in (LOCAL, ERROR, RETRY, DISCARD)
            if not local:
                return None
            key = key or address.lower()
        return key

    def _run_worker(self, groups: list[list[tuple[str, str]]], work: int, wfd: int, *,
                    force: bool, site: str | None) -> None:
        """In a forked worker: deliver the ``groups`` whose numbers it takes from the work
        list ``work`` until it is empty, then write the counts to ``wfd`` and exit."""
        code = 1
        try:
            self._worker = True
            self.stats = Stats()
            while not self.stopping:
                record = os.read(work, WORK_RECORD)
                if len(record) != WORK_RECORD:
                    break  # the list is empty (and closed)
                self._run_entries(groups[int.from_bytes(record, "little")], force=force,
                                  site=site)
            # Taking no more (stopped: the list may not be empty): a parent still writing it
            # gets EPIPE once every worker is done, rather than wait for ever on workers whose
            # replies it reads only after the list.
            os.close(work)
            self._deliver_notices()
            self._close_remote()
            st = self.stats
            reply = marshal.dumps({"delivered": st.delivered, "deferred": st.deferred,
                                   "bounced": st.bounced, "busy": st.busy,
                                   "corrupt": st.corrupt, "results": st.results})
            view = memoryview(reply)
            while view:
                view = view[os.write(wfd, view):]
            code = 0
        except BaseException as e:  # noqa: B036 - a worker reports and exits, never returns
            try:
                self.log.error(f"local delivery worker: {type(e).__name__}: {e}")
            except BaseException:  # noqa: B036
                pass
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def _deliver_notices(self) -> None:
        """Deliver the notices (bounces, delay warnings) this run queued, whatever entries or
        site it was limited to: without a daemon, a notice left queued waits for a queue run
        that may never come. Each gets the one try of any new entry; one that defers stays
        deferred for the runs to come."""
        for _ in range(NOTICE_ROUNDS):
            todo = [(INCOMING, q) for q in self._notices if q not in self.seen]
            self._notices = []
            if not todo or self.stopping:
                return
            if self.progress is not None:
                self.progress.add_total(len(todo))
            self._run_entries(todo, force=False, site=None)

    def _advance(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.stats)

    def _open(self, qid: str, state: str) -> "_Entry | None":
        """Lock and load an entry; None when it is busy, gone, held or corrupt."""
        try:
            fd = self.queue.lock(qid)
        except EntryBusy:
            self.stats.busy += 1
            return None
        except EntryNotFound:
            if os.path.lexists(self.queue.path(state, qid)):
                # An envelope whose message file is gone can never be delivered: keep it
                # for inspection instead of retrying it forever.
                self.log.warning(f"{qid}: message file missing; entry moved to corrupt/")
                self.stats.corrupt += 1
                self.queue.quarantine(qid, state)
            return None
        try:
            looked = self._looked.pop(qid, None)
            if looked is not None and self._incoming_file(qid, fd) == looked[0]:
                # Still the message file published as incoming/ at submission (the lock's
                # file under the state name): it is never changed, and so neither is the
                # envelope the look at each entry read in it before the fork.
                state, env = INCOMING, entry_envelope(qid, looked[1])
            else:
                state = self.queue.find(qid)  # it may have moved while we waited for the lock
                state, env = self.queue.load(qid, state)
            msg = self.queue.message(fd, env)
        except EntryNotFound:
            os.close(fd)
            return None
        except (CorruptEnvelope, OSError, UnicodeError) as e:
            self.log.warning(f"{qid}: corrupt queue entry moved to corrupt/: {e}")
            self.stats.corrupt += 1
            self.queue.quarantine(qid, state)
            os.close(fd)
            return None
        if state == "hold":
            msg.close()
            os.close(fd)
            return None
        return _Entry(qid, state, env, msg, fd, time.time())

    def _incoming_file(self, qid: str, fd: int) -> int:
        """The inode of incoming/``qid`` when it is the locked message file ``fd``, else -1."""
        try:
            ino = os.lstat(self.queue.path(INCOMING, qid)).st_ino
        except OSError:
            return -1
        return ino if os.fstat(fd).st_ino == ino else -1

    def _local_pass(self, entry: "_Entry", *, force: bool, site: str | None) -> None:
        """Deliver the due local recipients; collect the due remote ones in entry.remote."""
        env, now = entry.env, entry.now
        self.log.info(log.queue_active(entry.qid, env.sender, env.size, len(env.recipients)))
        i = 0
        # By index: an alias may add remote recipients while we go; they are due now too.
        while i < len(env.recipients):
            r = env.recipients[i]
            i += 1
            if r.state == BOUNCED and not r.attempts:
                # Refused at queue entry (unknown in a virtual alias table, an alias loop):
                # reported here, once, like any other bounce.
                r.attempts = 1
                entry.attempted = True
                self._record(env, r, BOUNCED, r.status, r.reason, since=now)
                entry.bounced.append(r)
                continue
            if r.done:
                continue
            if site and not _matches_site(r.address, site):
                continue
            if not force and r.next_try > now:
                continue
            entry.attempted = True
            where = self.router.route(r.address, env.sender)
            if where.transport == LOCAL:
                self._deliver_recipient(env, r, entry.msg, now)
            elif where.transport in (ERROR, RETRY, DISCARD):
                self._settle(env, r, where, now)
            else:
                entry.remote.append(r)
                entry.routes[r.address] = where
                continue
            if r.state == BOUNCED:
                entry.bounced.append(r)

    def _settle(self, env: Envelope, r: Recipient, where: Route, now: float) -> None:
        """The error, retry and discard transports: the recipient's outcome is the route."""
        r.attempts += 1
        r.last_try = now
        if where.transport == DISCARD:
            self._record(env, r, SENT, "2.0.0", where.text or "discarded", since=now,
                         relay="none")
            return
        status, text = where.status()
        state = BOUNCED if where.transport == ERROR else DEFERRED
        self._record(env, r, state, status, text, since=now, relay="none")

    def _remote_pass(self, batch: "list[_Entry]") -> None:
        """Send the remote recipients of a batch of entries, then record every outcome."""
        try:
            jobs = self._remote_jobs(batch)
            self._deliver_remote(jobs)
            for entry in batch:
                by_address = {r.address: r for r in entry.remote}
                for job in entry.jobs:
                    for address in job.rcpts:
                        outcome, relay = job.results.get(address) or _lost()
                        self._apply(entry, by_address[address], outcome, relay, job.dkim)
                self._finish_entry(entry)
        finally:
            for entry in batch:
                entry.close()

    def _remote_jobs(self, batch: "list[_Entry]") -> "list[tuple[Destination | None, Job]]":
        # dispatch (asyncio, aiosmtplib, dnspython) only when a remote recipient is due
        from pymailtools.qmgr.dispatch import Job

        disp = self._dispatcher()
        jobs: list[tuple[Destination | None, Job]] = []
        for entry in batch:
            sender = entry.env.sender
            by_dest: dict[Destination | None, list[str]] = {}
            failed: dict[str, list[str]] = {}  # why -> recipients whose destination failed
            for r in entry.remote:
                dest = None
                if disp is not None:
                    try:
                        dest = disp.destination(entry.routes[r.address].hop, r.address, sender)
                    except DeliveryError as e:
                        failed.setdefault(e.reason, []).append(r.address)
                        continue
                by_dest.setdefault(dest, []).append(r.address)
            for dest, rcpts in by_dest.items():
                job = Job(entry.qid, sender, rcpts, entry.data, entry.env.size)
                entry.jobs.append(job)
                jobs.append((dest, job))
            for why, rcpts in failed.items():
                job = Job(entry.qid, sender, rcpts, entry.data, entry.env.size)
                job.fail(_outcome(DEFERRED, "4.3.5", why))
                entry.jobs.append(job)
        return jobs

    def _dispatcher(self) -> "Dispatcher | None":
        if self._remote is None and self._remote_error is None:
            # asyncio, aiosmtplib and dnspython only when a remote recipient is due
            import asyncio

            from pymailtools.qmgr.dispatch import Dispatcher

            try:
                self._remote = Dispatcher(self.cfg, self.log)
            except ConfigError as e:
                self._remote_error = str(e)
                self.log.error(f"remote delivery disabled: {e}")
                return None
            self._loop = asyncio.new_event_loop()
        return self._remote

    def _deliver_remote(self, jobs: "list[tuple[Destination | None, Job]]") -> None:
        disp = self._dispatcher()
        if disp is None:
            why = f"configuration error: {self._remote_error}"
            for _, job in jobs:
                job.fail(_outcome(DEFERRED, "4.3.5", why))
            return
        assert self._loop is not None
        todo = [(dest, job) for dest, job in jobs if dest is not None]
        try:
            self._loop.run_until_complete(disp.deliver(todo))
        except Exception as e:  # a bug defers these recipients; it must not kill the run
            why = f"internal error: {type(e).__name__}: {e}"
            self.log.error(why)
            for _, job in jobs:
                job.fail(_outcome(DEFERRED, "4.3.0", why))

    def _close_remote(self) -> None:
        if self._remote is not None and self._loop is not None:
            try:
                self._loop.run_until_complete(self._remote.close())
            except Exception as e:
                self.log.warning(f"closing SMTP sessions: {e}")
            self._loop.close()
        self._remote = self._loop = None
        self._remote_error = None

    def _apply(self, entry: "_Entry", r: Recipient, outcome: "Outcome", relay: str,
               dkim: str = "") -> None:
        r.attempts += 1
        r.last_try = entry.now
        self._record(entry.env, r, outcome.state, outcome.dsn, outcome.reason, since=entry.now,
                     relay=relay, detail=outcome.reason if outcome.state == SENT else
                     outcome.detail, dkim=dkim)
        if r.state == BOUNCED:
            entry.bounced.append(r)

    def _record(self, env: Envelope, r: Recipient, state: str, dsn: str, reason: str, *,
                since: float, relay: str = "local", detail: str | None = None,
                dkim: str = "") -> None:
        """Set a recipient's outcome (a deferral gets its next try on the backoff schedule),
        count it, log it and add it to the entry's history."""
        r.state, r.status, r.reason = state, dsn, reason
        if state == SENT:
            self.stats.delivered += 1
        elif state == BOUNCED:
            self.stats.bounced += 1
        else:
            r.state = DEFERRED
            r.next_try = since + self.backoff(since - env.arrival)
            self.stats.deferred += 1
        self._log_result(env, r, time.time(), {SENT: "sent", BOUNCED: "bounced"}.get(
            r.state, "deferred"), relay, detail=detail, dkim=dkim)

    def _finish_entry(self, entry: "_Entry") -> None:
        """Expire, notify the sender, and record the entry's new state (or remove it)."""
        try:
            self._finish(entry)
        finally:
            entry.close()
            self._advance()

    def _finish(self, entry: "_Entry") -> None:
        qid, state, env, msg, now = entry.qid, entry.state, entry.env, entry.msg, entry.now
        newly_bounced = entry.bounced
        lifetime = (self.cfg.bounce_queue_lifetime if env.sender == ""
                    else self.cfg.maximal_queue_lifetime)
        expired = [r for r in env.recipients if not r.done and now - env.arrival >= lifetime]
        for r in expired:
            r.state = BOUNCED
            r.status = r.status if r.status.startswith("4") else "4.4.7"
            r.reason = f"{r.reason or 'delivery time expired'} (message expired)"
            newly_bounced.append(r)
        if expired:
            self.stats.bounced += len(expired)
            self.log.info(log.expired(qid, env.sender))
        if newly_bounced:
            self._notify(env, msg, newly_bounced, "failed")
        attempted = entry.attempted
        delayed = [r for r in env.recipients if r.state == DEFERRED]
        if (delayed and not env.warned and self.cfg.delay_warning_time
                and now - env.arrival >= self.cfg.delay_warning_time):
            self._notify(env, msg, delayed, "delayed")
            env.warned = attempted = True  # the flag must be saved, or the warning repeats
        if not (attempted or expired):
            return  # nothing was due here (-qR for another site): leave the entry as it was
        if env.done:
            self._save_history(qid, keep=False)
            self.queue.remove(qid, state)
            self.log.info(log.removed(qid))
        else:
            self.queue.save(env, state, Q_DEFERRED)
            self._save_history(qid, keep=True)

    def _deliver_recipient(self, env: Envelope, r: Recipient, msg: BinaryIO, now: float) -> None:
        r.attempts += 1
        r.last_try = now
        try:
            detail, relay = self._deliver(env, r, msg)
        except DeliveryError as e:
            self._record(env, r, BOUNCED if e.permanent else DEFERRED, e.status, e.reason,
                         since=now)
            return
        except OSError as e:  # a file or directory delivery could not use: name it
            where = f"{e.filename}: " if e.filename else ""
            self._record(env, r, DEFERRED, "4.3.0", f"{where}{e.strerror or e}", since=now)
            return
        except Exception as e:  # a bug must defer one recipient, not kill the whole run
            self._record(env, r, DEFERRED, "4.3.0",
                         f"internal error: {type(e).__name__}: {e}", since=now)
            return
        group = self._group
        if group is not None and (group.pending or group.failure is not None):
            # Sent once the group's fsync has made it durable (_commit). A failure: this
            # delivery synced the group (a command or file after a mailbox) and that fsync
            # took a message back out, maybe this recipient's: _commit defers it.
            self._provisional.append((env, r, detail, relay, now))
        else:
            self._record(env, r, SENT, "2.0.0", detail, since=now, relay=relay)

    def _deliver(self, env: Envelope, r: Recipient, msg: BinaryIO) -> tuple[str, str]:
        """Deliver one recipient routed to the local transport (by its domain or by
        transport_maps); return (detail, relay) or raise DeliveryError."""
        msg.seek(0)
        if route.delivered_to_loop(msg, r.address):
            raise DeliveryError("mail forwarding loop for " + r.address, "5.4.6")
        targets = route.resolve(self.cfg, r.address, local=True)
        done: list[str] = []
        for t in targets:
            if isinstance(t, Remote):
                # An alias that expands to a remote address becomes a recipient of its own.
                if not any(x.address == t.address for x in env.recipients):
                    env.recipients.append(Recipient(t.address, orcpt=r.orcpt or r.address,
                                                    notify=r.notify))
                done.append(f"forwarded to {t.address}")
            else:
                done.append(agent.deliver(self.cfg, t, msg, sender=env.sender,
                                          recipient=r.address, original_recipient=r.orcpt,
                                          busy=self._busy, group=self._group))
        return "; ".join(done) or "discarded (empty alias)", "local"

    def backoff(self, age: float) -> float:
        """Postfix's rule: wait about as long as the message is old, clamped, with jitter."""
        import random  # only when a recipient is deferred

        lo, hi = self.cfg.minimal_backoff_time, self.cfg.maximal_backoff_time
        base = min(max(age, lo), hi)
        return min(base * random.uniform(1.0, 1.25), max(hi, lo))

    # -- reporting ------------------------------------------------------------------------

    def _log_result(self, env: Envelope, r: Recipient, now: float, status: str,
                    relay: str = "local", detail: str | None = None, dkim: str = "") -> None:
        orig = r.orcpt if r.orcpt and r.orcpt != r.address else None
        self.log.info(make_line(env.id, to=r.address, orig_to=orig, relay=relay,
                                delay=round(now - env.arrival, 2), dsn=r.status or "2.0.0",
                                status=status, detail=r.reason if detail is None else detail,
                                dkim=dkim))
        self.stats.results.append((env.id, r.address, status, r.reason))
        self._history.setdefault(env.id, []).append(
            Attempt(now, r.address, relay, status, r.status, r.reason))

    def _save_history(self, qid: str, keep: bool) -> None:
        """Write the attempts of this pass to the entry's history, if the entry stays queued
        (a delivered entry's history would be removed with it at once: skip the file)."""
        attempts = self._history.pop(qid, [])
        if not keep:
            return
        try:
            for a in attempts:
                self.queue.add_history(qid, a)
        except OSError as e:
            self.log.warning(f"{qid}: cannot record attempt history: {e.strerror}")

    def _notify(self, env: Envelope, msg: BinaryIO, rcpts: list[Recipient], action: str) -> None:
        """Queue a DSN to the sender; never for a bounce (null sender)."""
        # bounce builds the notice with the email package: only when one is due
        from pymailtools.qmgr import bounce

        if not bounce.should_bounce(env):
            return  # a bounce is never bounced (Postfix drops the double bounce too)

        msg.seek(0)
        data = bounce.make_dsn(self.cfg, env, msg, rcpts, action=action)
        try:
            bid = submit(self.cfg, io.BytesIO(data),
                         Options([env.sender], sender="", ignore_dots=True), self.queue)
        except Exception as e:
            self.log.error(f"{env.id}: cannot queue delivery status notification: {e}")
            return
        self.log.info(log.bounce_notice(env.id, bid, delayed=action == "delayed"))
        self._notices.append(bid)


def _local_worker_count() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no sched_getaffinity (not Linux)
        cpus = os.cpu_count() or 1
    return max(2, min(LOCAL_WORKERS, LOCAL_WORKERS_PER_CPU * cpus))


def _groups(keyed: dict[str, list[tuple[str, str]]]) -> list[list[tuple[str, str]]]:
    """The local workers' work: every recipient's entries together (in queue order among
    themselves, so that they share the mailbox's lock and fsyncs), the largest first: the
    run lasts until the last group taken is done, and a small one ends it sooner."""
    return [keyed[key] for key in sorted(keyed, key=lambda k: (-len(keyed[k]), k))]


def _post_work(fd: int, count: int) -> None:
    """Write the group numbers 0 to ``count`` - 1 to the work list ``fd``, whole records
    only: every write of at most PIPE_BUF bytes (4096 on Linux, 512 at least) lands at once,
    so no worker ever reads part of a record. Stops when no worker is left to read them."""
    per_write = 512 // WORK_RECORD
    try:
        for start in range(0, count, per_write):
            chunk = b"".join(n.to_bytes(WORK_RECORD, "little")
                             for n in range(start, min(start + per_write, count)))
            os.write(fd, chunk)
    except BrokenPipeError:
        pass  # every worker is gone: what they did not take waits for the next run


def _outcome(state: str, dsn: str, why: str) -> "Outcome":
    # only for remote jobs: smtp.client brings asyncio, aiosmtplib and dnspython
    from pymailtools.smtp.client import Outcome

    return Outcome(state, dsn, why, why)


def _lost() -> "tuple[Outcome, str]":
    # only for remote jobs: smtp.client brings asyncio, aiosmtplib and dnspython
    from pymailtools.smtp.client import Outcome

    why = "internal error: no delivery result"
    return Outcome(DEFERRED, "4.3.0", why, why), "none"


def _matches_site(addr: str, site: str) -> bool:
    domain = addr.rpartition("@")[2].lower()
    return domain == site or domain.endswith("." + site)
