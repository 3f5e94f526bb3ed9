"""The SMTP protocol on aiosmtpd: the Server (aiosmtpd's SMTP subclass with our limits, reply
wording, pipelining checks and per-connection set-up) and the Handler (our checks at each
command, and the queue at the final dot)."""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import io
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, cast

import aiosmtpd.smtp
from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    _AuthMechAttr,
    syntax,
)

from pymailtools import address, rewrite
from pymailtools.config import Config
from pymailtools.errors import AddressError, DeliveryError, MailError, TooBigError
from pymailtools.local import route
from pymailtools.log import Logger, escape
from pymailtools.queue import intake
from pymailtools.queue.envelope import Envelope as QueueEnvelope
from pymailtools.queue.intake import Submission
from pymailtools.queue.store import Queue
from pymailtools.smtpd import data as smtpd_data
from pymailtools.smtpd import passwd as smtpd_passwd
from pymailtools.smtpd.clients import LocalClients, SharedClients
from pymailtools.smtpd.policy import Settings
from pymailtools.submit import submission as submit

IDENT = "ESMTP pymailtools"
# aiosmtpd's own replies, reworded with RFC 3463 codes the way Postfix words them.
_REWORDED = {
    "250 OK": "250 2.0.0 Ok",
    "221 Bye": "221 2.0.0 Bye",
    "552 Error: message size exceeds fixed maximum message size":
        "552 5.3.4 Message size exceeds fixed limit",
    "552 Error: Too much mail data": "552 5.3.4 Error: message file too big",
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 Error: line too long",
    "500 Command line too long": "500 5.5.2 Error: command line too long",
    "502 EXPN not implemented": "502 5.5.1 Error: command not implemented",
}
_GENERIC = {"500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
            "530": "5.7.0", "553": "5.1.3", "554": "5.5.1", "555": "5.5.4", "454": "4.7.0"}

# aiosmtpd logs every session at INFO/WARNING on "mail.log"; our Logger writes the log lines.
_AIOSMTPD_LOG = logging.getLogger("mail.log")
_AIOSMTPD_LOG.addHandler(logging.NullHandler())
_AIOSMTPD_LOG.propagate = False
_AIOSMTPD_LOG.setLevel(logging.WARNING)
_sanitized_log = aiosmtpd.smtp.sanitized_log


def _quiet_sanitized_log(func: Callable[..., None], msg: Any, *args: Any, **kwargs: Any) -> None:
    # aiosmtpd sanitizes (a regex match per argument) every command line for its debug and
    # info lines before the logger looks at its level: ~2% of the listener's CPU, for
    # nothing at our level. Ask the logger first.
    if getattr(func, "__self__", None) is _AIOSMTPD_LOG:
        level = _LEVELS.get(func.__name__)
        if level is not None and not _AIOSMTPD_LOG.isEnabledFor(level):
            return
    _sanitized_log(func, msg, *args, **kwargs)


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO}


aiosmtpd.smtp.sanitized_log = _quiet_sanitized_log

