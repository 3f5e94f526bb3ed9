"""The queue runner: takes due entries under lock, routes and delivers, defers, bounces."""

import logging
import os
import random
import time
from typing import BinaryIO

from pymailtools import log, route
from pymailtools.config import Config
from pymailtools.delivery import Command, DeliveryError, File, Mailbox, Remote
from pymailtools.envelope import (
    BOUNCED,
    DEFERRED,
    SENT,
    Attempt,
    CorruptEnvelope,
    Envelope,
    Recipient,
)
from pymailtools.log import Logger, make_line
from pymailtools.queue import (
    DEFERRED as Q_DEFERRED,
)
from pymailtools.queue import (
    INCOMING,
    EntryBusy,
    EntryNotFound,
    Queue,
)

REMOTE_NOT_IMPLEMENTED = "remote delivery not implemented"


class Stats:
    """What one run did, for -v summaries and tests."""

    def __init__(self) -> None:
        self.delivered = 0
        self.deferred = 0
        self.bounced = 0
        self.busy = 0
        self.corrupt = 0
        self.results: list[tuple[str, str, str, str]] = []  # (qid, rcpt, status, detail)


class _ToLogger(logging.Handler):
    """Sends warnings of the routing modules (Python logging) to the runner's log."""

    def __init__(self, log: Logger) -> None:
        super().__init__(logging.WARNING)
        self.target = log

    def emit(self, record: logging.LogRecord) -> None:
        self.target.warning(record.getMessage())


def _capture_library_warnings(log: Logger) -> None:
    lib = logging.getLogger("pymailtools")
    for h in [h for h in lib.handlers if isinstance(h, _ToLogger)]:
        lib.removeHandler(h)
    lib.addHandler(_ToLogger(log))
    lib.propagate = False


