"""mail / mailx: send a message like bsd-mailx and s-nail, or read a mailbox."""

from __future__ import annotations

import os
import sys

from pymailtools import config as configmod
from pymailtools.cli.common import complete_site, run_launched, run_main
from pymailtools.config import Config
from pymailtools.errors import EX_OK, EX_USAGE, MailError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pymailtools.mua.compose import Draft

PROG = "mail"
VERSION = "pymailtools mail 0.1.0"
# Options that take an argument; -f, -t and -E are handled apart (their argument is optional).
_WITH_ARG = frozenset("sScbaruqA:")
_FLAGS = frozenset("vnNHeiIdFE~#")
# mailx commands a GNU mailutils "-E command" may start with (fail2ban passes -E 'set escape').
_MAILX_COMMANDS = frozenset({"set", "unset", "se", "uns", "source", "so", "alias", "a",
                             "ignore", "retain", "unalias", "echo", "folder", "file"})

USAGE = """\
usage: mail [-dEiInNv] [-s subject] [-c cc-addr] [-b bcc-addr] [-a file|'Header: value']
            [-r from-addr] [-S var[=value]] [-A account] [-: spec] [-t host[:port]]
            [--read-recipients] to-addr ...
       mail [-dEHiInNv] [-A account] [-: spec] [-e] [-f [file] | -u user]
       mail [-v] [-S var[=value]] [-A account] --fetch pop3s://user@host|imaps://user@host/FOLDER
            [--keep]"""


class Request:
    """The parsed command line."""

    def __init__(self) -> None:
        self.subject: str | None = None
        self.cc: list[str] = []
        self.bcc: list[str] = []
        self.attach: list[str] = []
        self.sender: str | None = None
        self.skip_empty = False
        self.verbose = False
        self.variables: dict[str, str] = {}
        self.unset: set[str] = set()  # -S noname: unset whatever the resource files say
        self.account: str | None = None
        self.system_rc = True  # -n, -: without s: no /etc/mail.rc
        self.user_rc = True  # -: without u: no ~/.mailrc
        self.server: str | None = None
        self.read_recipients = False
        self.headers_only = False
        self.check_only = False
        self.folder: str | None = None  # -f given: "" until the operand is known
        self.user: str | None = None
        self.no_header = False
        self.operands: list[str] = []
        self.help = False
        self.version = False
        self.fetch: str | None = None  # --fetch URL: copy new remote mail into the mailbox
        self.keep = False  # --keep: leave fetched mail on the server


def warn(msg: str) -> None:
    print(f"{PROG}: warning: {msg}", file=sys.stderr)


def _looks_like_command(arg: str) -> bool:
    """A GNU mailutils -E argument (``set escape``) rather than a recipient."""
    words = arg.split()
    if not words or arg.startswith("-"):
        return False
    return words[0] in _MAILX_COMMANDS or ("@" not in arg and len(words) > 1)


def _apply_command(req: Request, command: str) -> None:
    words = command.split()
    if words and words[0] in ("set", "se"):
        for w in words[1:]:
            name, _, value = w.partition("=")
            req.variables[name] = value
    elif words and words[0] in ("unset", "uns"):
        for w in words[1:]:
            req.variables.pop(w, None)
    else:
        warn(f"ignoring mail command given with -E: {command!r}")


