"""Handing a composed message on: into the local queue as sendmail would, or to an SMTP server."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Mapping
from typing import NamedTuple

from pymailtools.config import Config
from pymailtools.errors import (
    EX_NOHOST,
    EX_OK,
    EX_UNAVAILABLE,
    HopError,
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

# URL schemes of s-nail's mta variable: default port, and whether TLS starts on connect.
SCHEMES = {"smtp": (25, False), "submission": (587, False), "smtps": (465, True),
           "submissions": (465, True)}
VERIFY = {"strict": True, "ask": True, "warn": False, "ignore": False}  # s-nail's tls-verify


class Server(NamedTuple):
    """An SMTP server chosen on the command line, and the policy to talk to it with."""

    host: str
    port: int
    policy: Policy
    shown: str  # the server as the user wrote it, without a password: for messages


def smtp_server(cfg: Config, spec: str, variables: Mapping[str, str]) -> Server:
    """``HOST[:PORT]`` or ``smtp[s]://`` / ``submission[s]://[USER[:PASSWORD]@]HOST[:PORT]``
    with s-nail's variables, over the configuration's smtp_* settings; UsageError if bad.

    Port 465 and the ``smtps``/``submissions`` schemes mean TLS from the first byte;
    ``smtp-use-starttls`` makes STARTTLS mandatory; ``tls-verify`` (``ssl-verify``)
    ``strict`` or ``ask`` makes a verified certificate mandatory, ``warn`` or ``ignore``
    turns verification off; ``tls-ca-file`` (``ssl-ca-file``) names the CAs;
    ``smtp-auth-user`` and ``smtp-auth-password`` are the AUTH credentials."""
    # only with an SMTP server: the policy brings ssl; the queue path does without
    from urllib.parse import unquote

    from pymailtools.smtp import nexthop
    from pymailtools.smtp.policy import Policy

    rest, user, password = spec.strip(), "", ""
    default_port, implicit = SCHEMES["smtp"]
    shown = rest
    if "://" in rest:
        scheme, _, rest = rest.partition("://")
        if scheme.lower() not in SCHEMES:
            raise UsageError(f"unsupported mail transfer URL (smtp://, smtps://, submission://,"
                             f" submissions://): {scheme}://...")
        default_port, implicit = SCHEMES[scheme.lower()]
        rest = rest.rstrip("/")
        userinfo, at, rest = rest.rpartition("@")
        if at:
            name, colon, secret = userinfo.partition(":")
            user, password = unquote(name), unquote(secret)
            shown = f"{scheme}://{userinfo.partition(':')[0]}{':***' if colon else ''}@{rest}"
    elif "@" in rest:
        # credentials only in a URL; whatever precedes the @ may be a password: never echoed
        raise UsageError(f"bad SMTP server ***@{rest.rpartition('@')[2]}: credentials go in a "
                         "URL (smtp://user:password@host) or in smtp-auth-user/-password")
    try:
        hp = nexthop.split(rest, default_port)
        host = nexthop.check_host(hp.host)
    except ValueError as e:
        raise UsageError(f"bad SMTP server {shown}: {e}") from None
    policy = Policy.from_config(cfg)
    changes: dict[str, object] = {}
    if not nexthop.is_relayhost(cfg.relayhost, host, hp.port, cfg.smtp_port):
        # The site's relay credentials are for the relayhost only: never offered to a server
        # the user names (as Postfix keys them by next hop).
        changes.update(username="", password="", password_file="")
    if implicit or hp.port == nexthop.IMPLICIT_TLS_PORT:
        changes["implicit_tls"] = True
    if "smtp-use-starttls" in variables and policy.level in ("none", "may"):
        changes["level"] = "encrypt"
    verify = variables.get("tls-verify", variables.get("ssl-verify"))
    if verify is not None:
        if verify.lower() not in VERIFY:
            raise UsageError(f"tls-verify: expected strict, ask, warn or ignore, got {verify!r}")
        if VERIFY[verify.lower()]:
            changes["level"] = "verify"
        elif changes.get("level", policy.level) == "verify":
            changes["level"] = "encrypt"
    ca_file = variables.get("tls-ca-file", variables.get("ssl-ca-file"))
    if ca_file:
        changes["ca_file"] = ca_file
    user = variables.get("smtp-auth-user", user)
    password = variables.get("smtp-auth-password", password)
    if user:
        if not password:
            raise UsageError("smtp-auth-user is set, but no password: set smtp-auth-password")
        changes.update(username=user, password=password, password_file="")
    if verify is None and (user or ca_file):
        # As s-nail (tls-verify defaults to strict): a password, or CAs named for checking,
        # go only to a server whose certificate verifies, unless tls-verify says otherwise.
        changes["level"] = "verify"
    return Server(host, hp.port, policy.clone(**changes), shown)


def send_smtp(server: Server, message: bytes, sender: str, recipients: list[str]) -> str:
    """Send over SMTP; the relay that took the message for every recipient (``host[ip]:port``).

    Raises MailError: 68 when the host name does not resolve, 69 when no address gave a
    session (connection, TLS, certificate or AUTH failure) or a recipient was not accepted."""
    # only with an SMTP server: asyncio, aiosmtplib and dnspython stay off the queue path
    import asyncio
    import socket

    from pymailtools.smtp import client, nexthop
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


def hand_over(cfg: Config, message: bytes, sender: str, recipients: list[str], *,
              server: str | None, variables: Mapping[str, str], verbose: bool,
              prog: str) -> int:
    """Queue ``message`` (then wake or run delivery) or send it to ``server``; exit status.

    The queue path is the sendmail front end's: the same submit() checks and exit codes, the
    same delivery_mode handling. Errors are raised as MailError subclasses.
    """
    if server is not None:
        relay = send_smtp(smtp_server(cfg, server, variables), message, sender, recipients)
        if verbose:
            print(f"{prog}: sent to {relay} for {', '.join(recipients)}", file=sys.stderr)
        return EX_OK

    # ignore_dots: a "." line is part of a mail(1) body, never the end of it.
    opts = submit.Options(recipients, sender, None, False, True)
    qid = submit.submit(cfg, io.BytesIO(message), opts)
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
               variables: Mapping[str, str], verbose: bool, prog: str) -> int:
    """Build ``draft`` (From from ``sender`` or the user) and hand it over; exit status."""
    login, gecos = submit.login_name(os.getuid())
    ident = compose.identity(draft.sender or sender, login, gecos, cfg.myorigin)
    recipients = compose.envelope_recipients(draft, cfg.myorigin)
    if not recipients:
        raise UsageError("no recipients specified")
    message = compose.build(draft, ident, origin=cfg.myorigin, hostname=cfg.myhostname)
    return hand_over(cfg, message, ident.envelope, recipients, server=server,
                     variables=variables, verbose=verbose, prog=prog)
