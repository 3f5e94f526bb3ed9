"""mailq: the command line of the queue listing (cli.show prints it), and --explain ID."""

from __future__ import annotations

import sys
import time

from pymailtools import config as configmod
from pymailtools.admin.listing import find_item
from pymailtools.cli import sendmail
from pymailtools.cli.common import authorize, run_main
from pymailtools.cli.show import quiet_broken_pipe, show
from pymailtools.config import Config
from pymailtools.errors import EX_NOINPUT, MailError, PermissionDenied, UsageError
from pymailtools.queue import ids as queueid
from pymailtools.queue.format import printable
from pymailtools.queue.select import Options
from pymailtools.queue.store import Queue

TYPE_CHECKING = False
if TYPE_CHECKING:

    from pymailtools.admin.listing import Item
    from pymailtools.queue.store import Attempt

PROG = "mailq"
def explain(cfg: Config, qid: str, as_json: bool = False) -> int:
    """mailq --explain ID: the entry and its attempt history, per recipient."""
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
        quiet_broken_pipe()
    return 0


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _explain_text(item: Item, history: list[Attempt]) -> str:
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


def _explain_json(item: Item, history: list[Attempt]) -> str:
    # only --explain --json writes JSON
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
    return run_main(PROG, lambda: _run(argv))


def _run(argv: list[str]) -> int:
    rest, own, sel = parse(argv)
    if own["explain"] is None and not own["json"] and not own["plain"] and not any(
            sel.values.values()):
        return sendmail.run(sendmail.parse(["mailq", *rest]))  # exactly `sendmail -bp`

    req = sendmail.parse(["mailq", *rest])
    if req.recipients:
        raise UsageError("display queue mode requires no recipient")
    cfg = configmod.load(req.config_path)
    configmod.warn(cfg, PROG)
    if own["explain"] is not None:
        return explain(cfg, str(own["explain"]), as_json=bool(own["json"]))
    fmt = "json" if own["json"] else ("plain" if own["plain"] else "auto")
    return show(cfg, PROG, selector=sel.selector(), fmt=fmt)