def parse(args: list[str]) -> Request:
    """GNU-style parsing like bsd-mailx: options may follow recipients; ``--`` ends them."""
    req = Request()
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            req.operands.extend(args[i:])
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if name == "read-recipients" and not eq:
                req.read_recipients = True
            elif name == "help" and not eq:
                req.help = True
            elif name == "version" and not eq:
                req.version = True
            elif name == "keep" and not eq:
                req.keep = True
            elif name in ("fetch", "subject"):
                if not eq:
                    if i >= len(args):
                        raise UsageError(f"option '--{name}' requires an argument")
                    value, i = args[i], i + 1
                if name == "fetch":
                    req.fetch = value
                else:
                    req.subject = value
            else:
                raise UsageError(f"unrecognized option '{arg}'")
            continue
        if not arg.startswith("-") or arg == "-":
            req.operands.append(arg)
            continue
        j = 1
        while j < len(arg):
            c = arg[j]
            j += 1
            attached = arg[j:]
            if c in _WITH_ARG:
                if attached:
                    value = attached
                elif i < len(args):
                    value, i = args[i], i + 1
                else:
                    raise UsageError(f"option requires an argument -- '{c}'")
                _option(req, c, value)
                break
            if c == "f":
                req.folder = attached  # the file, when not attached, is the first operand
                break
            if c == "t":
                if attached:
                    req.server = attached
                elif i < len(args) and not args[i].startswith("-") and "@" not in args[i]:
                    req.server, i = args[i], i + 1
                else:
                    req.read_recipients = True  # mailx's -t: recipients from the headers
                break
            if c == "E":
                if not attached and i < len(args) and _looks_like_command(args[i]):
                    _apply_command(req, args[i])  # GNU mailutils' -E: execute a command
                    i += 1
                else:
                    req.skip_empty = True
                continue
            if c == "h":
                req.help = True
            elif c == "V":
                req.version = True
            elif c in _FLAGS:
                _flag(req, c)
            else:
                raise UsageError(f"invalid option -- '{c}'")
    return req


def _option(req: Request, c: str, value: str) -> None:
    if c == "s":
        req.subject = value
    elif c == "c":
        req.cc.append(value)
    elif c == "b":
        req.bcc.append(value)
    elif c == "a":
        req.attach.append(value)
    elif c == "r":
        req.sender = value
    elif c == "S":
        name, eq, val = value.partition("=")
        if not eq and name.startswith("no") and len(name) > 2:
            req.variables.pop(name[2:], None)  # s-nail: -S nosave unsets save
            req.unset.add(name[2:])
        elif name:
            req.variables[name] = val
            req.unset.discard(name)
    elif c == "A":
        req.account = value
    elif c == ":":
        spec = value.lower()
        if spec.strip("su-/"):
            raise UsageError(f"-: expects s (system file), u (~/.mailrc), - or /, got {value!r}")
        req.system_rc, req.user_rc = "s" in spec, "u" in spec
    elif c == "u":
        req.user = value
    elif c == "q":
        raise UsageError("-q (quote a file) is not supported; use ~r in interactive mode")


def _flag(req: Request, c: str) -> None:
    if c == "v":
        req.verbose = True
    elif c == "H":
        req.headers_only = True
    elif c == "e":
        req.check_only = True
    elif c == "N":
        req.no_header = True
    elif c == "n":
        req.system_rc = False
    # -i, -I, -d, -F, -~, -#: accepted, no effect.


def main(argv: list[str] | None = None) -> int:
    args = sys.argv if argv is None else argv
    return run_main(PROG, lambda: _main(args[1:]), interrupted=(130, "\ninterrupted"))


def script() -> None:
    """The installed launcher's entry point: main() without the interpreter's tear-down."""
    run_launched(main)


def _main(args: list[str]) -> int:
    try:
        req = parse(args)
        if req.help:
            print(USAGE)
            return EX_OK
        if req.version:
            print(VERSION)
            return EX_OK
        return run(req)
    except UsageError as e:
        if e.exit_code == EX_USAGE and not isinstance(e, _Quiet) and "option" in str(e):
            print(f"{PROG}: {e}", file=sys.stderr)
            print(USAGE, file=sys.stderr)  # mailx shows its usage after an option error
            return e.exit_code
        raise


class _Quiet(UsageError):
    """A usage error that needs no usage text after it."""


def load_resources(req: Request) -> None:
    """Put the resource files' variables (and -A's account) under the -S settings."""
    from pymailtools.mua import mailrc

    for name in ("mta", "smtp"):
        userinfo = req.variables.get(name, "").partition("://")[2].rpartition("@")[0]
        if ":" in userinfo:
            warn(f"the password in -S {name}=… is visible to other users in the process list;"
                 " set password-USER@HOST in ~/.mailrc, netrc-lookup or "
                 "smtp-auth-password-command instead")
    req.variables = mailrc.load(req.variables, system=req.system_rc, account=req.account,
                                user_file=None if req.user_rc else "",
                                unset=frozenset(req.unset), warn=warn)