class QueueWriter:
    """Queues the listener's messages: on the event loop's own thread while queue writes are
    quick, as a group commit; in the default thread pool for a while after one was slow.

    Group commit: a message is written in full (not yet fsynced) as soon as its data is in;
    while another session of this process is reading its message's data, the commit waits
    for the start of the loop's next turn and takes every other message of this process
    written meanwhile (``intake.commit_group``): each file gets its own fsync, but messages/
    and incoming/ are fsynced once for the group. Each 250 reply waits for its own message's
    commit, so none is sent before its entry is durable.

    A thread hand-off costs more CPU than a fast disk's fsyncs take: the worker thread gives
    the GIL back and waits for it again at each of its twenty-odd system calls, and under
    smtp-source that cost the listener about a third of its CPU. But on a slow disk a write
    on the loop's thread stalls every session of the process, so once commits take more than
    SLOW on average (a moving average: one slow fsync is not a slow disk) the next PROBE
    writes go to threads, whose fsync waits overlap, and then a commit on the loop's thread
    is tried again."""

    SLOW = 0.010  # seconds
    PROBE = 1000  # writes
    WEIGHT = 0.1  # of the newest commit in the average

    def __init__(self, logger: Logger | None = None) -> None:
        self.log = logger
        self.threaded = 0  # writes left to send to threads
        self.average = 0.0  # seconds per commit on the loop's thread
        self.group: list[tuple[Submission, QueueEnvelope, asyncio.Future[str]]] = []
        self.receiving = 0  # sessions reading a message's data (Server.smtp_DATA counts them)

    async def submit(self, cfg: Config, src: io.BytesIO, opts: submit.Options,
                     queue: Queue | None) -> str:
        loop = asyncio.get_running_loop()
        if self.threaded > 0:
            self.threaded -= 1
            return await loop.run_in_executor(None, submit.submit, cfg, src, opts, queue)
        sub, env = submit.stage(cfg, src, opts, queue)
        if sub.maildrop:  # (a listener that may not write the queue itself: no group)
            start = time.monotonic()
            try:
                return sub.commit(env)
            finally:
                self.measured(time.monotonic() - start)
        done: asyncio.Future[str] = loop.create_future()
        self.group.append((sub, env, done))
        if len(self.group) == 1:
            if not self.receiving:
                # No other session is between its 354 and its final dot, so none could join
                # this group: commit now rather than pay two more turns of the loop for it.
                self.commit()
                return done.result()
            loop.call_soon(self.commit)
        return await done

    def commit(self) -> None:
        """Commit the messages written since the last commit (one group per queue: a reload
        may change the queue between two of them)."""
        start = time.monotonic()
        waiting, self.group = self.group, []
        while waiting:
            queue = waiting[0][0].queue
            group = [w for w in waiting if w[0].queue is queue]
            waiting = [w for w in waiting if w[0].queue is not queue]
            try:
                errors = intake.commit_group(queue, [(sub, env) for sub, env, _ in group])
            except Exception as e:  # a bug: no session may wait for ever, nor get a 250
                for sub, _, done in group:
                    sub.abort()
                    if not done.done():
                        done.set_exception(e)
                continue
            for (sub, _, done), error in zip(group, errors, strict=True):
                if done.done():  # its session is gone (the message is queued all the same)
                    continue
                if error is None:
                    done.set_result(sub.id)
                else:
                    done.set_exception(error)
        self.measured(time.monotonic() - start)

    def measured(self, took: float) -> None:
        """Update the average with a commit on the loop's thread; after a spell in threads
        this one (the probe) alone decides."""
        probe = self.average > self.SLOW
        self.average = took if probe else self.average + self.WEIGHT * (took - self.average)
        if self.average > self.SLOW:
            if self.log is not None and not probe:
                self.log.warning(f"queue writes take {self.average * 1000:.0f} ms: "
                                 f"the next {self.PROBE} from threads")
            self.threaded = self.PROBE


class State:
    """Per-connection facts our policy needs beyond aiosmtpd's Session."""

    def __init__(self, ip: str | None, client: str) -> None:
        self.ip = ip
        self.client = client  # Postfix's "name[addr]"
        self.errors = 0
        self.overshoot = 0  # RCPTs of this transaction refused past smtpd_recipient_limit
        self.forgiven = False  # the reply about to go out is no error (see handle_RCPT)
        self.counts: dict[str, int] = {}  # command -> how many sent
        self.failed: dict[str, int] = {}  # command -> how many answered 4xx/5xx
        self.pending = ""  # the command whose verdict (first final reply) is still to come
        self.last = "CONNECT"  # for "lost connection after RCPT", as Postfix logs it
        self.ended = ""  # "timeout", or "closed" when this side ended the session
        self.helo = ""
        self.proto = "SMTP"


def _refused(addr: str, e: DeliveryError, table: str, why: str = "") -> str:
    """The RCPT reply, in Postfix's words, for a recipient a lookup in ``table`` turned down."""
    if e.status == "5.1.1":
        return f"550 5.1.1 <{addr}>: Recipient address rejected: User unknown in {table}"
    if e.permanent:
        return f"550 {e.status} <{addr}>: Recipient address rejected" + (f": {why}" if why
                                                                          else "")
    return f"451 4.3.0 <{addr}>: Temporary lookup failure"


def _tally(st: State) -> str:
    """Postfix's command counts: ``ehlo=1 mail=1 rcpt=0/1 data=0/1 commands=2/4``, a count
    written ok/sent where some were refused."""
    def one(name: str, sent: int, failed: int) -> str:
        return f"{name}={sent - failed}/{sent}" if failed else f"{name}={sent}"

    parts = [one(k, v, st.failed.get(k, 0)) for k, v in st.counts.items()]
    parts.append(one("commands", sum(st.counts.values()), sum(st.failed.values())))
    return " ".join(parts)


class PmtSession(Session):
    """aiosmtpd's Session (Server._create_session makes these) with our State, set at
    connect, and the SASL mechanism of a successful AUTH."""

    pmt_state: State
    pmt_mechanism: str


def _state(session: PmtSession) -> State:
    return session.pmt_state


