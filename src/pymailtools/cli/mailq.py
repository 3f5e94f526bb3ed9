"""mailq: list the queue in Postfix's format (sendmail -bp, postqueue -p)."""

import sys

from pymailtools.config import Config


def show(cfg: Config, prog: str = "mailq") -> int:
    from pymailtools.queue import Queue
    from pymailtools.showq import listing

    try:
        for piece in listing(Queue(cfg.queue_directory), cfg.message_size_limit):
            sys.stdout.write(piece)
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    return 0


def main() -> int:
    from pymailtools.cli.sendmail import main as sendmail_main

    return sendmail_main(["mailq", *sys.argv[1:]])