def run(req: Request) -> int:
    sending = bool(req.operands) and req.folder is None and req.user is None
    if sending or req.fetch is not None or req.keep or req.read_recipients or sys.stdout.isatty() \
            or any("://" in f for f in (req.folder or "", *req.operands)):
        # Reading a local mailbox from a script needs nothing beyond this package; anything
        # else (sending, remote folders, rich on a terminal) may need the whole installation.
        complete_site()
    load_resources(req)
    if req.fetch is not None or req.keep:
        return fetch(req)
    if req.read_recipients or sending:
        if req.headers_only or req.check_only or req.folder is not None or req.user:
            raise _Quiet("-f, -u, -H and -e read mail: they take no recipients")
        cfg = configmod.load()
        configmod.warn(cfg, PROG)
        return send(cfg, req)
    if req.subject is not None or req.cc or req.bcc or req.sender is not None or req.attach:
        raise _Quiet("You must specify direct recipients with -s, -c, -b, -a or -r.")
    if len(req.operands) > 1 or (req.operands and req.folder is None):
        raise _Quiet("too many arguments for read mode")
    cfg = configmod.load()
    configmod.warn(cfg, PROG)
    # read mode only: sending pays for neither the reader nor its folder code
    from pymailtools.mua import reader as mailread

    folder = req.folder
    if folder == "" and req.operands:
        folder = req.operands[0]
    if folder and "://" in folder:
        # a remote folder: only then the IMAP and POP3 clients
        from pymailtools.mua import remotefolder
        from pymailtools.submit import submission

        return remotefolder.start(cfg, folder, headers_only=req.headers_only,
                                  check_only=req.check_only, show_headers=not req.no_header,
                                  variables=req.variables,
                                  login=submission.login_name(os.getuid())[0], prog=PROG,
                                  warn=warn)
    return mailread.start(cfg, folder=folder, user=req.user, headers_only=req.headers_only,
                          check_only=req.check_only, show_headers=not req.no_header,
                          variables=req.variables, prog=PROG, warn=warn,
                          before_send=complete_site)


def fetch(req: Request) -> int:
    """mail --fetch URL [--keep]: new remote mail into the local mailbox, quiet on success."""
    if req.fetch is None:
        raise _Quiet("--keep goes with --fetch URL")
    if (req.operands or req.folder is not None or req.user or req.headers_only
            or req.check_only or req.read_recipients or req.subject is not None):
        raise _Quiet("--fetch takes a URL and no other mode or recipients")
    cfg = configmod.load()
    configmod.warn(cfg, PROG)
    # fetch mode only: sending pays for neither the IMAP nor the POP3 client
    from pymailtools.mua import fetch as fetchmod
    from pymailtools.submit import submission

    login, _gecos = submission.login_name(os.getuid())
    outcome = fetchmod.run_for_user(cfg, req.fetch, req.variables, user=login, keep=req.keep,
                                    warn=warn)
    if req.verbose:
        print(f"{PROG}: {outcome.fetched} new message(s) fetched, {outcome.deleted} deleted "
              f"on the server", file=sys.stderr)
    return EX_OK


def server_of(req: Request) -> str | None:
    """The SMTP server chosen with -t HOST, -S smtp=HOST or -S mta=smtp://HOST."""
    if req.server:
        return req.server
    if req.variables.get("smtp"):
        return req.variables["smtp"]
    mta = req.variables.get("mta", "")
    if mta.startswith(("smtp://", "smtps://", "submission://", "submissions://")):
        return mta
    if mta and not mta.startswith(("/", "file://")):  # a program: our own queue takes it
        raise _Quiet(f"unsupported mta: {mta.partition('://')[0]}"
                     f"{'://…' if '://' in mta else ''} (smtp://, smtps://, submission://, "
                     "submissions:// or a program's path)")
    return None


