"""Handing a composed message on: into the local queue as sendmail would, or to an SMTP server."""

from __future__ import annotations

import io
import sys

from pymailtools.config import Config
from pymailtools.errors import EX_OK

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pymailtools.mua.compose import Draft


def hand_over(cfg: Config, message: bytes, sender: str, recipients: list[str], *,
              server: str | None, verbose: bool, prog: str) -> int:
    """Queue ``message`` (then wake or run delivery) or send it to ``server``; exit status.

    The queue path is the sendmail front end's: the same submit() checks and exit codes, the
    same delivery_mode handling. Errors are raised as MailError subclasses.
    """
    if server is not None:
        from pymailtools.smtp import submit as smtp_submit

        host, port = smtp_submit.parse_server(server)
        smtp_submit.send(host, port, sender, recipients, message, helo=cfg.myhostname)
        if verbose:
            print(f"{prog}: sent to {host}[{port}] for {', '.join(recipients)}", file=sys.stderr)
        return EX_OK
    from pymailtools.qmgr import trigger as wake
    from pymailtools.submit import submission as submit

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


def send_draft(cfg: Config, draft: Draft, sender: str, *, server: str | None, verbose: bool,
               prog: str) -> int:
    """Build ``draft`` (From from ``sender`` or the user) and hand it over; exit status."""
    import os

    from pymailtools.errors import UsageError
    from pymailtools.mua import compose
    from pymailtools.submit import submission as submit

    login, gecos = submit.login_name(os.getuid())
    ident = compose.identity(draft.sender or sender, login, gecos, cfg.myorigin)
    recipients = compose.envelope_recipients(draft, cfg.myorigin)
    if not recipients:
        raise UsageError("no recipients specified")
    message = compose.build(draft, ident, origin=cfg.myorigin, hostname=cfg.myhostname)
    return hand_over(cfg, message, ident.envelope, recipients, server=server, verbose=verbose,
                     prog=prog)
