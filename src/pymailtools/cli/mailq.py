"""mailq: list the queue in Postfix's format (sendmail -bp, postqueue -p), a table, or JSON."""

from __future__ import annotations

import sys
import time

from pymailtools.config import Config
from pymailtools.errors import EX_NOINPUT, MailError, UsageError
from pymailtools.queue.select import Options, Selector

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

    from pymailtools.admin.listing import Item

PROG = "mailq"
TABLE_ROWS = 200  # rows per rendered table: memory stays flat however long the queue is


def show(cfg: Config, prog: str = "mailq", *, selector: Selector | None = None,
         fmt: str = "auto") -> int:
    """List the queue: ``plain`` (Postfix's text), ``json`` (postqueue -j), ``table`` (rich),
    or ``auto``: the table on a terminal, Postfix's text otherwise. Every user may, unless
    authorized_mailq_users says otherwise; an ordinary user sees what the listing index and
    the state directories show (never a message or an envelope)."""
    from pymailtools.admin.listing import items, json_lines, listing
    from pymailtools.cli.postqueue import authorize
    from pymailtools.queue.store import Queue

    authorize(cfg, "view")
    queue = Queue(cfg.queue_directory)
    if fmt == "auto":
        fmt = "table" if sys.stdout.isatty() else "plain"
    unread: list[str] = []
    try:
        if fmt == "table":
            _table(items(queue, cfg.message_size_limit, selector, unread))
        else:
            gen = (json_lines if fmt == "json" else listing)(
                queue, cfg.message_size_limit, selector, unread)
            write, buf = sys.stdout.write, []
            for piece in gen:  # a write per 256 entries: 100,000 writes cost 0.1 s
                buf.append(piece)
                if len(buf) >= 256:
                    write("".join(buf))
                    buf.clear()
            write("".join(buf))
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_broken_pipe()
    except PermissionError:
        raise _unreadable(cfg) from None
    if unread:
        n = len(unread)
        print(f"{prog}: warning: {n} queue entr{'y is' if n == 1 else 'ies are'} not in the "
              "listing index yet: shown without size, sender and recipients (only root can "
              "read them)", file=sys.stderr)
    return 0


def _unreadable(cfg: Config) -> MailError:
    """Why this user could not list the queue: modes not yet opened by a root queue run, or
    a restricted authorized_mailq_users (then only root can read it)."""
    from pymailtools.errors import PermissionDenied

    if cfg.public_listing:
        why = 'not listable by ordinary users yet: run "sendmail -q" once as root'
    else:
        why = "authorized_mailq_users is a list, so only root can read it"
    return PermissionDenied(f"cannot read the queue in {cfg.queue_directory}: "
                            f"permission denied ({why})")


def _quiet_broken_pipe() -> None:
    """`mailq | head`: stop quietly, and keep Python from complaining at exit."""
    import os

    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except OSError:
        pass


