"""postqueue: Postfix's queue control command (-p, -j, -f, -i, -s), plus queue selectors."""

from __future__ import annotations

import os
import sys

from pymailtools import config as configmod
from pymailtools.cli.common import authorize, getopt, run_main
from pymailtools.cli.show import show
from pymailtools.errors import (
    EX_OK,
    PermissionDenied,
    UsageError,
)
from pymailtools.queue import ids as queueid
from pymailtools.queue.format import printable
from pymailtools.queue.select import Options
from pymailtools.queue.store import Queue

TYPE_CHECKING = False
if TYPE_CHECKING:
    pass

PROG = "postqueue"
USAGE = ("usage: postqueue -f | postqueue -i queueid | postqueue -j | postqueue -p | "
         "postqueue -s site")


def config_path(arg: str) -> str:
    """-c DIR as Postfix's config_directory: a directory means DIR/config.toml."""
    if os.path.isdir(arg):
        return os.path.join(arg, "config.toml")
    return arg


class Request:
    """The parsed postqueue command line."""

    def __init__(self) -> None:
        self.mode = ""
        self.arg = ""
        self.config: str | None = None
        self.verbose = 0
        self.plain = False
        self.selectors = Options()


def parse(argv: list[str]) -> Request:
    req = Request()

    def long(args: list[str], i: int) -> int:
        if args[i] == "--plain":
            req.plain = True
            return i + 1
        if Options.is_option(args[i]):
            return req.selectors.take(args, i)
        raise UsageError(f"unrecognized option '{args[i]}'")

    opts, first = getopt(argv, "c:fi:jps:v", long=long)
    for c, value in opts:
        if c == "c":
            req.config = config_path(value or "")
        elif c == "v":
            req.verbose += 1
        else:
            if req.mode:
                raise UsageError(USAGE)
            req.mode, req.arg = c, value or ""
    if argv[first:] or not req.mode:
        raise UsageError(USAGE)
    if req.mode not in "pj" and (req.plain or any(req.selectors.values.values())):
        raise UsageError("selectors and --plain go with -p and -j only")
    return req


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    return run_main(PROG, lambda: run(parse(args)), prefix="fatal: ")


def run(req: Request) -> int:
    if req.mode == "i":
        _check_id(req.arg)
    elif req.mode == "s":
        _check_site(req.arg)
    cfg = configmod.load(req.config)
    configmod.warn(cfg, PROG)
    if req.mode in "pj":
        return show(cfg, PROG, selector=req.selectors.selector(),
                    fmt="json" if req.mode == "j" else ("plain" if req.plain else "auto"))

    authorize(cfg, "flush")
    if not Queue(cfg.queue_directory).prepare(cfg.public_listing):
        # Postfix flushes for anyone through its privileged service; pymailtools has none.
        raise PermissionDenied(f"cannot flush the queue in {cfg.queue_directory}: "
                               "permission denied (run it as root)")
    # only a flush runs the queue: -p and -j do not load the runner (logging, subprocess)
    from pymailtools.qmgr.runner import Runner

    runner = Runner(cfg, prog=PROG, verbose=bool(req.verbose))
    if req.mode == "f":
        runner.run(force=True, housekeeping=True)
    elif req.mode == "i":
        runner.run(ids=[req.arg], force=True)  # silent even if the id does not exist
    else:
        runner.run(site=req.arg.lower(), force=True)
    return EX_OK


def _check_id(qid: str) -> None:
    if not queueid.is_valid(qid):
        raise UsageError(f'Cannot flush queue ID - invalid name: "{printable(qid)}"')


def _check_site(site: str) -> None:
    ok = bool(site) and len(site) <= 255 and all(
        c.isascii() and (c.isalnum() or c in ".-[]:") for c in site)
    if ok and site.startswith("["):
        ok = site.endswith("]") and site.count("[") == 1 and site.count("]") == 1
    elif ok:
        ok = "[" not in site and "]" not in site and ":" not in site
    if not ok:
        raise UsageError(f'Cannot flush mail queue - invalid destination: "{printable(site)}"')
