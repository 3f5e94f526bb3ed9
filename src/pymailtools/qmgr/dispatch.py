"""Remote delivery scheduling: jobs grouped per destination, sessions reused, bounded concurrency.

A destination is a next hop (a recipient domain, the relayhost, a transport_maps or
sender_dependent_relayhost_maps next hop) together with the session policy used there: mail
whose credentials differ (smtp_sasl_password_maps) never shares a session. Per destination: the next
hops are looked up once per run, one session is opened first and more follow (up to
``default_destination_concurrency_limit``) only once it worked, so a dead destination costs one
failed attempt per run instead of one per message (Postfix's dead-site throttling).
"""

import asyncio
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from pymailtools.config import Config
from pymailtools.errors import ConfigError, DeliveryError, MailError
from pymailtools.log import Logger
from pymailtools.queue.envelope import BOUNCED, DEFERRED
from pymailtools.smtp import client as smtp
from pymailtools.smtp import generic, mx, nexthop, signing
from pymailtools.smtp.client import Outcome, Session
from pymailtools.smtp.errors import HopError
from pymailtools.smtp.nexthop import NextHop
from pymailtools.smtp.policy import Policy

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pymailtools.tables import Tables

BACKLOG_PER_SESSION = 4  # queued messages per open session before another one is opened

# smtp_sasl_password_maps values: user:password, or user:{scheme}rest with these schemes
# (Dovecot's way of marking what a password field holds; {plain} escapes a "{")
MAP_SCHEMES = {"{plain}": "password", "{command}": "password_command",
               "{oauth2}": "token_command"}


def map_credentials(value: str) -> dict[str, str]:
    """The Policy fields an smtp_sasl_password_maps value gives: ``user:password``,
    ``user:{command}pass show mail/relay`` (a password command),
    ``user:{oauth2}pymailtools-oauth2 token --account NAME`` (an OAuth2 token command) or
    ``user:{plain}{password`` (a password that starts with "{"). Raises DeliveryError
    (a deferral) without the value, which is a secret."""
    user, colon, rest = value.partition(":")
    if not colon or not user:
        raise DeliveryError("smtp_sasl_password_maps: the entry for this destination is not "
                            "user:password", "4.3.5")
    if rest.startswith("{"):
        scheme, brace, tail = rest.partition("}")
        field = MAP_SCHEMES.get(scheme.lower() + brace)
        if field is None:
            raise DeliveryError("smtp_sasl_password_maps: the entry for this destination "
                                "starts its password with an unknown {scheme} (known: "
                                "{plain}, {command}, {oauth2})", "4.3.5")
        if field != "password" and not tail.strip():
            raise DeliveryError(f"smtp_sasl_password_maps: the entry for this destination "
                                f"has an empty {scheme}}} command", "4.3.5")
        return {"username": user, field: tail}
    return {"username": user, "password": rest}


class Job:
    """One message to one destination: the recipients due there and the message bytes."""

    __slots__ = ("qid", "sender", "rcpts", "load", "size", "results", "dkim")

    def __init__(self, qid: str, sender: str, rcpts: list[str], load: Callable[[], bytes],
                 size: int) -> None:
        self.qid = qid
        self.sender = sender
        self.rcpts = rcpts
        self.load = load  # the DATA bytes (encode_data output), made once per message
        self.size = size
        self.results: dict[str, tuple[Outcome, str]] = {}  # rcpt -> (outcome, relay)
        self.dkim = ""  # "signed" once a DKIM signature went out with it

    def fail(self, outcome: Outcome, relay: str = "none") -> None:
        for r in self.rcpts:
            self.results.setdefault(r, (outcome, relay))


class Destination(NamedTuple):
    """Where a job goes: ``hop`` (None: the MX hosts of the domain ``name``) and the policy of
    its sessions. ``name`` is the next hop as logged; the password never is (Policy hides it)."""

    name: str
    hop: NextHop | None
    policy: Policy


