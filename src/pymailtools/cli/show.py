"""The queue listing as mailq, sendmail -bp and postqueue -p/-j print it: Postfix's text,
JSON lines, or a rich table on a terminal."""

from __future__ import annotations

import os
import sys
import time

from pymailtools.admin.listing import items, json_lines, listing
from pymailtools.cli.common import authorize
from pymailtools.config import Config
from pymailtools.errors import MailError, PermissionDenied
from pymailtools.queue import maildrop
from pymailtools.queue.format import printable
from pymailtools.queue.select import Selector
from pymailtools.queue.store import MAILDROP, Queue

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

    from pymailtools.admin.listing import Item

TABLE_ROWS = 200  # rows per rendered table: memory stays flat however long the queue is


def show(cfg: Config, prog: str = "mailq", *, selector: Selector | None = None,
         fmt: str = "auto") -> int:
    """List the queue: ``plain`` (Postfix's text), ``json`` (postqueue -j), ``table`` (rich),
    or ``auto``: the table on a terminal, Postfix's text otherwise. Every user may, unless
    authorized_mailq_users says otherwise; an ordinary user sees what the listing index and
    the state directories show (never a message or an envelope)."""
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
        quiet_broken_pipe()
    except PermissionError:
        raise _unreadable(cfg) from None
    if unread:
        n = len(unread)
        print(f"{prog}: warning: {n} queue entr{'y is' if n == 1 else 'ies are'} not in the "
              "listing index yet: shown without size, sender and recipients (only root can "
              "read them)", file=sys.stderr)
    if (selector is None or selector.wants_state(MAILDROP)) and maildrop.hidden(queue):
        # stdout stays Postfix's for scripts ("Mail queue is empty" included), but a user
        # whose own message waits in the maildrop must learn why it is not listed.
        print(f"{prog}: messages submitted since the last queue run (in the maildrop) are "
              "shown to root only", file=sys.stderr)
    return 0


def _unreadable(cfg: Config) -> MailError:
    """Why this user could not list the queue: modes not yet opened by a root queue run, or
    a restricted authorized_mailq_users (then only root can read it)."""
    if cfg.public_listing:
        why = 'not listable by ordinary users yet: run "sendmail -q" once as root'
    else:
        why = "authorized_mailq_users is a list, so only root can read it"
    return PermissionDenied(f"cannot read the queue in {cfg.queue_directory}: "
                            f"permission denied ({why})")


def quiet_broken_pipe() -> None:
    """`mailq | head`: stop quietly, and keep Python from complaining at exit."""
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
    # rich (~40 ms) only for the table on a terminal
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

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
