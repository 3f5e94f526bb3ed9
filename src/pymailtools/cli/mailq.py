"""mailq: list the queue in Postfix's format (sendmail -bp, postqueue -p)."""

import sys

from pymailtools.config import Config


def show(cfg: Config, prog: str = "mailq") -> int:
    from pymailtools.errors import PermissionDenied
    from pymailtools.queue import Queue
    from pymailtools.showq import listing

    try:
        for piece in listing(Queue(cfg.queue_directory), cfg.message_size_limit):
            sys.stdout.write(piece)
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    except PermissionError:
        raise PermissionDenied(f"cannot read the queue in {cfg.queue_directory}: "
                               "permission denied (run it as root)") from None
    return 0


def main() -> int:
    from pymailtools.cli.sendmail import main as sendmail_main

    return sendmail_main(["mailq", *sys.argv[1:]])