def send(cfg: Config, req: Request) -> int:
    # sending only: read mode pays for neither the composer nor the submission code
    from pymailtools.mua import compose, outbox
    from pymailtools.submit import submission as submit

    draft = compose.Draft(to=list(req.operands), cc=list(req.cc), bcc=list(req.bcc),
                          subject=req.subject or "")
    if req.subject is not None:
        compose.check_header_text(req.subject, "subject")
    for value in (*draft.to, *draft.cc, *draft.bcc):
        compose.check_header_text(value, "recipient")
    sender = req.sender if req.sender is not None else req.variables.get("from", "")
    if sender:
        compose.check_header_text(sender, "sender")
    for arg in req.attach:
        if not os.path.lexists(arg) and compose.is_header_argument(arg):
            draft.add_header(arg)  # bsd-mailx / mailutils: -a 'Content-Type: text/html'
        else:
            draft.attachments.append(compose.Attachment.from_path(arg))
    if draft.sender:
        sender = draft.sender
    server = server_of(req)
    if server is not None:
        outbox.smtp_server(cfg, server, req.variables)  # bad settings fail before any input
    login, gecos = submit.login_name(os.getuid())
    # Bad -r or recipient arguments fail before any input is read.
    compose.identity(sender, login, gecos, cfg.myorigin)
    if draft.to or draft.cc or draft.bcc:
        compose.envelope_recipients(draft, cfg.myorigin)
    skip_empty = req.skip_empty or "skipemptybody" in req.variables
    interactive = sys.stdin.isatty() and not req.read_recipients
    if interactive:
        # tilde escapes (editor, pager: subprocess) only for a terminal; cron's mail skips them
        from pymailtools.mua import tilde

        escape = req.variables.get("escape", "~")
        composer = tilde.Composer(draft, sys.stdin, sys.stdout, escape=escape[:1])
        outcome = composer.run(ask_subject=req.subject is None)
        if outcome == tilde.DEAD:
            tilde.save_dead_letter(draft, dead_letter())
            return EX_OK
        if outcome == tilde.ABORT:
            return EX_OK
    else:
        data = sys.stdin.buffer.read()
        if req.read_recipients:
            data = _take_headers(draft, data)
        draft.body = data
    if draft.is_empty():
        if skip_empty:
            return EX_OK
        print("Null message body; hope that's ok", file=sys.stderr)
    try:
        return outbox.send_draft(cfg, draft, sender, server=server, variables=req.variables,
                                 verbose=req.verbose, prog=PROG, warn=warn)
    except MailError:
        if interactive:
            # only an interactive session saves dead.letter (tilde: editor, subprocess)
            from pymailtools.mua import tilde

            path = dead_letter()
            tilde.save_dead_letter(draft, path)
            print(f'"{path}": message not sent, saved', file=sys.stderr)
        raise


def dead_letter() -> str:
    return os.environ.get("DEAD") or os.path.join(os.path.expanduser("~"), "dead.letter")


def _take_headers(draft: Draft, data: bytes) -> bytes:
    """mailx -t / --read-recipients: the header block at the top of stdin fills the draft."""
    data = data.replace(b"\r\n", b"\n")
    head, sep, body = data.partition(b"\n\n")
    lines = head.split(b"\n")
    if not lines or not _header_line(lines[0]):
        return data  # no header block: all of it is the body (s-nail skips such lines too)
    fields: list[str] = []
    for line in lines:
        text = line.decode("utf-8", "surrogateescape")
        if text[:1] in (" ", "\t") and fields:
            fields[-1] += " " + text.strip()
        elif _header_line(line):
            fields.append(text)
        else:
            raise _Quiet(f"not a header line in the message header: {text[:60]!r}")
    for f in fields:
        draft.add_header(f)
    return body if sep else b""


def _header_line(line: bytes) -> bool:
    name, colon, _ = line.partition(b":")
    return bool(colon) and bool(name) and all(33 <= c <= 126 for c in name)
