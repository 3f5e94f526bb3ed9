"""The local delivery agent: one message to one local target (mailbox, file or command)."""

from typing import BinaryIO

from pymailtools.config import Config
from pymailtools.local import mailbox, pipe
from pymailtools.local.group import Group
from pymailtools.local.targets import Command, File, Mailbox


def deliver(
    config: Config, target: Mailbox | File | Command, message: BinaryIO, *, sender: str,
    recipient: str, original_recipient: str = "", busy: dict[str, str] | None = None,
    group: Group | None = None,
) -> str:
    """Deliver ``message`` to ``target``; return a short note for the log.

    Raises DeliveryError (4.x.x to retry, 5.x.x to bounce), or OSError naming the file a file
    delivery could not use. ``original_recipient`` is the address as submitted (a mailbox
    command's ORIGINAL_RECIPIENT); ``busy`` is the queue run's memory of locked mailboxes (see
    mbox.append). With ``group`` a mailbox delivery may be left to its ``sync`` to make
    durable (see local.group); files and commands never are.
    """
    message.seek(0)
    if isinstance(target, Mailbox):
        return mailbox.deliver(config, target.user, message, sender=sender,
                               recipient=recipient, original_recipient=original_recipient,
                               busy=busy, group=group)
    if group is not None:
        group.prepare(None, -1)  # the file or command may lock the mailbox we hold
    if isinstance(target, File):
        pipe.deliver_file(target, message, sender=sender, recipient=recipient, config=config)
        return f"delivered to file: {target.path}"
    pipe.run_command(target, message, sender=sender, recipient=recipient, config=config)
    return f"delivered to command: {' '.join(target.argv)}"
