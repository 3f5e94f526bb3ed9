"""Remote delivery scheduling: jobs grouped per destination, sessions reused, bounded concurrency.

A destination is a recipient domain, or the relayhost when one is set. Per destination: the next
hops are looked up once per run, one session is opened first and more follow (up to
``default_destination_concurrency_limit``) only once it worked, so a dead destination costs one
failed attempt per run instead of one per message (Postfix's dead-site throttling).
"""

import asyncio
from collections import deque
from collections.abc import Callable

from pymailtools.config import Config
from pymailtools.errors import DeliveryError, HopError, MailError
from pymailtools.log import Logger
from pymailtools.queue.envelope import BOUNCED, DEFERRED
from pymailtools.smtp import client as smtp
from pymailtools.smtp import generic, mx
from pymailtools.smtp import nexthop as relayhost
from pymailtools.smtp.client import Outcome, Session
from pymailtools.smtp.policy import Policy

BACKLOG_PER_SESSION = 4  # queued messages per open session before another one is opened


class Job:
    """One message to one destination: the recipients due there and the message bytes."""

    __slots__ = ("qid", "sender", "rcpts", "load", "size", "results")

    def __init__(self, qid: str, sender: str, rcpts: list[str], load: Callable[[], bytes],
                 size: int) -> None:
        self.qid = qid
        self.sender = sender
        self.rcpts = rcpts
        self.load = load  # the DATA bytes (encode_data output), made once per message
        self.size = size
        self.results: dict[str, tuple[Outcome, str]] = {}  # rcpt -> (outcome, relay)

    def fail(self, outcome: Outcome, relay: str = "none") -> None:
        for r in self.rcpts:
            self.results.setdefault(r, (outcome, relay))


class _Destination:
    def __init__(self, name: str) -> None:
        self.name = name
        self.hops: list[mx.Hop] | None = None
        self.jobs: deque[Job] = deque()
        self.idle: list[Session] = []
        self.bad: set[mx.Hop] = set()  # addresses that failed this run: tried last
        self.dead: HopError | None = None
        self.workers = 0


def _outcome(e: DeliveryError) -> Outcome:
    return Outcome(BOUNCED if e.permanent else DEFERRED, e.status, e.reason, e.reason)