class Runner:
    """One queue run (or a background loop of them) over a queue directory."""

    def __init__(self, cfg: Config, *, prog: str = "sendmail", verbose: bool = False) -> None:
        self.cfg = cfg
        self.queue = Queue(cfg.queue_directory)
        self.log = Logger(prog, to_syslog=cfg.syslog, verbose=verbose)
        _capture_library_warnings(self.log)
        self.stats = Stats()
        self.seen: set[str] = set()

    # -- scheduling -----------------------------------------------------------------------

    def run(self, ids: list[str] | None = None, site: str | None = None,
            force: bool = False, housekeeping: bool = False) -> Stats:
        """Deliver due entries (or ``ids``, or those with a recipient at ``site``) once.

        ``housekeeping`` also removes debris of crashed submissions older than a day.
        """
        if os.geteuid() == 0 or self.queue.direct_access():
            self.queue.ensure()
        if housekeeping and self.queue.direct_access():
            self.queue.purge_temp(grace=86400)
        if ids is None and self.queue.direct_access():
            from pymailtools.pickup import pickup

            pickup(self.queue, self.cfg, self.log)
        while True:
            if ids is not None:
                todo = []
                for qid in ids:
                    try:
                        todo.append((self.queue.find(qid), qid))
                    except EntryNotFound:
                        continue
            else:
                todo = self._all() if force else self.queue.due()
            # Entries queued during this run (bounces, new submissions) get a pass of their own.
            todo = [(s, q) for s, q in todo if q not in self.seen and s != "hold"]
            if not todo:
                return self.stats
            for state, qid in todo:
                self.seen.add(qid)
                self.process(qid, state, force=force, site=site)
            if ids is not None:
                return self.stats

    def _all(self) -> list[tuple[str, str]]:
        return [(s, q) for s in (INCOMING, Q_DEFERRED) for q in self.queue.ids(s)]

    def background(self, lock_fd: int) -> None:
        """Run until nothing new is due; then release the lock and look once more (see wake)."""
        from pymailtools.wake import try_lock

        while True:
            self.run()
            os.close(lock_fd)
            fresh = [q for q in self.queue.ids(INCOMING) if q not in self.seen]
            if not fresh:
                return
            from pymailtools.wake import open_run_lock

            lock_fd = open_run_lock(self.cfg)
            if not try_lock(lock_fd):
                os.close(lock_fd)
                return  # another runner took over and will deliver them

    # -- one entry ------------------------------------------------------------------------

    def process(self, qid: str, state: str, *, force: bool = False,
                site: str | None = None) -> None:
        try:
            fd = self.queue.lock(qid)
        except EntryBusy:
            self.stats.busy += 1
            return
        except EntryNotFound:
            if os.path.lexists(self.queue.path(state, qid)):
                # An envelope whose message file is gone can never be delivered: keep it
                # for inspection instead of retrying it forever.
                self.log.warning(f"{qid}: message file missing; entry moved to corrupt/")
                self.stats.corrupt += 1
                self.queue.quarantine(qid, state)
            return
        try:
            with os.fdopen(os.dup(fd), "rb") as msg:
                self._process_locked(qid, msg, force=force, site=site)
        finally:
            os.close(fd)

    def _process_locked(self, qid: str, msg: BinaryIO, *, force: bool,
                        site: str | None) -> None:
        state = INCOMING
        try:
            state = self.queue.find(qid)  # it may have moved while we waited for the lock
            state, env = self.queue.load(qid, state)
            if os.fstat(msg.fileno()).st_size != env.size:
                raise CorruptEnvelope("message file size does not match the envelope")
        except EntryNotFound:
            return
        except (CorruptEnvelope, OSError, UnicodeError) as e:
            self.log.warning(f"{qid}: corrupt queue entry moved to corrupt/: {e}")
            self.stats.corrupt += 1
            self.queue.quarantine(qid, state)
            return
        if state == "hold":
            return
        now = time.time()
        self.log.info(log.queue_active(qid, env.sender, env.size, len(env.recipients)))
        newly_bounced: list[Recipient] = []
        attempted = False
        for r in list(env.recipients):
            if r.done:
                continue
            if site and not _matches_site(r.address, site):
                continue
            if not force and r.next_try > now:
                continue
            attempted = True
            self._deliver_recipient(env, r, msg, now)
            if r.state == BOUNCED:
                newly_bounced.append(r)
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
        delayed = [r for r in env.recipients if r.state == DEFERRED]
        if (delayed and not env.warned and self.cfg.delay_warning_time
                and now - env.arrival >= self.cfg.delay_warning_time):
            self._notify(env, msg, delayed, "delayed")
            env.warned = attempted = True  # the flag must be saved, or the warning repeats
        if not (attempted or expired):
            return  # nothing was due here (-qR for another site): leave the entry as it was
        if env.done:
            self.queue.remove(qid, state)
            self.log.info(log.removed(qid))
        else:
            self.queue.save(env, state, Q_DEFERRED)

    def _deliver_recipient(self, env: Envelope, r: Recipient, msg: BinaryIO, now: float) -> None:
        r.attempts += 1
        r.last_try = now
        try:
            detail, relay = self._deliver(env, r, msg)
        except DeliveryError as e:
            r.status, r.reason = e.status, e.reason
            if e.permanent:
                r.state = BOUNCED
                self.stats.bounced += 1
                self._log_result(env, r, now, "bounced")
            else:
                r.state = DEFERRED
                r.next_try = now + self.backoff(now - env.arrival)
                self.stats.deferred += 1
                self._log_result(env, r, now, "deferred")
            return
        except Exception as e:  # a bug must defer one recipient, not kill the whole run
            r.state, r.status = DEFERRED, "4.3.0"
            r.reason = f"internal error: {type(e).__name__}: {e}"
            r.next_try = now + self.backoff(now - env.arrival)
            self.stats.deferred += 1
            self._log_result(env, r, now, "deferred")
            return
        r.state, r.status, r.reason = SENT, "2.0.0", detail
        self.stats.delivered += 1
        self._log_result(env, r, now, "sent", relay)

    def _deliver(self, env: Envelope, r: Recipient, msg: BinaryIO) -> tuple[str, str]:
        """Deliver one recipient; return (detail, relay) or raise DeliveryError."""
        if not route.is_local(self.cfg, r.address):
            raise DeliveryError(REMOTE_NOT_IMPLEMENTED, "4.3.0")
        msg.seek(0)
        if route.delivered_to_loop(msg, r.address):
            raise DeliveryError("mail forwarding loop for " + r.address, "5.4.6")
        targets = route.resolve(self.cfg, r.address)
        done: list[str] = []
        for t in targets:
            msg.seek(0)
            if isinstance(t, Mailbox):
                from pymailtools import local

                done.append(local.deliver_to_user(self.cfg, t.user, msg, sender=env.sender,
                                                  recipient=r.address))
            elif isinstance(t, File):
                from pymailtools import pipe

                pipe.deliver_file(t, msg, sender=env.sender, recipient=r.address,
                                  config=self.cfg)
                done.append(f"delivered to file: {t.path}")
            elif isinstance(t, Command):
                from pymailtools import pipe

                pipe.run_command(t, msg, sender=env.sender, recipient=r.address,
                                 config=self.cfg)
                done.append(f"delivered to command: {' '.join(t.argv)}")
            elif isinstance(t, Remote):
                # An alias that expands to a remote address becomes a recipient of its own.
                if not any(x.address == t.address for x in env.recipients):
                    env.recipients.append(Recipient(t.address, orcpt=r.orcpt or r.address,
                                                    notify=r.notify))
                done.append(f"forwarded to {t.address}")
        return "; ".join(done) or "discarded (empty alias)", "local"

    def backoff(self, age: float) -> float:
        """Postfix's rule: wait about as long as the message is old, clamped, with jitter."""
        lo, hi = self.cfg.minimal_backoff_time, self.cfg.maximal_backoff_time
        base = min(max(age, lo), hi)
        return min(base * random.uniform(1.0, 1.25), max(hi, lo))

    # -- reporting ------------------------------------------------------------------------

    def _log_result(self, env: Envelope, r: Recipient, now: float, status: str,
                    relay: str = "local") -> None:
        orig = r.orcpt if r.orcpt and r.orcpt != r.address else None
        self.log.info(make_line(env.id, to=r.address, orig_to=orig, relay=relay,
                                delay=round(now - env.arrival, 2), dsn=r.status or "2.0.0",
                                status=status, detail=r.reason))
        self.stats.results.append((env.id, r.address, status, r.reason))
        try:  # the history of a finished entry is removed with it
            self.queue.add_history(env.id, Attempt(now, r.address, relay, status, r.status,
                                                   r.reason))
        except OSError as e:
            self.log.warning(f"{env.id}: cannot record attempt history: {e.strerror}")

    def _notify(self, env: Envelope, msg: BinaryIO, rcpts: list[Recipient], action: str) -> None:
        """Queue a DSN to the sender; never for a bounce (null sender)."""
        from pymailtools import bounce

        if not bounce.should_bounce(env):
            return  # a bounce is never bounced (Postfix drops the double bounce too)
        import io

        from pymailtools.submit import Options, submit

        msg.seek(0)
        data = bounce.make_dsn(self.cfg, env, msg, rcpts, action=action)
        try:
            bid = submit(self.cfg, io.BytesIO(data),
                         Options([env.sender], sender="", ignore_dots=True), self.queue)
        except Exception as e:
            self.log.error(f"{env.id}: cannot queue delivery status notification: {e}")
            return
        self.log.info(log.bounce_notice(env.id, bid, delayed=action == "delayed"))


def _matches_site(addr: str, site: str) -> bool:
    domain = addr.rpartition("@")[2].lower()
    return domain == site or domain.endswith("." + site)
