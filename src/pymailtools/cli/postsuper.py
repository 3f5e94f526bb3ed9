"""postsuper: Postfix's queue maintenance command (-d -h -H -r -p -s), with queue selectors."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator

from pymailtools import config as configmod
from pymailtools.admin.bulk import settle_in_background, whole
from pymailtools.admin.postsuper import DEFAULT_QUEUES, HOLD_OP, OPERATIONS, Admin, summary
from pymailtools.cli.common import getopt, run_main
from pymailtools.cli.postqueue import config_path
from pymailtools.errors import (
    EX_DATAERR,
    EX_OK,
    EX_TEMPFAIL,
    InvalidQueueId,
    PermissionDenied,
    UsageError,
)
from pymailtools.queue import bulk
from pymailtools.queue import ids as queueid
from pymailtools.queue.format import printable
from pymailtools.queue.select import QUEUE_NAMES, Options
from pymailtools.queue.store import Queue

PROG = "postsuper"
USAGE = ("usage: postsuper [-c config_dir] [-d queue_id (delete)] [-h queue_id (hold)] "
         "[-H queue_id (un-hold)] [-p (purge temporary files)] [-r queue_id (requeue)] "
         "[-s (structure fix)] [-S (redundant structure fix)] [-v (verbose)] "
         "[--from PATTERN] [--to PATTERN] [--older-than AGE] [--newer-than AGE] "
         "[--queue NAME] [--reason PATTERN] [queue...]")
_OPS = {"d": "delete", "h": "hold", "H": "release", "r": "requeue"}
SELECTED = object()  # "-d --from X": the operation applies to what the selectors choose


class Request:
    """The parsed postsuper command line."""

    def __init__(self) -> None:
        self.config: str | None = None
        self.ops: dict[str, list[object]] = {}
        self.purge = False
        self.check = False
        self.verbose = 0
        self.queues: list[str] = []
        self.selectors = Options()


def warn(msg: str) -> None:
    print(f"{PROG}: warning: {msg}", file=sys.stderr)


def info(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr)


def parse(argv: list[str]) -> Request:
    """Postfix's getopt (-d ID may repeat; ALL and - are special), plus long selectors.
    Every id is validated here, before anything is touched."""
    req = Request()
    usage = f"\n{PROG}: fatal: {USAGE}"

    def long(args: list[str], i: int) -> int:
        if Options.is_option(args[i]):
            return req.selectors.take(args, i)
        raise UsageError(f"unrecognized option '{args[i]}'{usage}")

    def takes(c: str, following: str) -> bool:
        # "-d --from X": the selectors choose the ids; the option is read next
        return not (c in _OPS and Options.is_option(following))

    opts, i = getopt(argv, "c:d:efh:H:pr:sSv", long=long, takes=takes, usage=usage)
    for c, value in opts:
        if c in "ef":
            raise UsageError(f"-{c} (force expiry) is not supported by pymailtools")
        if c in "psSv":
            req.purge |= c == "p"
            req.check |= c in "sS"
            req.verbose += c == "v"
        elif c == "c":
            req.config = config_path(str(value))
        elif value is None:
            req.ops.setdefault(_OPS[c], []).append(SELECTED)
        else:
            if value not in ("ALL", "-"):
                queueid.check(value)
            req.ops.setdefault(_OPS[c], []).append(value)
    while i < len(argv):  # queue names; selectors may still follow them
        name = argv[i]
        if Options.is_option(name):
            i = req.selectors.take(argv, i)
            continue
        if name not in QUEUE_NAMES:
            raise UsageError(f"invalid directory name: {_safe(name)}")
        req.queues.append(name)
        i += 1
    req.queues += req.selectors.values["queues"]
    if sum(v.count("-") for v in req.ops.values()) > 1:
        raise UsageError("only one queue id list can be read from standard input")
    if any(req.selectors.values.values()) and not req.ops:
        raise UsageError("selectors need an operation: -d, -h, -H or -r")
    return req


def _safe(s: str) -> str:
    return printable(s)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # Postfix prints "invalid queue id" without its usual "fatal: "
    return run_main(PROG, lambda: run(parse(args)),
                    prefix=lambda e: "" if isinstance(e, InvalidQueueId) else "fatal: ")


def check_permission(root: str) -> None:
    """Root, or the owner of the queue directory in use (a per-user queue); others: 77."""
    euid = os.geteuid()
    if euid == 0:
        return
    try:
        owner = os.stat(root).st_uid
    except FileNotFoundError:
        owner = euid  # no queue yet: nothing to change, nothing to refuse
    if owner != euid:
        raise PermissionDenied("use of this command is reserved for the superuser")


def run(req: Request) -> int:
    cfg = configmod.load(req.config)
    configmod.warn(cfg, PROG)
    check_permission(cfg.queue_directory)
    queue = Queue(cfg.queue_directory)
    if os.geteuid() == 0 or os.path.isdir(queue.root):
        queue.prepare(cfg.public_listing)  # root sets a fresh queue up; modes are repaired
    if "maildrop" in req.queues and req.ops:
        warn("maildrop files are taken over by the queue runner; postsuper leaves them alone")
    if req.purge:
        if os.path.isdir(queue.root):
            bulk.settle(queue)  # what an interrupted bulk operation left in trash/
        for path in Admin(queue).purge():
            if req.verbose:
                info(f"{path}: removed")
    if req.check:
        for name, why in Admin(queue).check():
            warn(f"{_safe(name)}: moved to corrupt/: {_safe(why)}")
    if not req.ops:
        return EX_OK
    selector = req.selectors.selector()
    bad = 0
    busy: list[str] = []
    counts: dict[str, int] = {}
    bulk_done: list[str] = []  # held entries a swap skipped, for the settling process
    lock = bulk.admin_lock(queue) if os.path.isdir(queue.root) else -1
    for op in OPERATIONS:
        args = req.ops.get(op)
        if args is None:
            continue
        queues = [q for q in (req.queues or DEFAULT_QUEUES[op]) if q != "maildrop"]
        counts[op] = 0
        mass = any(a == "ALL" or a is SELECTED for a in args)
        if mass and "ALL" in args and selector.empty and not req.verbose and lock >= 0:
            outcome, queues = whole(op, queue, queues)
            if outcome is not None:
                counts[op] += outcome.count
                busy += outcome.skipped
                bulk_done += outcome.skipped if op == HOLD_OP else []
                bulk_done.append("")  # something to settle
        if mass and queues:
            admin = Admin(queue, on_done=_reporter(req.verbose > 0), on_busy=busy.append)
            counts[op] += admin.apply(op, admin.scan(op, queues), queues, selector).count
        admin = Admin(queue, on_done=_reporter(True), on_busy=busy.append)
        named = [a for a in args if isinstance(a, str) and a not in ("ALL", "-")]
        if named:
            counts[op] += admin.apply(op, admin.named(named, queues), queues, selector).count
        if "-" in args:
            errors: list[str] = []
            stream = admin.named(_stdin_ids(errors), queues)
            counts[op] += admin.apply(op, stream, queues, selector).count
            bad += len(errors)
    if lock >= 0:
        os.close(lock)
    if bulk_done:
        settle_in_background(queue, [q for q in bulk_done if q])
    for qid in dict.fromkeys(busy):
        warn(f"{qid}: skipped: the message is being delivered (locked by a queue runner); "
             "try again")
    for op in OPERATIONS:
        if op in counts:
            info(summary(op, counts[op]))
    if bad:
        return EX_DATAERR
    return EX_TEMPFAIL if busy else EX_OK


def _reporter(each: bool) -> Callable[[str, str], None] | None:
    if not each:
        return None

    def report(qid: str, what: str) -> None:
        info(f"{qid}: {what}")

    return report


def _stdin_ids(errors: list[str]) -> Iterator[str]:
    """Ids from standard input, one per line; a bad line is warned about and skipped."""
    for raw in sys.stdin.buffer:
        line = raw.rstrip(b"\n").removesuffix(b"\r")
        if not line.strip():
            continue
        try:
            qid = line.decode("ascii")
        except UnicodeDecodeError:
            qid = ""
        if not queueid.is_valid(qid):
            text = line.decode("utf-8", "replace")
            warn(f"invalid mail queue id: {_safe(text)}")
            errors.append(text)
            continue
        yield qid
