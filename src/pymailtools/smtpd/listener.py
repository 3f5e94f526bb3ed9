"""The SMTP listener (sendmail -bd / -bs): aiosmtpd for the wire, our policy and the queue."""

from __future__ import annotations

import asyncio
import collections
import errno
import functools
import inspect
import io
import ipaddress
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from typing import Any

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

from pymailtools import address
from pymailtools.config import SCHEMA, Config
from pymailtools.errors import (
    AddressError,
    ConfigError,
    MailError,
    PermissionDenied,
    TooBigError,
)
from pymailtools.local import route
from pymailtools.local.targets import DeliveryError
from pymailtools.log import Logger, escape
from pymailtools.queue.store import Queue
from pymailtools.smtpd import data as smtpd_data
from pymailtools.smtpd import passwd as smtpd_passwd
from pymailtools.smtpd.clients import LocalClients, SharedClients
from pymailtools.submit import submission as submit

IDENT = "ESMTP pymailtools"
SHUTDOWN_GRACE = 60.0  # seconds transactions in flight get to finish after SIGTERM
VERDICT_SECONDS = 2.0  # how long a local recipient's lookup (user, aliases, .forward) is reused
VERDICT_ENTRIES = 10000  # cached verdicts (and client trust) at most; then start afresh
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
    level = {"debug": logging.DEBUG, "info": logging.INFO}.get(getattr(func, "__name__", ""))
    if level is not None and not _AIOSMTPD_LOG.isEnabledFor(level) and \
            getattr(func, "__self__", None) is _AIOSMTPD_LOG:
        return
    _sanitized_log(func, msg, *args, **kwargs)


aiosmtpd.smtp.sanitized_log = _quiet_sanitized_log


class Settings:
    """What the listener needs from the configuration, parsed once (and again on SIGHUP)."""

    def __init__(self, cfg: Config, *, stdio: bool = False) -> None:
        self.cfg = cfg
        self.stdio = stdio
        try:
            self.networks = [ipaddress.ip_network(n, strict=False) for n in cfg.mynetworks]
        except ValueError as e:
            raise ConfigError(f"mynetworks: {e}") from None
        self.tls: ssl.SSLContext | None = None
        if not stdio and (cfg.smtpd_tls_cert_file or cfg.smtpd_tls_key_file):
            self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.tls.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                self.tls.load_cert_chain(cfg.smtpd_tls_cert_file,
                                         cfg.smtpd_tls_key_file or None)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"smtpd_tls_cert_file/smtpd_tls_key_file: {e}") from None
        self.users: dict[str, str] = {}
        if not stdio and cfg.smtpd_sasl_password_file:
            try:
                self.users = smtpd_passwd.load(cfg.smtpd_sasl_password_file)
            except smtpd_passwd.PasswordFileError as e:
                raise ConfigError(f"smtpd_sasl_password_file: {e}") from None
        self.bare_newline = "normalize" if stdio else cfg.smtpd_forbid_bare_newline
        # -bd: the queue its starter set up; -bs: submit() sets it up, as for sendmail -bm
        self.queue: Queue | None = None if stdio else Queue(cfg.queue_directory)
        # local recipient -> (when looked up, the error it gave or None): see local_verdict
        self.verdicts: dict[str, tuple[float, Exception | None]] = {}
        self.trust: dict[str | None, bool] = {}

    def local_verdict(self, rcpt: str) -> Exception | None:
        """The error route.resolve gives for a local recipient (None: deliverable), looked up
        at most once per VERDICT_SECONDS: a burst of mail for one user costs one passwd,
        aliases and .forward lookup, as Postfix's cached local_recipient_maps do."""
        now = time.monotonic()
        hit = self.verdicts.get(rcpt)
        if hit is not None and now - hit[0] < VERDICT_SECONDS:
            return hit[1]
        error: Exception | None = None
        try:
            route.resolve(self.cfg, rcpt)
        except (DeliveryError, AddressError) as e:
            error = e.with_traceback(None)  # kept: without the frames it would keep alive
        if len(self.verdicts) >= VERDICT_ENTRIES:
            self.verdicts.clear()
        self.verdicts[rcpt] = (now, error)
        return error

    def trusted_ip(self, ip: str | None) -> bool:
        known = self.trust.get(ip)
        if known is None:
            if len(self.trust) >= VERDICT_ENTRIES:
                self.trust.clear()
            known = self.trust[ip] = self._trusted_ip(ip)
        return known

    def _trusted_ip(self, ip: str | None) -> bool:
        if ip is None:
            return self.stdio
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)


