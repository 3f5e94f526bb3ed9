"""Handing a composed message on: into the local queue as sendmail would, or to an SMTP server."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable, Mapping
from typing import NamedTuple

from pymailtools.config import Config
from pymailtools.errors import (
    EX_CANTCREAT,
    EX_NOHOST,
    EX_OK,
    EX_UNAVAILABLE,
    MailError,
    UsageError,
)
from pymailtools.mua import compose
from pymailtools.qmgr import trigger as wake
from pymailtools.queue.envelope import SENT
from pymailtools.submit import submission as submit

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pymailtools.mua.compose import Draft
    from pymailtools.smtp.policy import Policy


class Server(NamedTuple):
    """An SMTP server chosen on the command line, and the policy to talk to it with."""

    host: str
    port: int
    policy: Policy
    shown: str  # the server as the user wrote it, without a password: for messages
    unverified: str = ""  # tls-verify's warn/ignore: the server's identity is not checked


SMTP_SCHEMES = ("smtp", "submission", "smtps", "submissions")


def smtp_server(cfg: Config, spec: str, variables: Mapping[str, str]) -> Server:
    """``HOST[:PORT]`` or ``smtp[s]://`` / ``submission[s]://[USER[:PASSWORD]@]HOST[:PORT]``
    with s-nail's variables (see mua.account), over the configuration's smtp_* settings;
    UsageError if bad, ConfigError for a .netrc others can read.

    Port 465 and the ``smtps``/``submissions`` schemes mean TLS from the first byte;
    ``smtp-use-starttls`` makes STARTTLS mandatory; certificates are verified whenever
    credentials are sent unless ``tls-verify`` is ``warn`` or ``ignore``."""
    # only with an SMTP server: the policy brings ssl; the queue path does without
    from pymailtools.mua import account
    from pymailtools.smtp import nexthop

    text = spec.strip()
    if "://" not in text:
        if "@" in text:
            # credentials only in a URL; whatever precedes the @ may be a password: never echoed
            raise UsageError(f"bad SMTP server ***@{text.rpartition('@')[2]}: credentials go "
                             "in a URL (smtp://user:password@host) or in variables")
        text = f"smtp://{text}"
    url = account.parse_url(text, schemes=SMTP_SCHEMES)
    shown = url.shown if "://" in spec else spec.strip()
    relay = nexthop.is_relayhost(cfg.relayhost, url.host, url.port, cfg.smtp_port)
    policy = account.server_policy(cfg, variables, scheme=url.scheme, user=url.user,
                                   host=url.host, port=url.port, url_password=url.password,
                                   site_credentials=relay)
    unverified = ""
    if account.unverified(variables, policy.username, url.host, url.port):
        unverified = str(account.chain(variables, "tls-verify", policy.username, url.host,
                                       url.port)).lower()
    return Server(url.host, url.port, policy, shown, unverified)


def send_smtp(server: Server, message: bytes, sender: str, recipients: list[str]) -> str:
    """Send over SMTP; the relay that took the message for every recipient (``host[ip]:port``).

    Raises MailError: 68 when the host name does not resolve, 69 when no address gave a
    session (connection, TLS, certificate or AUTH failure) or a recipient was not accepted."""
    # only with an SMTP server: asyncio, aiosmtplib and dnspython stay off the queue path
    import asyncio
    import socket

    from pymailtools.smtp import client, nexthop
    from pymailtools.smtp.errors import HopError
    from pymailtools.smtp.mx import Hop

    try:
        found = nexthop.system_addresses(server.host, server.port)
    except socket.gaierror as e:
        raise MailError(f"{server.host}: cannot resolve host name: {e.strerror}",
                        EX_NOHOST) from None
    hops = [Hop(server.host, ip, server.port, 0) for _, ip in found]
    try:
        relay, outcomes = asyncio.run(client.send_message(hops, server.policy, sender,
                                                          recipients, message))
    except HopError as e:
        why = f"cannot {e.reason}" if e.reason.startswith("connect to ") else e.reason
        raise MailError(why, EX_UNAVAILABLE) from None
    failed = {r: o for r, o in outcomes.items() if o.state != SENT}
    if failed:
        details = sorted({o.detail for o in failed.values()})
        what = details[0] if len(details) == 1 else "; ".join(
            f"{r}: {o.detail}" for r, o in failed.items())
        if len(failed) < len(recipients):
            what = f"not sent to {', '.join(failed)}: {what}"
        raise MailError(what, EX_UNAVAILABLE)
    return relay


class Record(NamedTuple):
    """Where ``record`` keeps copies of sent mail: a local path, or with ``remote`` an
    ``imaps://``/``imap://`` folder URL (copies go there by IMAP APPEND)."""

    path: str
    maildir: bool
    remote: bool = False


def record_folder(variables: Mapping[str, str]) -> Record | None:
    """The folder of s-nail's ``record`` variable, or None: ``~`` and ``+name`` (in
    ``folder``, default the home directory) expanded; a Maildir when the name ends in ``/``,
    starts with ``maildir://`` or is an existing directory, else an mbox file."""
    name = variables.get("record", "")
    if not name:
        return None
    if name.partition("://")[0].lower() in ("imap", "imaps", "pop3", "pop3s"):
        return Record(name, False, True)
    maildir = name.startswith("maildir://")
    if maildir:
        name = name[len("maildir://"):]
    if name.startswith("+"):
        folder = variables.get("folder") or "~"
        name = os.path.join(folder, name[1:])
    path = os.path.expanduser(name)
    maildir = maildir or path.endswith("/") or os.path.isdir(path)
    return Record(path.rstrip("/") or "/", maildir)


