"""sendmail: Postfix-compatible command line for submitting mail and running the queue.

Hot path (cron, PHP, scripts): no click, no re, no email package; heavier modules are
imported inside the modes that need them.
"""

import os
import sys

from pymailtools import address
from pymailtools import config as configmod
from pymailtools.cli.common import authorize, complete_site, getopt, run_launched, run_main
from pymailtools.errors import (
    EX_IOERR,
    EX_OK,
    EX_UNAVAILABLE,
    MailError,
    PermissionDenied,
    UsageError,
)
from pymailtools.queue import ids as queueid
from pymailtools.queue.intake import QueueDir
from pymailtools.submit import submission as submit

PROG = "sendmail"
# Postfix's getopt string; -q's argument is only ever attached (a bare -q has none).
OPTSTRING = "A:B:C:F:GIL:N:O:R:UV:X:b:ce:f:h:imno:p:r:q::tvx"
_MODES = {"m": "deliver", "p": "list", "v": "verify", "s": "smtp", "d": "daemon", "l": "daemon",
          "D": "daemon", "i": "aliases", "h": "hoststatus", "H": "hoststatus"}
_DSN_NOTIFY = ("success", "failure", "delay")


def warn(msg: str) -> None:
    print(f"{PROG}: warning: {msg}", file=sys.stderr)


class Request:
    """The parsed command line."""

    def __init__(self) -> None:
        self.mode = "deliver"
        self.config_path: str | None = None
        self.sender: str | None = None
        self.fullname: str | None = None
        self.extract = False
        self.ignore_dots = False
        self.verbose = 0
        self.delivery_mode: str | None = None
        self.queue_run: str | None = None  # "" = -q; "I<id>", "R<site>", or an interval
        self.daemon_flag = ""  # the letter of -bd / -bD / -bl
        self.notify = ""
        self.ret = ""
        self.envid = ""
        self.recipients: list[str] = []
        self.prog = PROG  # the name messages carry: mailq and newaliases keep their own


def parse(argv: list[str]) -> Request:
    req = Request()
    name = os.path.basename(argv[0]) if argv else PROG
    if name == "mailq":
        req.mode = "list"
        req.prog = name
    elif name == "newaliases":
        req.mode = "aliases"
        req.prog = name
    opts, first = getopt(argv[1:], OPTSTRING)
    rest = argv[1 + first:]
    for opt, value in opts:
        val = value or ""
        if opt == "b":
            if val not in _MODES:
                raise UsageError(f"unsupported: -b{val}")
            req.mode = _MODES[val]
            req.daemon_flag = val if req.mode == "daemon" else ""
        elif opt == "I":
            req.mode = "aliases"
        elif opt in ("f", "r"):
            req.sender = val
        elif opt == "F":
            req.fullname = val
        elif opt == "t":
            req.extract = True
        elif opt == "i":
            req.ignore_dots = True
        elif opt == "v":
            req.verbose += 1
        elif opt == "C":
            req.config_path = val
        elif opt == "q":
            req.queue_run = val
        elif opt == "o":
            _option_o(req, val)
        elif opt == "B":
            if val.upper() not in ("7BIT", "8BITMIME"):
                raise UsageError("-B option needs 8BITMIME or 7BIT")
        elif opt == "N":
            req.notify = _dsn_notify(val)
        elif opt == "R":
            if val.lower() in ("hdrs", "full"):
                req.ret = val.lower()
            else:
                warn("bad -R option value -- ignored")
        elif opt == "V":
            if len(val) > 100:
                warn("too long -V option value -- ignored")
            elif not val.isprintable() or not val.isascii() or " " in val:
                warn("bad syntax in -V option value -- ignored")
            else:
                req.envid = val
        # A, G, L, O, U, X, c, e, h, m, n, p, x: accepted and ignored, as Postfix documents.
    req.recipients = rest
    return req


def _option_o(req: Request, val: str) -> None:
    if val == "i":
        req.ignore_dots = True
    elif val.startswith("d") and val[1:] in ("i", "b", "q", "d"):
        req.delivery_mode = {"i": "foreground", "b": "background", "q": "queue",
                             "d": "queue"}[val[1:]]
    elif val.startswith("A") and not val[1:]:
        raise UsageError("-oA requires pathname")
    # Every other -oX (-oem, -oep, -o7, -o8, -om, -oQ...) is ignored, as in Postfix.


