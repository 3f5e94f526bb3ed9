"""sendmail -bv and -bi: where each recipient would go; alias file checks. Delivers nothing."""

import logging
import sys
from typing import TextIO

from pymailtools import address
from pymailtools.config import Config
from pymailtools.errors import EX_CONFIG, EX_NOHOST, EX_NOUSER, EX_OK, EX_TEMPFAIL, DeliveryError
from pymailtools.local import aliases, route
from pymailtools.qmgr import transport


def library_warnings_to_stderr(prog: str) -> None:
    """Routing modules warn through Python logging; show those as `prog: warning: ...`."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"{prog}: warning: %(message)s"))
    lib = logging.getLogger("pymailtools")
    lib.handlers[:] = [handler]
    lib.propagate = False


def verify(cfg: Config, args: list[str], out: TextIO, prog: str = "sendmail") -> int:
    """Print one line per recipient; exit 67 if a local user is unknown, 68 for a bad host,
    75 when an answer could not be had for now (a temporary error: not undeliverable).
    What an ordinary user cannot check (another user's .forward) is said, not failed."""
    library_warnings_to_stderr(prog)
    code = EX_OK
    router = transport.Router(cfg)
    for arg in args:
        for given in address.parse_recipients(arg, cfg.myorigin):
            try:
                rcpts = _rewritten(cfg, given, out)
            except DeliveryError as e:
                rcpts = []
                code = code or _report(given, e, out)
            for rcpt in rcpts:
                try:
                    print(_where(cfg, router, rcpt), file=out)
                except DeliveryError as e:
                    code = code or _report(rcpt, e, out)
    return code


def _where(cfg: Config, router: transport.Router, rcpt: str) -> str:
    """Where the runner would send ``rcpt``: local expansion, or the transport and next hop
    (named, not connected to: -bv sends nothing). DeliveryError for error: and retry: routes."""
    found = router.route(rcpt, "")
    if found.transport == transport.LOCAL:
        return route.explain(cfg, rcpt, local=True)
    if found.transport in (transport.ERROR, transport.RETRY):
        status, text = found.status()
        raise DeliveryError(text, status)
    if found.transport == transport.DISCARD:
        return f"{rcpt}: discarded{f' ({found.text})' if found.text else ''}"
    if found.hop is not None:
        return f"{rcpt}: remote: via {found.hop}"
    return f"{rcpt}: remote: via the MX hosts of {rcpt.rpartition('@')[2].lower()}"


def _rewritten(cfg: Config, rcpt: str, out: TextIO) -> list[str]:
    """The addresses queue entry makes of ``rcpt`` (canonical maps, masquerading, virtual
    aliases), each step printed as ``rcpt: map: old -> new``."""
    if not cfg.rewrites:
        return [rcpt]
    from pymailtools import rewrite  # tables and maps only when rewriting is configured

    rw = rewrite.for_config(cfg)
    steps: list[str] = []
    try:
        return rw.virtual_alias(rw.recipient(rcpt, steps=steps), steps)
    finally:
        for step in steps:
            print(f"{rcpt}: {step}", file=out)


def _report(rcpt: str, e: DeliveryError, out: TextIO) -> int:
    """Print why ``rcpt`` cannot be verified or delivered; the exit code that means."""
    if not e.permanent:
        print(f"{rcpt}: not verified: {e.reason} ({e.status})", file=out)
        return EX_TEMPFAIL
    print(f"{rcpt}: undeliverable: {e.reason} ({e.status})", file=out)
    if e.status.startswith("5.1.2") or e.status.startswith("5.4.4"):
        return EX_NOHOST
    return EX_NOUSER


def check_aliases(paths: list[str], prog: str) -> int:
    """newaliases / -bi / postalias: parse each alias file and report problems (no database to
    build: local delivery reads the files themselves)."""
    library_warnings_to_stderr(prog)
    status = EX_OK
    for path in paths:
        try:
            aliases.load(path)  # it logs each bad line as a warning
        except DeliveryError as e:
            print(f"{prog}: {path}: {e.reason}", file=sys.stderr)
            status = EX_CONFIG
    return status