class QueueWriter:
    """Runs submit.submit for the listener: on the event loop's own thread while queue writes
    are quick, in the default thread pool for a while after one was slow.

    A thread hand-off costs more CPU than a fast disk's fsyncs take: the worker thread gives
    the GIL back and waits for it again at each of its twenty-odd system calls, and under
    smtp-source that cost the listener about a third of its CPU. But on a slow disk a write
    on the loop's thread stalls every session of the process, so once writes take more than
    SLOW on average (a moving average: one slow fsync is not a slow disk) the next PROBE go
    to threads, whose fsync waits overlap, and then one is tried inline again."""

    SLOW = 0.010  # seconds
    PROBE = 1000  # writes
    WEIGHT = 0.1  # of the newest write in the average

    def __init__(self, logger: Logger | None = None) -> None:
        self.log = logger
        self.threaded = 0  # writes left to send to threads
        self.average = 0.0  # seconds per inline write

    async def submit(self, cfg: Config, src: io.BytesIO, opts: submit.Options,
                     queue: Queue | None) -> str:
        if self.threaded > 0:
            self.threaded -= 1
            return await asyncio.get_running_loop().run_in_executor(
                None, submit.submit, cfg, src, opts, queue)
        probe, start = self.threaded == 0 and self.average > self.SLOW, time.monotonic()
        try:
            return submit.submit(cfg, src, opts, queue)
        finally:
            took = time.monotonic() - start
            # after a spell in threads the probe alone decides; then the average goes on
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


def _tally(st: State) -> str:
    """Postfix's command counts: ``ehlo=1 mail=1 rcpt=0/1 data=0/1 commands=2/4``, a count
    written ok/sent where some were refused."""
    def one(name: str, sent: int, failed: int) -> str:
        return f"{name}={sent - failed}/{sent}" if failed else f"{name}={sent}"

    parts = [one(k, v, st.failed.get(k, 0)) for k, v in st.counts.items()]
    parts.append(one("commands", sum(st.counts.values()), sum(st.failed.values())))
    return " ".join(parts)