def _dsn_notify(val: str) -> str:
    words = [w.strip().lower() for w in val.split(",")]
    if words == ["never"]:
        return "never"
    bad = [w for w in words if w not in _DSN_NOTIFY]
    if bad:
        warn(f'unknown DSN NOTIFY command value "{bad[0]}" in "{val}"')
        warn("bad -N option value -- ignored")
        return ""
    return ",".join(words)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv if argv is None else argv
    name = os.path.basename(args[0]) if args else PROG
    if name in ("mailq", "newaliases"):
        return run_main(name, lambda: run(parse(args)))
    return run_main(PROG, lambda: run(parse(args)),
                    interrupted=(EX_IOERR, "interrupted, nothing queued"))


def script() -> None:
    """The installed launcher's entry point: main() without the interpreter's tear-down."""
    run_launched(main)


def run(req: Request) -> int:
    mode = req.mode
    if mode == "hoststatus":
        return EX_OK
    if req.queue_run is not None and mode == "deliver":
        mode = "queue"
    if mode != "deliver" and req.recipients:
        what = {"list": "display queue", "queue": "flush queue", "aliases": "alias database",
                "smtp": "stand-alone", "daemon": "daemon"}.get(mode)
        if what:
            raise UsageError(f"{what} mode requires no recipient")
    if req.extract and mode == "verify":
        raise UsageError("-t option cannot be used with -bv")
    if req.extract and mode not in ("deliver", "verify"):
        raise UsageError("-t can be used only in delivery mode")
    cfg = configmod.load(req.config_path)
    configmod.warn(cfg, req.prog)
    if mode == "deliver":
        return _deliver(cfg, req)
    complete_site()
    if mode == "queue":
        return _queue_run(cfg, req)
    if mode == "list":
        # not on the submission path: only -bp lists the queue
        from pymailtools.cli.show import show

        return show(cfg, req.prog)
    if mode == "verify":
        # not on the submission path: only -bv routes without delivering
        from pymailtools.qmgr.verify import verify

        return verify(cfg, req.recipients, sys.stdout)
    if mode == "aliases":
        # not on the submission path: only -bi reads the alias files
        from pymailtools.qmgr.verify import check_aliases

        return check_aliases(cfg.alias_maps, req.prog)
    if mode == "daemon":
        return _daemon(cfg, req)
    if mode == "smtp":
        # not on the submission path: only -bs loads the SMTP server (asyncio, aiosmtpd)
        from pymailtools.smtpd.stdio import serve_stdio

        return serve_stdio(cfg, verbose=req.verbose > 1)
    raise MailError(f"unsupported mode: {mode}", EX_UNAVAILABLE)


def _deliver(cfg: configmod.Config, req: Request) -> int:
    recipients: list[str] = []
    for arg in req.recipients:
        recipients.extend(address.parse_recipients(arg, cfg.myorigin))
    if req.recipients and not recipients and not req.extract:
        raise UsageError("no valid recipient addresses on the command line")
    sender = None if req.sender is None else address.parse_sender(req.sender, cfg.myorigin)
    opts = submit.Options(recipients, sender, req.fullname, req.extract, req.ignore_dots,
                          req.envid, req.ret, req.notify)
    qid = submit.submit(cfg, sys.stdin.buffer, opts)
    mode = req.delivery_mode or cfg.delivery_mode
    if req.verbose:
        mode = "foreground"
    if mode == "queue":
        return EX_OK
    # queue mode (the hot path) returned above: only the other modes wake a runner
    from pymailtools.qmgr import trigger as wake

    if mode == "foreground":
        complete_site()
        return wake.deliver_now(cfg, qid, verbose=bool(req.verbose), prog=PROG)
    # A fresh runner process rather than a fork of this one: the caller waits less.
    wake.kick(cfg, os.path.abspath(req.config_path) if req.config_path else None, spawn=True)
    return EX_OK