def age(seconds: float) -> str:
    """A short age: 45s, 12m, 3h, 5d."""
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def _table(entries: Iterable[Item]) -> None:
    """A rich table (id, state, age, size, sender, recipients, last reason), in slices."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from pymailtools.queue.format import printable

    console = Console(highlight=False)
    now = time.time()
    count = size = 0

    def new_table(header: bool) -> Table:
        t = Table(show_header=header, box=None, pad_edge=False, expand=True)
        t.add_column("Queue ID", no_wrap=True, width=15, style="bold")
        t.add_column("State", no_wrap=True, width=8)
        t.add_column("Age", no_wrap=True, justify="right", width=4)
        t.add_column("Size", no_wrap=True, justify="right", width=8)
        t.add_column("Sender", ratio=2, overflow="fold")
        t.add_column("Recipients", ratio=2, overflow="fold")
        t.add_column("Last reason", ratio=3, overflow="fold")
        return t

    table = new_table(True)
    rows = 0
    for item in entries:
        env = item.envelope
        pending = [r for r in env.recipients if not r.done]
        reasons = [r.reason for r in pending if r.reason]
        state = item.queue_name
        # Text objects, never markup: a sender or reason cannot inject styles or escapes.
        table.add_row(Text(env.id), Text(state, style=_STATE_STYLE.get(state, "")),
                      Text(age(now - env.arrival)), Text(str(env.size)),
                      Text(printable(env.sender) or "MAILER-DAEMON"),
                      Text("\n".join(printable(r.address) for r in pending)),
                      Text(printable(reasons[-1]) if reasons else "", style="dim"))
        count += 1
        size += env.size
        rows += 1
        if rows >= TABLE_ROWS:
            console.print(table)
            table, rows = new_table(False), 0
    if rows:
        console.print(table)
    if count == 0:
        console.print("Mail queue is empty")
    else:
        console.print(f"-- {size // 1024} Kbytes in {count} Request{'' if count == 1 else 's'}.")


_STATE_STYLE = {"active": "green", "deferred": "yellow", "hold": "magenta", "incoming": "cyan",
                "maildrop": "blue"}


def explain(cfg: Config, qid: str, as_json: bool = False) -> int:
    """mailq --explain ID: the entry and its attempt history, per recipient."""
    from pymailtools.admin.listing import find_item
    from pymailtools.cli.postqueue import authorize
    from pymailtools.errors import PermissionDenied
    from pymailtools.queue import ids as queueid
    from pymailtools.queue.store import Queue

    queueid.check(qid)
    authorize(cfg, "view")
    queue = Queue(cfg.queue_directory)
    try:
        item = find_item(queue, qid, cfg.message_size_limit)
        history = queue.history(qid) if item else []
    except PermissionError:
        raise PermissionDenied(f"{qid}: cannot read the entry in {cfg.queue_directory}: "
                               "permission denied (its details are for root only)") from None
    if item is None:
        raise MailError(f"{qid}: no such queue entry", EX_NOINPUT)
    text = (_explain_json if as_json else _explain_text)(item, history)
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_broken_pipe()
    return 0


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _explain_text(item: Item, history: list) -> str:
    from pymailtools.queue.format import printable

    env = item.envelope
    out = [f"{env.id}: {item.queue_name}, {env.size} bytes, arrived {_when(env.arrival)}, "
           f"from {printable(env.sender) or 'MAILER-DAEMON'}\n"]
    for r in env.recipients:
        line = (f"  {printable(r.address)}: {r.state}, {r.attempts} "
                f"attempt{'' if r.attempts == 1 else 's'}")
        if r.last_try:
            line += f", last {_when(r.last_try)}"
        if not r.done and r.next_try:
            line += f", next {_when(r.next_try)}"
        out.append(line + "\n")
        if r.reason:
            out.append(f"    ({printable(r.reason)})\n")
        for a in history:
            if a.recipient == r.address:
                out.append(f"    {_when(a.when)} relay={printable(a.relay) or 'none'} "
                           f"{printable(a.status)} {printable(a.dsn)} {printable(a.reason)}\n")
    return "".join(out)


def _explain_json(item: Item, history: list) -> str:
    import json

    env = item.envelope
    obj = {
        "queue_name": item.queue_name, "queue_id": env.id, "arrival_time": int(env.arrival),
        "message_size": env.size, "sender": env.sender or "MAILER-DAEMON",
        "recipients": [{
            "address": r.address, "state": r.state, "attempts": r.attempts,
            "last_try": int(r.last_try) or None, "next_try": int(r.next_try) or None,
            "dsn": r.status, "reason": r.reason,
            "history": [{"time": int(a.when), "relay": a.relay, "status": a.status,
                         "dsn": a.dsn, "reason": a.reason}
                        for a in history if a.recipient == r.address],
        } for r in env.recipients],
    }
    return json.dumps(obj) + "\n"


def parse(argv: list[str]) -> tuple[list[str], dict[str, object], Options]:
    """Split mailq's own long options from the sendmail options it also accepts."""
    rest: list[str] = []
    own: dict[str, object] = {"plain": False, "json": False, "explain": None}
    sel = Options()
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if arg == "--":
            rest += argv[i:]
            break
        if arg in ("--plain", "--json"):
            own[arg[2:]] = True
        elif name == "--explain":
            if not eq:
                if i + 1 >= len(argv):
                    raise UsageError("option --explain requires a queue id")
                i += 1
                value = argv[i]
            own["explain"] = value
        elif Options.is_option(arg):
            i = sel.take(argv, i)
            continue
        elif arg.startswith("--"):
            raise UsageError(f"unrecognized option '{arg}'")
        else:
            rest.append(arg)
        i += 1
    if own["plain"] and own["json"]:
        raise UsageError("--plain and --json exclude each other")
    return rest, own, sel


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from pymailtools.cli.common import run_main

    return run_main(PROG, lambda: _run(argv))


def _run(argv: list[str]) -> int:
    from pymailtools.cli import sendmail

    rest, own, sel = parse(argv)
    if own["explain"] is None and not own["json"] and not own["plain"] and not any(
            sel.values.values()):
        return sendmail.run(sendmail.parse(["mailq", *rest]))  # exactly `sendmail -bp`
    from pymailtools import config as configmod

    req = sendmail.parse(["mailq", *rest])
    if req.recipients:
        raise UsageError("display queue mode requires no recipient")
    cfg = configmod.load(req.config_path)
    configmod.warn(cfg, PROG)
    if own["explain"] is not None:
        return explain(cfg, str(own["explain"]), as_json=bool(own["json"]))
    fmt = "json" if own["json"] else ("plain" if own["plain"] else "auto")
    return show(cfg, PROG, selector=sel.selector(), fmt=fmt)