def check_record(record: Record) -> None:
    """Refuse (73) a record folder we could not write, before anything is sent (a remote
    one: a URL that is no IMAP folder, 64)."""
    path = record.path
    if record.remote:
        from pymailtools.mua import remote

        url = remote.parse_url(path)
        if url.protocol != "imap":
            raise UsageError(f"record {url}: copies go to an IMAP folder, not to POP3")
        return
    if os.path.lexists(path):
        if record.maildir and not os.path.isdir(path):
            raise MailError(f"record {path}: not a directory (a Maildir)", EX_CANTCREAT)
        if not record.maildir and os.path.isdir(path):
            raise MailError(f"record {path}: is a directory", EX_CANTCREAT)
        target = path
    else:
        target = os.path.dirname(os.path.abspath(path))
    if not os.access(target, os.W_OK):
        why = "not writable" if os.path.exists(target) else "no such directory"
        raise MailError(f"record {path}: {target} {why}; not sent", EX_CANTCREAT)


def keep_copy(cfg: Config, record: Record, message: bytes, sender: str,
              variables: Mapping[str, str] | None = None, *,
              warn: Callable[[str], None]) -> None:
    """Append the sent ``message`` to the record folder; MailError (73) saying it was sent.
    ``variables`` give a remote folder's account, whose warnings go to ``warn``."""
    from pymailtools.errors import DeliveryError

    try:
        if record.remote:
            # only with an IMAP record: the IMAP client stays off every other path
            from pymailtools.mua import remotefolder

            remotefolder.append_copy(cfg, record.path, variables or {}, message, warn=warn)
        elif record.maildir:
            from pymailtools.local import maildir

            maildir.deliver(record.path, io.BytesIO(message), sender=sender, recipient=sender,
                            uid=os.getuid(), gid=os.getgid(), config=cfg)
        else:
            from pymailtools.local import mbox
            from pymailtools.mua import folder

            folder.append_mbox(record.path, [mbox.frame(message, sender)], cfg)
    except (MailError, OSError) as e:
        why = e.reason if isinstance(e, DeliveryError) else (
            e.strerror if isinstance(e, OSError) else str(e))
        where = record.path
        if record.remote:  # never a password written in the URL
            from pymailtools.mua import remote

            where = str(remote.parse_url(record.path))
        raise MailError(f"sent, but no copy kept in {where}: {why}", EX_CANTCREAT) from None


def hand_over(cfg: Config, message: bytes, sender: str, recipients: list[str], *,
              server: str | None, variables: Mapping[str, str], verbose: bool,
              prog: str, warn: Callable[[str], None]) -> int:
    """Queue ``message`` (then wake or run delivery) or send it to ``server``; exit status.

    The queue path is the sendmail front end's: the same submit() checks and exit codes, the
    same delivery_mode handling. Errors are raised as MailError subclasses.
    """
    record = record_folder(variables)
    if record is not None:
        check_record(record)  # as s-nail: no copy can be kept, nothing is sent
    if server is not None:
        chosen = smtp_server(cfg, server, variables)
        if chosen.unverified:
            print(f"{prog}: WARNING: tls-verify={chosen.unverified}: the identity of "
                  f"{chosen.shown} is NOT checked; whoever answers there gets this message "
                  "and any password", file=sys.stderr)
        relay = send_smtp(chosen, message, sender, recipients)
        if verbose:
            print(f"{prog}: sent to {relay} for {', '.join(recipients)}", file=sys.stderr)
        if record is not None:
            keep_copy(cfg, record, message, sender, variables, warn=warn)
        return EX_OK

    # ignore_dots: a "." line is part of a mail(1) body, never the end of it.
    opts = submit.Options(recipients, sender, None, False, True)
    qid = submit.submit(cfg, io.BytesIO(message), opts)
    if record is not None:
        keep_copy(cfg, record, message, sender, variables, warn=warn)
    if verbose:
        print(f"{prog}: queued as {qid}", file=sys.stderr)
        return wake.deliver_now(cfg, qid, verbose=True, prog=prog)
    if cfg.delivery_mode == "queue":
        return EX_OK
    if cfg.delivery_mode == "foreground":
        return wake.deliver_now(cfg, qid, verbose=False, prog=prog)
    wake.kick(cfg)
    return EX_OK


def send_draft(cfg: Config, draft: Draft, sender: str, *, server: str | None,
               variables: Mapping[str, str], verbose: bool, prog: str,
               warn: Callable[[str], None]) -> int:
    """Build ``draft`` (From from ``sender`` or the user) and hand it over; exit status."""
    login, gecos = submit.login_name(os.getuid())
    ident = compose.identity(draft.sender or sender, login, gecos, cfg.myorigin)
    recipients = compose.envelope_recipients(draft, cfg.myorigin)
    if not recipients:
        raise UsageError("no recipients specified")
    message = compose.build(draft, ident, origin=cfg.myorigin, hostname=cfg.myhostname)
    return hand_over(cfg, message, ident.envelope, recipients, server=server,
                     variables=variables, verbose=verbose, prog=prog, warn=warn)