class Dispatcher:
    """Delivers jobs over SMTP; lives for one queue run so sessions carry over between batches."""

    def __init__(self, cfg: Config, log: Logger) -> None:
        self.cfg = cfg
        self.log = log
        self.relayhost = relayhost.parse(cfg.relayhost, cfg.smtp_port) if cfg.relayhost \
            else None
        self.policy = Policy.from_config(cfg).clone(
            implicit_tls=bool(self.relayhost and self.relayhost.implicit_tls))
        self.resolver = mx.make_resolver(cfg)
        self.dests: dict[str, _Destination] = {}
        self.slots = asyncio.Semaphore(max(cfg.default_process_limit, 1))
        self.per_dest = max(cfg.default_destination_concurrency_limit, 1)
        self.rcpt_limit = max(cfg.default_destination_recipient_limit, 1)
        self.generic = generic.Generic(cfg) if cfg.smtp_generic_maps else None

    def destination(self, address: str) -> str:
        if self.relayhost is not None:
            return str(self.relayhost)
        return address.rpartition("@")[2].lower().rstrip(".")

    async def deliver(self, jobs: list[tuple[str, Job]]) -> None:
        """Deliver (destination, job) pairs; every recipient of every job gets a result."""
        active = []
        for name, job in jobs:
            dest = self.dests.get(name)
            if dest is None:
                dest = self.dests[name] = _Destination(name)
            dest.jobs.append(job)
            if dest not in active:
                active.append(dest)
        await asyncio.gather(*(self._drive(d) for d in active))

    async def _drive(self, dest: _Destination) -> None:
        if dest.hops is None:
            try:
                if self.relayhost is not None:
                    dest.hops = await mx.next_hops(self.resolver, self.relayhost,
                                                   limit=self.cfg.smtp_mx_address_limit)
                else:
                    dest.hops = await mx.lookup(self.resolver, dest.name,
                                                port=self.cfg.smtp_port,
                                                limit=self.cfg.smtp_mx_address_limit,
                                                myhostname=self.cfg.myhostname)
            except DeliveryError as e:
                # Looked up again next run (or next batch, for a temporary failure).
                outcome = _outcome(e)
                while dest.jobs:
                    dest.jobs.popleft().fail(outcome)
                return
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._worker(dest, tg))

    async def _worker(self, dest: _Destination, tg: asyncio.TaskGroup) -> None:
        dest.workers += 1
        session: Session | None = None
        try:
            async with self.slots:
                while dest.jobs:
                    if dest.dead is not None:
                        e = dest.dead
                        outcome = Outcome(DEFERRED, e.status, e.reason, e.reason)
                        while dest.jobs:
                            dest.jobs.popleft().fail(outcome)
                        break
                    if session is None or not session.usable or self._too_old(session):
                        if session is not None:
                            await session.quit()
                        session = await self._session(dest)
                        if session is None:
                            continue
                        if not dest.jobs:
                            break
                    await self._transact(session, dest.jobs.popleft())
                    if session.usable:
                        self._ramp_up(dest, tg)
        finally:
            dest.workers -= 1
            if session is not None:
                if session.usable:
                    dest.idle.append(session)
                else:
                    session.close()

    def _ramp_up(self, dest: _Destination, tg: asyncio.TaskGroup) -> None:
        """One more parallel session after each success while the backlog is long (Postfix's
        slow start): a dead host costs one session, a short queue stays on one connection."""
        if dest.workers < self.per_dest and len(dest.jobs) > BACKLOG_PER_SESSION * dest.workers:
            tg.create_task(self._worker(dest, tg))

    def _too_old(self, s: Session) -> bool:
        age = asyncio.get_running_loop().time() - s.opened
        return age > self.cfg.smtp_connection_reuse_time_limit

    async def _session(self, dest: _Destination) -> Session | None:
        """A cached idle session, or a new one on the first address that works; None after
        marking the destination dead (its remaining jobs are then deferred unattempted)."""
        while dest.idle:
            s = dest.idle.pop()
            if s.usable and not s.wire.closed and not self._too_old(s):
                return s
            s.close()
        assert dest.hops is not None
        order = [h for h in dest.hops if h not in dest.bad] + \
            [h for h in dest.hops if h in dest.bad]
        last: HopError | None = None
        for hop in order:
            try:
                s = await smtp.connect(hop, self.policy, note=self.log.info)
            except HopError as e:
                self.log.info(e.reason)
                dest.bad.add(hop)
                last = e
                continue
            return self._opened(s)
        dest.dead = last or HopError(f"no usable address for {dest.name}", "4.4.1")
        return None

    def _opened(self, s: Session) -> Session:
        if s.tls:
            self.log.info(f"{s.tls} TLS connection established to {s.relay}")
        return s

    async def _transact(self, session: Session, job: Job) -> None:
        try:
            data = job.load()
        except OSError as e:
            why = f"cannot read queue file: {e.strerror}"
            job.fail(Outcome(DEFERRED, "4.3.0", why, why))
            return
        sender, back = job.sender, {r: [r] for r in job.rcpts}  # wire address -> ours
        if self.generic is not None:  # the addresses as they leave over SMTP
            try:
                sender, data = self.generic.address(sender), self.generic.data(data)
                back = {}
                for r in job.rcpts:
                    back.setdefault(self.generic.address(r), []).append(r)
            except MailError as e:
                job.fail(Outcome(DEFERRED, "4.3.5", str(e), str(e)))
                return
        pending = list(back)
        while pending:
            chunk, pending = pending[: self.rcpt_limit], pending[self.rcpt_limit :]
            results, retry = await session.send(sender, chunk, data, len(data))
            for r, o in results.items():
                for orig in back[r]:
                    job.results[orig] = (o, session.relay)
            pending = retry + pending
            if pending and not session.usable:
                why = f"lost connection with {session.relay} before all recipients were sent"
                job.fail(Outcome(DEFERRED, "4.4.2", why, why), session.relay)
                return

    async def close(self) -> None:
        """QUIT every cached session."""
        sessions = [s for d in self.dests.values() for s in d.idle]
        for d in self.dests.values():
            d.idle.clear()
        await asyncio.gather(*(s.quit() for s in sessions), return_exceptions=True)