class _Destination:
    def __init__(self, key: Destination) -> None:
        self.key = key
        self.name = key.name
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
        self.policy = Policy.from_config(cfg)
        self.password_maps: Tables | None = None
        if cfg.smtp_sasl_password_maps:
            # the lookup tables module only when credentials come from a map
            from pymailtools.tables import open_tables

            try:
                self.password_maps = open_tables(cfg.smtp_sasl_password_maps)
            except ConfigError as e:
                raise ConfigError(f"smtp_sasl_password_maps: {e}") from None
        self.resolver = mx.make_resolver(cfg)
        self.dests: dict[Destination, _Destination] = {}
        # destination() per (next hop, domain, sender when credentials depend on it): the
        # policy copies and the relayhost comparison are done once per run, not per message
        self._known: dict[tuple[NextHop | None, str, str], Destination] = {}
        self.slots = asyncio.Semaphore(max(cfg.default_process_limit, 1))
        self.per_dest = max(cfg.default_destination_concurrency_limit, 1)
        self.rcpt_limit = max(cfg.default_destination_recipient_limit, 1)
        self.generic = generic.Generic(cfg) if cfg.smtp_generic_maps else None
        self.signer = signing.Signer(cfg) if cfg.dkim_domains else None

    def destination(self, hop: NextHop | None, address: str, sender: str) -> Destination:
        """The destination of mail from ``sender`` to ``address`` through ``hop`` (None: the
        recipient domain). Raises DeliveryError (deferral) when the credentials lookup fails."""
        name = str(hop) if hop is not None else address.rpartition("@")[2].lower().rstrip(".")
        by_sender = self.password_maps is not None and \
            self.cfg.smtp_sender_dependent_authentication
        memo = (hop, name, sender if by_sender else "")
        known = self._known.get(memo)
        if known is None:
            if len(self._known) >= 10_000:  # a run over many senders' mail: stay bounded
                self._known.clear()
            known = self._known[memo] = self._destination(hop, name, sender)
        return known

    def _destination(self, hop: NextHop | None, name: str, sender: str) -> Destination:
        # smtp_tls_wrappermode: TLS on connect everywhere; else on port 465 relayhosts
        policy = self.policy.clone(
            implicit_tls=self.policy.implicit_tls or bool(hop and hop.implicit_tls))
        if hop is None or not nexthop.is_relayhost(self.cfg.relayhost, hop.host, hop.port,
                                                   self.cfg.smtp_port):
            # the site's single account is the relayhost's: never offered to an MX host or
            # another next hop (smtp_sasl_password_maps names accounts for those)
            policy = policy.without_credentials()
        if self.password_maps is not None:
            found = self._credentials(hop, name, sender)
            if found is not None:
                policy = policy.without_credentials().clone(**map_credentials(found))
        return Destination(name, hop, policy)

    def _credentials(self, hop: NextHop | None, name: str, sender: str) -> str | None:
        """smtp_sasl_password_maps: with smtp_sender_dependent_authentication the sender
        address and its @domain first; then the next hop as written ([host]:port, [host],
        host:port) and the host (or recipient domain) alone."""
        maps = self.password_maps
        assert maps is not None
        # the lookup tables module only when credentials come from a map
        from pymailtools.tables import find_address

        try:
            if self.cfg.smtp_sender_dependent_authentication and sender:
                hit = find_address(maps, sender)
                if hit is not None:
                    return hit
            keys = [name]
            if hop is not None:
                if not hop.mx:
                    keys.append(f"[{hop.host}]:{hop.port}")
                    if hop.port == self.cfg.smtp_port:
                        keys.append(f"[{hop.host}]")
                keys += [f"{hop.host}:{hop.port}", hop.host]
            for key in dict.fromkeys(keys):
                hit = maps.get(key)
                if hit is not None:
                    return hit
        except (MailError, OSError) as e:
            raise DeliveryError(f"smtp_sasl_password_maps lookup failed: {e}", "4.3.0") \
                from None
        return None

    async def deliver(self, jobs: list[tuple[Destination, Job]]) -> None:
        """Deliver (destination, job) pairs; every recipient of every job gets a result."""
        active = []
        for key, job in jobs:
            dest = self.dests.get(key)
            if dest is None:
                dest = self.dests[key] = _Destination(key)
            dest.jobs.append(job)
            if dest not in active:
                active.append(dest)
        await asyncio.gather(*(self._drive(d) for d in active))

    async def _drive(self, dest: _Destination) -> None:
        if dest.hops is None:
            try:
                if dest.key.hop is not None:
                    dest.hops = await mx.next_hops(self.resolver, dest.key.hop,
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
                s = await smtp.connect(hop, dest.key.policy, note=self.log.info)
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
        if self.signer is not None:  # after rewriting: the signature covers what is sent
            try:
                data, domain = self.signer.sign(data)
            except DeliveryError as e:
                job.fail(Outcome(DEFERRED, e.status, e.reason, e.reason))
                return
            job.dkim = "signed" if domain else ""
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