def _names(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    """The attribute names of ``cls`` with one of ``prefixes`` (computed once per class)."""
    key = (cls, prefixes)
    names = _NAMES.get(key)
    if names is None:
        names = _NAMES[key] = [n for n in dir(cls) if n.startswith(prefixes)]
    return list(names)


_NAMES: dict[tuple[type, tuple[str, ...]], list[str]] = {}


class Handler:
    """aiosmtpd hooks: our checks at each command, and the queue at the final dot."""

    def __init__(self, settings: Settings, logger: Logger,
                 queued: Callable[[str], None] | None = None,
                 clients: LocalClients | SharedClients | None = None) -> None:
        self.settings = settings
        self.log = logger
        self.queued = queued or (lambda qid: None)
        self.sessions: set[Server] = set()
        self.clients = clients or LocalClients()
        self.draining = False
        self.uncounted_warned = False
        self.template: _Template | None = None  # Server.fresh's
        self.writer = QueueWriter(logger)

    def __dir__(self) -> list[str]:
        # aiosmtpd finds the hooks with dir() and inspect.getmembers() on every connection;
        # listing only what it looks for saves most of that (see Server.__dir__).
        return _names(type(self), ("handle_", "auth_"))

    @property
    def cfg(self) -> Config:
        return self.settings.cfg

    # --- helpers ------------------------------------------------------------------------------

    def trusted(self, session: PmtSession) -> bool:
        return bool(session.authenticated) or self.settings.trusted_ip(_state(session).ip)

    def reject(self, session: PmtSession, envelope: Envelope, stage: str, reply: str,
               rcpt: str | None = None) -> str:
        st = _state(session)
        to = f" to=<{escape(rcpt)}>" if rcpt is not None else ""
        self.log.info(f"NOQUEUE: reject: {stage} from {st.client}: {escape(reply)}; "
                      f"from=<{escape(envelope.mail_from or '')}>{to} proto={st.proto} "
                      f"helo=<{escape(st.helo)}>")
        return reply

    def _helo_name(self, name: str) -> bool:
        return 0 < len(name) <= 255 and name.isascii() and name.isprintable() and " " not in name

    # --- hooks --------------------------------------------------------------------------------

    async def handle_HELO(self, server: Server, session: PmtSession, envelope: Envelope,
                          hostname: str) -> str:
        if not self._helo_name(hostname):
            return "501 5.5.2 Error: invalid HELO name"
        session.host_name = _state(session).helo = hostname
        _state(session).proto = "SMTP"
        return f"250 {server.hostname}"

    async def handle_EHLO(self, server: Server, session: PmtSession, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        if not self._helo_name(hostname):
            return ["501 5.5.2 Error: invalid EHLO name"]
        session.host_name = _state(session).helo = hostname
        _state(session).proto = "ESMTP"
        offered = [r[4:] for r in responses[1:] if r[4:] != "HELP"]
        if not self.settings.users or not server.tls_context:
            offered = [o for o in offered if not o.startswith("AUTH")]
        lines = [server.hostname, "PIPELINING", *[o for o in offered if o.startswith("SIZE")],
                 *[o for o in offered if o.startswith(("STARTTLS", "AUTH"))],
                 "ENHANCEDSTATUSCODES",
                 *[o for o in offered if o in ("8BITMIME", "SMTPUTF8")]]
        return [f"250-{x}" for x in lines[:-1]] + [f"250 {lines[-1]}"]

    async def handle_MAIL(self, server: Server, session: PmtSession, envelope: Envelope,
                          addr: str, mail_options: list[str]) -> str:
        sender = "" if addr == "<>" else addr
        if sender:
            try:
                address.check_envelope(sender, "sender")
                sender.encode("utf-8")
            except (AddressError, UnicodeEncodeError):
                return self.reject(session, envelope, "MAIL",
                                   "501 5.1.7 Bad sender address syntax")
        envelope.mail_from = sender
        envelope.mail_options.extend(mail_options)
        _state(session).overshoot = 0
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: Server, session: PmtSession, envelope: Envelope,
                          addr: str, rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.cfg.smtpd_recipient_limit:
            # A client that sends its whole list one RCPT at a time takes these 452s as "the
            # rest later" and sends DATA for the ones taken: as Postfix, the first
            # smtpd_recipient_overshoot_limit of them in a transaction are neither errors
            # toward smtpd_error_limit nor refusals in the disconnect line's tally.
            st = _state(session)
            st.overshoot += 1
            st.forgiven = st.overshoot <= self.cfg.smtpd_recipient_overshoot_limit
            return self.reject(session, envelope, "RCPT", "452 4.5.3 Error: too many recipients",
                               addr)
        try:
            address.check_envelope(addr, "recipient")
            addr.encode("utf-8")
        except (AddressError, UnicodeEncodeError):
            return self.reject(session, envelope, "RCPT",
                               "501 5.1.3 Bad recipient address syntax", addr)
        rcpt = address.qualify(addr, self.cfg.myorigin)
        trusted = self.trusted(session)
        local_part = address.local_part(rcpt)
        if self.cfg.virtual_alias_maps:
            verdict = self._virtual(session, envelope, addr, rcpt)
            if verdict is not None:
                return verdict
        if route.is_local(self.cfg, rcpt):
            # user%host@us, host!user@us, "user@host"@us: routing through us is relaying.
            if not trusted and any(c in local_part for c in "%!@"):
                return self.reject(session, envelope, "RCPT",
                                   f"554 5.7.1 <{addr}>: Relay access denied", addr)
            e = self.settings.local_verdict(rcpt)
            if isinstance(e, DeliveryError):
                return self.reject(session, envelope, "RCPT",
                                   _refused(addr, e, "local recipient table"), addr)
            if e is not None:
                return self.reject(session, envelope, "RCPT",
                                   "501 5.1.3 Bad recipient address syntax", addr)
        elif not trusted:
            # relay_domains: anyone may send here, but not through us to somewhere else
            try:
                relay = not any(c in local_part for c in "%!@") and \
                    self.settings.relay_domain(rcpt.rpartition("@")[2])
            except (MailError, OSError) as e:
                self.log.warning(f"relay_domains lookup failed: {escape(e)}")
                return self.reject(session, envelope, "RCPT",
                                   f"451 4.3.0 <{addr}>: Temporary lookup failure", addr)
            if not relay:
                return self.reject(session, envelope, "RCPT",
                                   f"554 5.7.1 <{addr}>: Relay access denied", addr)
        envelope.rcpt_tos.append(rcpt)
        return "250 2.1.5 Ok"

    def _virtual(self, session: PmtSession, envelope: Envelope, addr: str,
                 rcpt: str) -> str | None:
        """The reply for a recipient of ours that virtual_alias_maps maps (taken) or cannot
        map (refused: unknown in a virtual alias domain, a loop); None to go on as usual."""
        try:
            rw = rewrite.for_config(self.cfg)
            if not (rw.is_virtual_domain(address.domain_of(rcpt))
                    or route.is_local(self.cfg, rcpt)):
                return None  # another domain: mapped or not, the relay rules decide
            found = rw.virtual_alias(rw.recipient(rcpt))
        except DeliveryError as e:
            return self.reject(session, envelope, "RCPT",
                               _refused(addr, e, "virtual alias table", e.reason), addr)
        except MailError as e:  # a table that cannot be read or answer: try again later
            self.log.error(f"virtual_alias_maps: {escape(e)}")
            return self.reject(session, envelope, "RCPT",
                               f"451 4.3.0 <{addr}>: Temporary lookup failure", addr)
        if [a.lower() for a in found] == [rcpt.lower()]:
            return None
        envelope.rcpt_tos.append(rcpt)
        return "250 2.1.5 Ok"

    async def handle_VRFY(self, server: Server, session: PmtSession, envelope: Envelope,
                          addr: str) -> str:
        return "252 2.0.0 Cannot VRFY user; try RCPT to attempt delivery"  # no enumeration

    async def handle_DATA(self, server: Server, session: PmtSession, envelope: Envelope) -> str:
        st = _state(session)
        content: bytes = envelope.original_content or b""
        crlf = content.count(b"\r\n")
        bare_lf, bare_cr = content.count(b"\n") != crlf, content.count(b"\r") != crlf
        if (bare_lf or bare_cr) and self.settings.bare_newline == "reject":
            # Postfix's smtpd_forbid_bare_newline = reject: the SMTP-smuggling defence that
            # keeps "<LF>.<CR><LF>" and friends from meaning anything anywhere downstream.
            what = "<LF>" if bare_lf else "<CR>"
            server.close_after_reply()
            return self.reject(session, envelope, "DATA",
                               f"521 5.5.2 {server.hostname} Error: bare {what} received")
        # Accepted content gets one line ending (LF, as submit() stores it): a bare CR or LF
        # becomes an ordinary line break, never an end of data at the next hop.
        data = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        opts = submit.Options(list(envelope.rcpt_tos), envelope.mail_from or "", fullname="",
                              ignore_dots=True, mailbox_lines=True,
                              received=functools.partial(self.received_header, server, session,
                                                         list(envelope.rcpt_tos)))
        try:
            qid = await self.writer.submit(self.cfg, io.BytesIO(data), opts, self.settings.queue)
        except TooBigError:
            return self.reject(session, envelope, "END-OF-MESSAGE",
                               "552 5.3.4 Error: message file too big")
        except MailError as e:
            self.log.error(f"{st.client}: queue file write error: {escape(e)}")
            return "451 4.3.0 Error: queue file write error"
        sasl = ""
        if session.authenticated:
            sasl = (f", sasl_method={escape(session.pmt_mechanism)}, "
                    f"sasl_username={escape(session.auth_data)}")
        self.log.info(f"{qid}: client={st.client}{sasl}")
        self.log.info(f"{qid}: from=<{escape(envelope.mail_from or '')}>, "
                      f"nrcpt={len(envelope.rcpt_tos)} (queued)")
        if self.cfg.delivery_mode != "queue":  # (read at each message: SIGHUP may change it)
            self.queued(qid)
        return f"250 2.0.0 Ok: queued as {qid}"

    def received_header(self, server: Server, session: PmtSession, rcpts: list[str],
                        qid: str) -> str:
        """``Received: from HELO (name [ip]) by us (pymailtools) with ESMTPSA id QID for <r>``."""
        st = _state(session)
        helo = st.helo
        if not (helo.isascii() and helo.isprintable()) or "(" in helo or ")" in helo or \
                "\\" in helo:  # (the usual plain name needs no loop over its characters)
            helo = "".join(c if c.isascii() and c.isprintable() and c not in "()\\" else "?"
                           for c in helo)
        helo = helo or "unknown"
        proto = st.proto
        if session.ssl is not None:
            proto += "S"
        if session.authenticated:
            proto += "A"
        if st.ip is None:
            origin = f"from {helo}\n\tby {self.cfg.myhostname} (pymailtools, from userid " \
                     f"{os.getuid()})"
        else:
            origin = f"from {helo} (unknown [{st.ip}])\n\tby {self.cfg.myhostname} (pymailtools)"
        for_ = ""
        if len(rcpts) == 1 and rcpts[0].isprintable():
            for_ = f"\n\tfor <{rcpts[0]}>"
        return f"Received: {origin} with {proto} id {qid}{for_};\n" \
               f"\t{submit.rfc5322_date(time.time())}\n"

    def authenticate(self, server: SMTP, session: Session, envelope: Envelope,
                     mechanism: str, auth_data: Any) -> AuthResult:
        # (aiosmtpd's authenticator type: any SMTP and Session; ours are Server's own)
        assert isinstance(session, PmtSession)
        ok = False
        user = ""
        if isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode("utf-8", "replace")
            ok = smtpd_passwd.check(self.settings.users.get(user), auth_data.password)
        if not ok:
            # The password is never logged, only that it failed: a mistyped one is often a real one.
            self.log.warning(f"{_state(session).client}: SASL {escape(mechanism)} "
                             "authentication failed: authentication failure")
            return AuthResult(success=False, handled=False)
        session.pmt_mechanism = mechanism
        return AuthResult(success=True, handled=False, auth_data=user)


# Commands that end a pipelined group (RFC 2920 section 3.1): the client waits for the reply.
_LAST_IN_GROUP = frozenset({"EHLO", "HELO", "DATA", "STARTTLS", "AUTH", "NOOP", "VRFY", "EXPN",
                            "ETRN", "TURN", "HELP"})


class _Counted:
    """A command method of one session, run through Server.command. Attribute reads go to
    the method (aiosmtpd's HELP reads the syntax it was decorated with)."""

    __slots__ = ("server", "name", "method")

    def __init__(self, server: Server, name: str,
                 method: Callable[[str | None], Awaitable[None]]) -> None:
        self.server = server
        self.name = name
        self.method = method

    def __call__(self, arg: str | None) -> Awaitable[None]:
        return self.server.command(self.name, self.method, arg)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.method, attr)


class _Template:
    """What Server.fresh copies: a built Server's attributes, less those that belong to one
    connection (asyncio's protocol state, bound methods, the reply buffer)."""

    OWN = frozenset({"_smtp_methods", "_auth_methods", "_held"})

    def __init__(self, built: Server, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.loop = loop
        bare = Server.__new__(Server)  # to learn which attributes asyncio's __init__ sets
        asyncio.StreamReaderProtocol.__init__(bare, asyncio.StreamReader(loop=loop),
                                              client_connected_cb=built._cb_client_connected,
                                              loop=loop)
        mine = self.OWN | set(bare.__dict__)
        self.attrs = {k: v for k, v in built.__dict__.items() if k not in mine}
        self.commands = tuple(built._smtp_methods)
        self.known = frozenset(self.commands)
        self.mechanisms = dict(built._auth_methods)


class _Commands(Mapping[str, _Counted]):
    """A session's command table (aiosmtpd's ``_smtp_methods``), each method bound when it is
    looked up: aiosmtpd asks for one command at a time, and binding all of them for every
    connection was ~5% of the listener's CPU."""

    __slots__ = ("server", "names", "known", "bound")

    def __init__(self, server: Server, names: tuple[str, ...],
                 known: frozenset[str] | None = None) -> None:
        self.server = server
        self.names = names
        self.known = frozenset(names) if known is None else known
        self.bound: dict[str, _Counted] = {}  # (a reused connection asks for MAIL again)

    def __getitem__(self, name: str) -> _Counted:
        method = self.bound.get(name)
        if method is None:
            if name not in self.known:
                raise KeyError(name)
            method = self.bound[name] = _Counted(self.server, name,
                                                 getattr(self.server, "smtp_" + name))
        return method

    def get(self, name: str, default: Any = None) -> Any:  # (Mapping's, without its try)
        method = self.bound.get(name)
        if method is not None:
            return method
        return self[name] if name in self.known else default

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


# RFC 5322 atext: what a dot-atom is made of.
_ATEXT = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                   "!#$%&'*+-/=?^_`{|}~")


def _dot_atom(text: str) -> bool:
    return all(part and set(part) <= _ATEXT for part in text.split("."))


class Server(SMTP):
    """aiosmtpd's SMTP with our limits: connections per client, errors per session, shutdown."""

    session: PmtSession | None  # see _create_session

    def __init__(self, handler: Handler, **kw: Any) -> None:
        s = handler.settings
        cfg = s.cfg
        super().__init__(handler, hostname=cfg.myhostname, ident=IDENT,
                         data_size_limit=cfg.message_size_limit or None, enable_SMTPUTF8=True,
                         decode_data=False, tls_context=s.tls, timeout=cfg.smtpd_timeout or 300,
                         auth_require_tls=True, authenticator=handler.authenticate, **kw)
        self.pmt = handler
        self.refused = False
        self.counted = False  # this connection is in handler.clients
        self._close_after = False
        self._held: list[str] = []  # the first lines of a multi-line reply
        self._deadline = self._armed_for = 0.0  # see _reset_timeout
        self._tls_up = False  # STARTTLS handshake done
        self._smtp_methods = _Commands(self, tuple(self._smtp_methods))  # type: ignore[assignment]  # a Mapping: aiosmtpd only reads it

    @classmethod
    def fresh(cls, handler: Handler, loop: asyncio.AbstractEventLoop) -> Server:
        """The protocol for a new connection: a copy of one built the usual way (once per
        configuration) with its per-connection parts made anew. aiosmtpd's __init__ looks up
        its hooks, mechanisms and commands by introspection each time, ~60 us per connection;
        tests/smtpd/test_smtpd_fastpath.py checks the copy against a built one, attribute by
        attribute."""
        t = handler.template
        if t is None or t.settings is not handler.settings or t.loop is not loop:
            t = handler.template = _Template(cls(handler, loop=loop), handler.settings, loop)
        self = cls.__new__(cls)
        self.__dict__.update(t.attrs)
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=loop)
        self._held = []
        self._smtp_methods = _Commands(self, t.commands, t.known)  # type: ignore[assignment]  # a Mapping: aiosmtpd only reads it
        self._auth_methods = {name: _AuthMechAttr(getattr(self, how.method.__name__), True)
                              if how.is_builtin else how for name, how in t.mechanisms.items()}
        return self

    def _create_session(self) -> PmtSession:
        return PmtSession(self.loop)

    def __dir__(self) -> list[str]:
        # aiosmtpd's __init__ runs dir() and inspect.getmembers() over the protocol and the
        # handler for every connection, for the smtp_*, auth_* and handle_* names only: with
        # the full listing that was about 0.2 ms of CPU per connection.
        return _names(type(self), ("smtp_", "auth_"))

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd's version defines a typing.Protocol class and runs the email package's
        # RFC 5322 parser on every MAIL and RCPT (~0.1 ms each). The usual <local@domain> of
        # plain dot-atoms gets the same answer here; anything else still goes to it.
        text = arg.lstrip(" \t") if arg else ""
        end = text.find(">")
        if text.startswith("<") and end > 0:
            local, at, domain = text[1:end].rpartition("@")
            rest = text[end + 1:]
            if rest[:1] in (" ", "\t"):
                rest = rest.lstrip()  # as the email package takes folding white space
            if at and _dot_atom(local) and _dot_atom(domain) and not rest.startswith("("):
                if self.local_part_limit and len(local) > self.local_part_limit:
                    return None, None
                return text[1:end], rest
        return super()._getaddr(arg)

    async def command(self, name: str, method: Callable[[str | None], Awaitable[None]],
                      arg: str | None) -> None:
        """Run one SMTP command: counted for the disconnect log line, 421 while draining,
        554 and the end of the session for improper pipelining."""
        if self.transport is None or self.transport.is_closing():
            # closed by an earlier reply (421, 521, 554): aiosmtpd would still run the
            # commands it has buffered until asyncio reports the connection lost
            return
        session = self.session
        assert session is not None  # set at connect, before any command
        st = _state(session)
        key = name.lower()
        st.counts[key] = st.counts.get(key, 0) + 1
        st.pending = key
        st.last = name
        if self._reader._buffer and st.ip is not None and name != "QUIT" and (  # type: ignore[attr-defined]  # private in asyncio
                name in _LAST_IN_GROUP or not session.extended_smtp):
            await self._improper_pipelining(name, st)
            return
        if self.pmt.draining and name != "QUIT" and not self.in_transaction():
            await self._shutting_down()
            return
        await method(arg)
        if self.pmt.draining and name != "QUIT" and not self.in_transaction() and \
                self.transport is not None and not self.transport.is_closing():
            # the transaction this session was let finish is over (DATA, RSET): say so now
            # rather than wait for a next command the client may never send
            await self._shutting_down()

    async def _improper_pipelining(self, name: str, st: State) -> None:
        """The client sent more after a command it must wait for the reply to (RFC 2920: EHLO,
        DATA, STARTTLS, AUTH, ...), or pipelined at all after HELO, which does not offer it:
        as Postfix's smtpd_forbid_unauth_pipelining, which stops injection through a
        client's unchecked pipelining (and plaintext sent along with STARTTLS)."""
        pending = bytes(self._reader._buffer[:100])  # type: ignore[attr-defined]  # private in asyncio
        self.pmt.log.warning(f"improper command pipelining after {name} from {st.client}: "
                             f"{escape(pending.decode('utf-8', 'replace'))}")
        await self.push("554 5.5.0 Error: SMTP protocol synchronization")
        self.close_transport()

    async def _shutting_down(self) -> None:
        await self.push("421 4.3.2 Service shutting down, closing transmission channel")
        self.close_transport()

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd cancels and re-creates a timer at every command; here each command only
        # moves the deadline, and the one timer re-arms itself if it fires before it.
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        if self._timeout_handle is None or self._armed_for > self._deadline:
            self._arm()

    def _arm(self) -> None:
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        self._armed_for = self._deadline
        self._timeout_handle = self.loop.call_at(self._deadline, self._timer)

    def _timer(self) -> None:
        if self.loop.time() < self._deadline:
            self._arm()
            return
        if self.session is not None:
            _state(self.session).ended = "timeout"
        if self._original_transport is not None and not self._tls_up:
            # Timed out in the STARTTLS handshake (or the client left during it): asyncio's
            # TLS layer tells the session nothing then, and closing it would not end the
            # connection. Drop the TCP connection and end the session as aiosmtpd does when
            # a handshake fails.
            # (aiosmtpd declares a BaseTransport; a stream server's is a full Transport)
            cast(asyncio.Transport, self._original_transport).abort()
            if self.transport is not None:
                self.connection_lost(None)
        else:
            self._timeout_cb()  # type: ignore[no-untyped-call]  # unannotated in aiosmtpd

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        # aiosmtpd raises the MAIL line limit for SIZE and SMTPUTF8 by adding to a dict on its
        # class, cleared only in __init__ (which fresh() skips): each EHLO of any session
        # would raise it for all. Each session gets its own dict, anew at each EHLO.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        await super().smtp_EHLO(hostname)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, reading the message in bulk (smtpd_data.read_data) instead of one
        coroutine call per line; the same replies in the same cases. The content stays bytes:
        this server never sets aiosmtpd's decode_data."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        writer = self.pmt.writer
        writer.receiving += 1  # a message that may join a group commit
        try:
            content, problem = await smtpd_data.read_data(
                self._reader, self.data_size_limit or 0, self.line_length_limit,
                self._reset_timeout)  # smtpd_timeout per read, as Postfix, not for all of DATA
        except asyncio.IncompleteReadError:  # the client went away in the middle of it
            raise ConnectionResetError("end of file during DATA") from None
        finally:
            writer.receiving -= 1
        assert self.session is not None  # (as the envelope: set at connect)
        _state(self.session).last = "END-OF-MESSAGE"
        if problem:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)"
                            if problem == smtpd_data.TOO_LONG
                            else "552 Error: Too much mail data")
            self._set_post_data_state()  # type: ignore[no-untyped-call]  # unannotated in aiosmtpd
            return
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]  # unannotated in aiosmtpd
        await self.push("250 OK" if status is MISSING else status)

    def in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    def close_after_reply(self) -> None:
        self._close_after = True

    def close_transport(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self.session is not None:
                _state(self.session).ended = _state(self.session).ended or "closed"
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is not None and self.session is not None:
            # The TLS layer after STARTTLS: aiosmtpd starts a fresh Session (the client must
            # EHLO again), but the connection's facts and counters carry over.
            state = self.session.pmt_state
            self._tls_up = True
            super().connection_made(transport)
            assert self.session is not None  # (aiosmtpd's connection_made made a new one)
            self.session.pmt_state = state
            return
        peer = transport.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) and peer else None
        client = f"unknown[{ip}]" if ip is not None else f"local[uid {os.getuid()}]"
        h = self.pmt
        # mynetworks clients are not counted (Postfix: smtpd_client_event_limit_exceptions)
        if ip is not None and (h.draining or not h.settings.trusted_ip(ip)):
            counted = False if h.draining else h.clients.acquire(
                ip, h.cfg.smtpd_client_connection_count_limit)
            if counted is False:
                self.refused = True
                why = "Service shutting down" if h.draining else "too many connections"
                h.log.warning(f"{why} from {client}")
                # (asyncio declares a BaseTransport; a stream server's is a full Transport)
                cast(asyncio.Transport, transport).write(
                    f"421 4.7.0 {h.cfg.myhostname} Error: {why}\r\n".encode())
                transport.close()
                return
            self.counted = counted is True
            if counted is None and not h.uncounted_warned:
                h.uncounted_warned = True
                h.log.warning("too many client addresses connected to count them all: "
                              "smtpd_client_connection_count_limit is not applied to some")
        h.sessions.add(self)
        h.log.info(f"connect from {client}")
        super().connection_made(transport)
        assert self.session is not None  # (aiosmtpd's connection_made made it)
        self.session.pmt_state = State(ip, client)

    def eof_received(self) -> bool:
        # aiosmtpd cancels the session's task at end of file but keeps the transport open; a
        # task cancelled before it ran (the client closed right after connecting) never closes
        # it, and the connection would hold its client's slot until smtpd_timeout. False: the
        # transport closes itself (not close_transport: the client ended the session).
        if not self.refused:  # (a refused connection never had a session)
            super().eof_received()
        return False

    def connection_lost(self, error: Exception | None) -> None:
        if self.refused:
            return
        h = self.pmt
        if self in h.sessions:
            h.sessions.discard(self)
            assert self.session is not None  # (in sessions: connection_made went on to make it)
            st = _state(self.session)
            if st.ip is not None and self.counted:
                h.clients.release(st.ip)
            if st.ended != "closed" and "quit" not in st.counts:
                h.log.info(f"{st.ended or 'lost connection'} after {st.last} from {st.client}")
            h.log.info(f"disconnect from {st.client} {_tally(st)}")
        super().connection_lost(error)

    async def _send(self, text: str) -> None:
        """aiosmtpd's push, less its two coroutine calls per reply: the same bytes written,
        and drain() awaited only when it has something to do (an error to raise, a closing
        transport to yield to, a full send buffer to wait for)."""
        writer = self._writer
        assert writer is not None  # (set before the first reply, the greeting)
        response = bytes(text, "utf-8" if self.enable_SMTPUTF8 else "ascii")
        writer.write(response + b"\r\n")
        if _AIOSMTPD_LOG.isEnabledFor(logging.DEBUG):
            assert self.session is not None
            _AIOSMTPD_LOG.debug("%r << %r", self.session.peer, response)
        # asyncio's FlowControlMixin state (private): where a Python names it otherwise, the
        # default is to drain, as push does
        if getattr(self, "_paused", True) or getattr(self, "_connection_lost", True) or \
                writer.transport.is_closing() or self._reader.exception() is not None:
            await writer.drain()

    async def push(self, status: Any) -> None:
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else str(status)
        text = _REWORDED.get(text, text)
        code, sep = text[:3], text[3:4]
        if sep == " " and code in _GENERIC and not text[4:5].isdigit():
            text = f"{code} {_GENERIC[code]} {text[4:]}"
        if sep == "-":
            self._held.append(text)  # a multi-line reply (EHLO) leaves in one write
            return
        if self._held:
            text = "\r\n".join((*self._held, text))
            self._held.clear()
        await self._send(text)
        st = _state(self.session) if self.session is not None else None
        forgiven = st is not None and st.forgiven
        if st is not None:
            st.forgiven = False
        if st is not None and st.pending and (code[:1] in ("2", "4", "5") or code == "354"):
            if code[:1] in "45" and not forgiven:  # counted for the disconnect line's rcpt=0/1
                st.failed[st.pending] = st.failed.get(st.pending, 0) + 1
            st.pending = ""
        if st is not None and code[:1] in ("4", "5") and sep == " " and not forgiven \
                and code != "421" and self.transport is not None:
            st.errors += 1
            if st.errors >= self.pmt.cfg.smtpd_error_limit:
                self.pmt.log.warning(f"too many errors from {st.client}")
                await self._send(f"421 4.7.0 {self.hostname} Error: too many errors")
                self.close_transport()
                return
        if self._close_after:
            self.close_transport()


# aiosmtpd reads handle_EHLO's signature (its old 4- or new 5-argument form) for every
# connection; computed once, that is cheap.
Handler.handle_EHLO.__signature__ = inspect.signature(  # type: ignore[attr-defined]  # not in typeshed
    Handler.handle_EHLO)