def _state(session: Session) -> State:
    return session.pmt_state  # type: ignore[attr-defined,no-any-return]


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

    def trusted(self, session: Session) -> bool:
        return bool(session.authenticated) or self.settings.trusted_ip(_state(session).ip)

    def reject(self, session: Session, envelope: Envelope, stage: str, reply: str,
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

    async def handle_HELO(self, server: Server, session: Session, envelope: Envelope,
                          hostname: str) -> str:
        if not self._helo_name(hostname):
            return "501 5.5.2 Error: invalid HELO name"
        session.host_name = _state(session).helo = hostname
        _state(session).proto = "SMTP"
        return f"250 {server.hostname}"

    async def handle_EHLO(self, server: Server, session: Session, envelope: Envelope,
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

    async def handle_MAIL(self, server: Server, session: Session, envelope: Envelope,
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

    async def handle_RCPT(self, server: Server, session: Session, envelope: Envelope,
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
        if route.is_local(self.cfg, rcpt):
            # user%host@us, host!user@us, "user@host"@us: routing through us is relaying.
            if not trusted and any(c in local_part for c in "%!@"):
                return self.reject(session, envelope, "RCPT",
                                   f"554 5.7.1 <{addr}>: Relay access denied", addr)
            e = self.settings.local_verdict(rcpt)
            if isinstance(e, DeliveryError):
                if e.status == "5.1.1":
                    reply = (f"550 5.1.1 <{addr}>: Recipient address rejected: "
                             "User unknown in local recipient table")
                elif e.permanent:
                    reply = f"550 {e.status} <{addr}>: Recipient address rejected"
                else:
                    reply = f"451 4.3.0 <{addr}>: Temporary lookup failure"
                return self.reject(session, envelope, "RCPT", reply, addr)
            if e is not None:
                return self.reject(session, envelope, "RCPT",
                                   "501 5.1.3 Bad recipient address syntax", addr)
        elif not trusted:
            return self.reject(session, envelope, "RCPT",
                               f"554 5.7.1 <{addr}>: Relay access denied", addr)
        envelope.rcpt_tos.append(rcpt)
        return "250 2.1.5 Ok"

    async def handle_VRFY(self, server: Server, session: Session, envelope: Envelope,
                          addr: str) -> str:
        return "252 2.0.0 Cannot VRFY user; try RCPT to attempt delivery"  # no enumeration

    async def handle_DATA(self, server: Server, session: Session, envelope: Envelope) -> str:
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
            sasl = (f", sasl_method={escape(session.pmt_mechanism)}, "  # type: ignore
                    f"sasl_username={escape(session.auth_data)}")
        self.log.info(f"{qid}: client={st.client}{sasl}")
        self.log.info(f"{qid}: from=<{escape(envelope.mail_from or '')}>, "
                      f"nrcpt={len(envelope.rcpt_tos)} (queued)")
        if self.cfg.delivery_mode != "queue":  # (read at each message: SIGHUP may change it)
            self.queued(qid)
        return f"250 2.0.0 Ok: queued as {qid}"

    def received_header(self, server: Server, session: Session, rcpts: list[str],
                        qid: str) -> str:
        """``Received: from HELO (name [ip]) by us (pymailtools) with ESMTPSA id QID for <r>``."""
        st = _state(session)
        helo = "".join(c if c.isascii() and c.isprintable() and c not in "()\\" else "?"
                       for c in st.helo) or "unknown"
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
        if len(rcpts) == 1 and all(c.isprintable() for c in rcpts[0]):
            for_ = f"\n\tfor <{rcpts[0]}>"
        return f"Received: {origin} with {proto} id {qid}{for_};\n" \
               f"\t{submit.rfc5322_date(time.time())}\n"

    def authenticate(self, server: Server, session: Session, envelope: Envelope,
                     mechanism: str, auth_data: Any) -> AuthResult:
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
        session.pmt_mechanism = mechanism  # type: ignore[attr-defined]
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
        self.mechanisms = dict(built._auth_methods)


class _Commands(Mapping[str, _Counted]):
    """A session's command table (aiosmtpd's ``_smtp_methods``), each method bound when it is
    looked up: aiosmtpd asks for one command at a time, and binding all of them for every
    connection was ~5% of the listener's CPU."""

    __slots__ = ("server", "names", "known")

    def __init__(self, server: Server, names: tuple[str, ...]) -> None:
        self.server = server
        self.names = names
        self.known = frozenset(names)

    def __getitem__(self, name: str) -> _Counted:
        if name not in self.known:
            raise KeyError(name)
        return _Counted(self.server, name, getattr(self.server, "smtp_" + name))

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
        self._smtp_methods = _Commands(self, tuple(self._smtp_methods))

    @classmethod
    def fresh(cls, handler: Handler, loop: asyncio.AbstractEventLoop) -> Server:
        """The protocol for a new connection: a copy of one built the usual way (once per
        configuration) with its per-connection parts made anew. aiosmtpd's __init__ looks up
        its hooks, mechanisms and commands by introspection each time, ~60 us per connection;
        tests/test_smtpd_fastpath.py checks the copy against a built one, attribute by
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
        self._smtp_methods = _Commands(self, t.commands)
        self._auth_methods = {name: _AuthMechAttr(getattr(self, how.method.__name__), True)
                              if how.is_builtin else how for name, how in t.mechanisms.items()}
        return self

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
        return super()._getaddr(arg)  # type: ignore[no-any-return]

    async def command(self, name: str, method: Callable[[str | None], Awaitable[None]],
                      arg: str | None) -> None:
        """Run one SMTP command: counted for the disconnect log line, 421 while draining,
        554 and the end of the session for improper pipelining."""
        if self.transport is None or self.transport.is_closing():
            # closed by an earlier reply (421, 521, 554): aiosmtpd would still run the
            # commands it has buffered until asyncio reports the connection lost
            return
        st = _state(self.session)
        key = name.lower()
        st.counts[key] = st.counts.get(key, 0) + 1
        st.pending = key
        st.last = name
        if self._reader._buffer and st.ip is not None and name != "QUIT" and (  # type: ignore
                name in _LAST_IN_GROUP or not self.session.extended_smtp):  # type: ignore
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
        pending = bytes(self._reader._buffer[:100])  # type: ignore[attr-defined]
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
            self._original_transport.abort()
            if self.transport is not None:
                self.connection_lost(None)
        else:
            self._timeout_cb()

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
        try:
            content, problem = await smtpd_data.read_data(
                self._reader, self.data_size_limit or 0, self.line_length_limit,
                self._reset_timeout)  # smtpd_timeout per read, as Postfix, not for all of DATA
        except asyncio.IncompleteReadError:  # the client went away in the middle of it
            raise ConnectionResetError("end of file during DATA") from None
        _state(self.session).last = "END-OF-MESSAGE"
        if problem:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)"
                            if problem == smtpd_data.TOO_LONG
                            else "552 Error: Too much mail data")
            self._set_post_data_state()
            return
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
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
            state = self.session.pmt_state  # type: ignore[attr-defined]
            self._tls_up = True
            super().connection_made(transport)
            self.session.pmt_state = state  # type: ignore[attr-defined]
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
                transport.write(f"421 4.7.0 {h.cfg.myhostname} Error: {why}\r\n".encode())
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
        self.session.pmt_state = State(ip, client)  # type: ignore[union-attr]

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
            st = _state(self.session)
            if st.ip is not None and self.counted:
                h.clients.release(st.ip)
            if st.ended != "closed" and "quit" not in st.counts:
                h.log.info(f"{st.ended or 'lost connection'} after {st.last} from {st.client}")
            h.log.info(f"disconnect from {st.client} {_tally(st)}")
        super().connection_lost(error)

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
        await super().push(text)
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
                await super().push(f"421 4.7.0 {self.hostname} Error: too many errors")
                self.close_transport()
                return
        if self._close_after:
            self.close_transport()


# aiosmtpd reads handle_EHLO's signature (its old 4- or new 5-argument form) for every
# connection; computed once, that is cheap.
Handler.handle_EHLO.__signature__ = inspect.signature(  # type: ignore[attr-defined]
    Handler.handle_EHLO)


# --- sendmail -bs: one session on standard input and output ------------------------------------

class _StdioTransport(asyncio.Transport):
    """A transport over fds 0 and 1 (pipes, files, terminals or an inetd socket)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: Server) -> None:
        super().__init__()
        self.loop = loop
        self.protocol = protocol
        self.closing = False
        self.resume = threading.Event()
        self.resume.set()
        self.done: asyncio.Future[None] = loop.create_future()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(bytes(data))
        try:
            while view:
                view = view[os.write(1, view):]
        except OSError:
            self.close()

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.resume.set()
            self.loop.call_soon(self._lost)

    def _lost(self) -> None:
        self.protocol.connection_lost(None)
        if not self.done.done():
            self.done.set_result(None)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        self.resume.clear()

    def resume_reading(self) -> None:
        self.resume.set()

    def is_reading(self) -> bool:
        return self.resume.is_set()

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return False

    def feed(self, data: bytes) -> None:
        if not self.closing:
            self.protocol.data_received(data)

    async def end_of_input(self) -> None:
        """Input ended: let the session answer everything it has read, then close it (aiosmtpd
        itself would drop pipelined commands still buffered at end of file)."""
        reader = self.protocol._reader
        while not self.closing:
            # Waiting for more input: what is left (nothing, or a last line without its
            # CRLF) can never be a whole command.
            if reader._waiter is not None:  # type: ignore[attr-defined]
                self.close()
                break
            await asyncio.sleep(0.01)

    def pump(self) -> None:
        """Reader thread: stdin -> the protocol, honouring pause_reading()."""
        while True:
            self.resume.wait()
            if self.closing:
                return
            try:
                data = os.read(0, 65536)
            except OSError:
                data = b""
            if not data:
                self.loop.call_soon_threadsafe(
                    lambda: self.loop.create_task(self.end_of_input()))
                return
            self.loop.call_soon_threadsafe(self.feed, data)


def serve_stdio(cfg: Config, *, verbose: bool = False) -> int:
    """sendmail -bs: an SMTP session on stdin/stdout, queueing as sendmail -bm does."""
    settings = Settings(cfg, stdio=True)
    logger = Logger("smtpd", to_syslog=cfg.syslog, verbose=verbose)
    queued: list[str] = []

    async def session() -> None:
        loop = asyncio.get_running_loop()
        handler = Handler(settings, logger, queued.append)
        server = Server(handler, loop=loop)
        transport = _StdioTransport(loop, server)
        server.connection_made(transport)
        threading.Thread(target=transport.pump, daemon=True, name="stdin").start()
        await transport.done
        await asyncio.sleep(0)

    asyncio.run(session())
    if queued and cfg.delivery_mode != "queue":
        from pymailtools.qmgr import trigger as wake

        wake.kick(cfg)
    return 0


# --- sendmail -bd / -bD: the network listener -------------------------------------------------

def parse_listen(item: str) -> tuple[str, int]:
    """``ip:port`` or ``[ipv6]:port`` -> (ip, port)."""
    host, sep, port = item.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise ConfigError(f"smtpd_listen: expected ip:port or [ipv6]:port, got {item!r}") \
            from None
    if not sep or not 0 < number < 65536:
        raise ConfigError(f"smtpd_listen: bad port in {item!r}")
    return host, number


def bind(cfg: Config, warn: Callable[[str], None] | None = None) -> list[socket.socket]:
    """Listening sockets for every smtpd_listen address (before detaching: errors show).

    With the default smtpd_listen, an address this host does not have (IPv6 turned off: no
    ::1) is skipped with a ``warn``ing, as Postfix's default inet_protocols does; an address
    the administrator named must work. Exit 77 for a port we may not bind (below 1024 without
    root), 78 for the rest."""
    default = cfg.smtpd_listen == SCHEMA["smtpd_listen"][1]
    socks = []
    try:
        for item in cfg.smtpd_listen:
            host, port = parse_listen(item)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = None
            try:
                s = socket.socket(family, socket.SOCK_STREAM)
                socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((host, port))
            except OSError as e:
                msg = f"smtpd_listen: cannot listen on {item}: {e.strerror}"
                if default and e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    if s is not None:
                        socks.remove(s)
                        s.close()
                    if warn is not None:
                        warn(msg + " (skipped)")
                    continue
                if e.errno in (errno.EACCES, errno.EPERM):
                    raise PermissionDenied(msg) from None
                raise ConfigError(msg) from None
            s.listen(128)
            s.setblocking(False)
    except BaseException:
        for s in socks:
            s.close()
        raise
    if not socks:
        raise ConfigError("smtpd_listen: no address to listen on")
    return socks


def worker_count(cfg: Config) -> int:
    """smtpd_workers; 0 means two listener processes per CPU this process may run on.

    Two, not one: a process writes its queue files on its event loop's thread, and while an
    fsync waits for the disk (about half of a write's time here) that process uses no CPU; a
    second process per CPU fills those waits (bench/receive -w 2,4 on two CPUs: 4 processes
    faster than 2 in each of six paired runs, by 1-39%)."""
    if cfg.smtpd_workers:
        return cfg.smtpd_workers
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return 2 * max(1, cpus)


# --- the listener: one event loop accepting on the bound sockets -------------------------------

def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """asyncio.run, on uvloop's event loop where it is installed (its transports and timers are
    C: less CPU per connection); the standard loop otherwise."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


QUEUE_THREADS = 16  # threaded queue writes in flight per process (QueueWriter, on a slow disk)
KICK_CODE = ("import sys; from pymailtools import config; from pymailtools.qmgr import trigger; "
             "trigger.kick(config.load(sys.argv[1] or None))")


class Kicker:
    """Starts a queue run after submissions (coalesced), in a fresh process: forking this
    multi-threaded one to run Python code, as trigger.kick() does, would not be safe."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path or ""
        self.wanted = asyncio.Event()

    def request(self, qid: str = "") -> None:
        self.wanted.set()

    async def run(self) -> None:
        while True:
            await self.wanted.wait()
            self.wanted.clear()
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", KICK_CODE, self.config_path,
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL)
                await proc.wait()
            except OSError:
                await asyncio.sleep(1)


async def listen(settings: Settings, logger: Logger, socks: list[socket.socket],
                  config_path: str | None, *, clients: LocalClients | SharedClients,
                  queued: Callable[[str], None] | None,
                  background: Callable[[], list[Coroutine[Any, Any, None]]] = list,
                  parent_fd: int | None = None,
                  ready: Callable[[], None] | None = None) -> None:
    """Serve SMTP on ``socks`` until SIGTERM/SIGINT (or, in a worker, until the parent is
    gone: ``parent_fd`` reads end of file), then drain: transactions in flight finish, other
    sessions get 421. SIGHUP re-reads the configuration for new connections."""
    from concurrent.futures import ThreadPoolExecutor

    from pymailtools import config as configmod

    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(QUEUE_THREADS, thread_name_prefix="queue"))
    handler = Handler(settings, logger, queued, clients)
    # The loop accepts (in C, with uvloop) and makes the transports itself: ~12% less CPU
    # per connection than accepting in Python. Several worker processes share each socket.
    servers = [await loop.create_server(lambda: Server.fresh(handler, loop), sock=s,
                                        start_serving=False) for s in socks]
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def reload() -> None:
        try:
            new = Settings(configmod.load(config_path))
            if new.queue is not None and new.cfg.queue_directory != handler.cfg.queue_directory:
                new.queue.ensure()
            handler.settings = new
        except (MailError, OSError) as e:
            logger.error(f"reload failed, keeping the old configuration: {e}")
            return
        logger.info("configuration reloaded")

    loop.add_signal_handler(signal.SIGHUP, reload)
    if parent_fd is not None:
        def orphaned() -> None:
            loop.remove_reader(parent_fd)
            logger.warning("master process gone, stopping")
            stop.set()
        loop.add_reader(parent_fd, orphaned)
    if ready is not None:
        ready()
    for srv in servers:
        await srv.start_serving()
    tasks = [loop.create_task(c) for c in background()]
    await stop.wait()
    handler.draining = True
    for srv in servers:
        srv.close()  # stop accepting; this process's copy of the socket is closed
    for session in list(handler.sessions):
        if not session.in_transaction() and session.transport is not None:
            session.transport.write(b"421 4.3.2 Service shutting down, closing "
                                    b"transmission channel\r\n")
            session.close_transport()
    deadline = loop.time() + SHUTDOWN_GRACE
    while handler.sessions and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for session in list(handler.sessions):
        session.close_transport()
    for t in tasks:
        t.cancel()


def serve(cfg: Config, socks: list[socket.socket], *, interval: int | None,
          config_path: str | None, verbose: bool = False) -> int:
    """Run the listener on ``socks`` until SIGTERM: in-flight transactions finish, new commands
    get 421. SIGHUP re-reads the configuration for new connections. With ``interval`` the queue
    is also run that often (sendmail -bd -q15m). With smtpd_workers above 1 this process is
    the supervisor of that many listener processes (``Supervisor``)."""
    workers = worker_count(cfg)
    logger = Logger("smtpd", to_syslog=cfg.syslog, verbose=verbose)
    names = ", ".join(cfg.smtpd_listen)
    if workers > 1:
        logger.info(f"daemon started -- listening on {names} ({workers} processes)")
        from pymailtools.smtpd.workers import Supervisor

        code = Supervisor(cfg, socks, workers, interval=interval, config_path=config_path,
                          logger=logger).run()
        logger.info("daemon stopped")
        return code
    kicker = Kicker(config_path)

    def background() -> list[Coroutine[Any, Any, None]]:
        tasks = [kicker.run()]
        if interval:
            async def periodic() -> None:
                while True:
                    kicker.request()
                    await asyncio.sleep(interval)
            tasks.append(periodic())
        return tasks

    logger.info(f"daemon started -- listening on {names}")
    run_loop(listen(Settings(cfg), logger, socks, config_path, clients=LocalClients(),
                        queued=kicker.request, background=background))
    logger.info("daemon stopped")
    return 0