def _interval(arg: str | None) -> int | None:
    """Seconds of a -qINTERVAL (``15m``, ``1h``, ``30``), None for -q, -qI, -qR, -qS."""
    if not arg or arg[0] in "IRS":
        return None
    try:
        return configmod.parse_duration(arg, "-q")
    except MailError:
        raise UsageError(f"bad -q interval: {arg}") from None


def _daemon(cfg: configmod.Config, req: Request) -> int:
    """-bd / -bD: the SMTP listener on smtpd_listen, plus a queue run every INTERVAL with
    -qINTERVAL. -bd detaches (after the sockets are bound, so a busy port is reported here);
    -bD stays in the foreground for systemd."""
    interval = _interval(req.queue_run)

    if not QueueDir(cfg.queue_directory).prepare(cfg.public_listing):
        raise PermissionDenied(f"cannot use the queue in {cfg.queue_directory}: "
                               "permission denied (run it as root)")
    # not on the submission path: only -bd/-bD load the listener (asyncio, aiosmtpd)
    from pymailtools.smtpd.daemon import serve
    from pymailtools.smtpd.listener import bind
    from pymailtools.smtpd.policy import Settings

    Settings(cfg)  # certificate, password file, mynetworks: refuse to start if broken
    socks = bind(cfg, warn)
    if req.daemon_flag == "D":
        return serve(cfg, socks, interval=interval, config_path=req.config_path,
                           verbose=bool(req.verbose))
    # -bd: detach like sendmail does, so an init script's call returns (imported here:
    # qmgr.trigger stays off the queue-mode submission path).
    from pymailtools.qmgr.trigger import detach

    config_path = os.path.abspath(req.config_path) if req.config_path else None
    if not detach():
        return EX_OK
    code = 1
    try:
        # A daemon keeps no directory busy and no descriptor its starter gave it but the
        # listening sockets (a pipe left open would keep a `sendmail -bd | cat` waiting).
        os.chdir("/")
        keep = sorted(s.fileno() for s in socks)
        for low, high in zip([2, *keep], [*keep, os.sysconf("SC_OPEN_MAX")], strict=True):
            os.closerange(low + 1, high)
        code = serve(cfg, socks, interval=interval, config_path=config_path)
    finally:
        os._exit(code)


def _queue_run(cfg: configmod.Config, req: Request) -> int:
    arg = req.queue_run or ""
    ids: list[str] | None = None
    site: str | None = None
    if arg.startswith("I"):
        if not arg[1:]:
            raise UsageError("specify: -qIqueueid")
        ids = [queueid.check(arg[1:])]
    elif arg.startswith("R"):
        site = arg[1:].lower()
        if not site or not all(c.isascii() and (c.isalnum() or c in ".-[]:") for c in site):
            raise UsageError(f'invalid destination: "{arg[1:]}"')
    elif arg.startswith("S"):
        raise UsageError("-qS is not implemented")
    elif arg:
        try:
            configmod.parse_duration(arg, "-q")
        except MailError:
            raise UsageError(f"bad -q interval: {arg}") from None
        return EX_OK  # -qINTERVAL without -bd: Postfix ignores it

    authorize(cfg, "flush")
    if not QueueDir(cfg.queue_directory).prepare(cfg.public_listing):
        raise PermissionDenied(f"cannot run the queue in {cfg.queue_directory}: "
                               "permission denied (run it as root)")
    # not on the submission path (cron): only -q needs the runner
    from pymailtools.qmgr.runner import Runner

    runner = Runner(cfg, prog=PROG, verbose=bool(req.verbose))
    # -q runs what is due; -qI and -qR force their entries, as postqueue -i / -s do.
    force = ids is not None or bool(site)
    if sys.stderr.isatty() and not req.verbose:
        # A long flush on a terminal gets a progress bar; piped, -q stays silent (or prints
        # log lines with -v), as scripts expect.
        # rich, only for a flush on a terminal
        from pymailtools.cli.progress import Bar

        with Bar("sendmail -q") as bar:
            runner.progress = bar
            runner.run(ids=ids, site=site, force=force, housekeeping=True)
    else:
        runner.run(ids=ids, site=site, force=force, housekeeping=True)
    return EX_OK
