"""A local user's mailbox delivery, chosen as Postfix's local(8) does: mailbox_command_maps,
mailbox_command, home_mailbox, then the mail spool."""

import os
import pwd
from collections.abc import Callable
from typing import BinaryIO, NamedTuple

from pymailtools.config import Config
from pymailtools.errors import ConfigError, DeliveryError
from pymailtools.local import maildir, mbox, pipe, spool
from pymailtools.local.group import Group
from pymailtools.local.route import DEFAULT_PRIVS, local_name
from pymailtools.tables import TableError, open_tables, split_extension


class Destination(NamedTuple):
    """Where a user's mailbox delivery goes: ``kind`` is "command", "mailbox" or "maildir";
    ``where`` the command line or the path (a maildir's ends in "/")."""

    kind: str
    where: str


def destination(config: Config, pw: pwd.struct_passwd) -> Destination:
    """The first of mailbox_command_maps (keyed by the user name, as Postfix), mailbox_command,
    home_mailbox and mail_spool_directory that applies to ``pw``'s user.

    Raises DeliveryError 4.3.5 when a lookup table cannot be used (the mail waits for the
    administrator rather than going somewhere else)."""
    command = _mapped_command(config, pw.pw_name) or config.mailbox_command.strip()
    if command:
        return Destination("command", command)
    if config.home_mailbox:
        path = pw.pw_dir.rstrip("/") + "/" + config.home_mailbox
        return Destination("maildir" if path.endswith("/") else "mailbox", path)
    path, is_maildir = spool.mailbox_path(config, pw.pw_name)
    return Destination("maildir", path + "/") if is_maildir else Destination("mailbox", path)


def _mapped_command(config: Config, user: str) -> str:
    if not config.mailbox_command_maps:
        return ""
    try:
        found = open_tables(config.mailbox_command_maps).get(user)
    except (ConfigError, TableError) as e:
        raise DeliveryError(f"mailbox_command_maps: {e}", "4.3.5") from None
    return (found or "").strip()


def describe(config: Config, user: str) -> str:
    """What ``sendmail -bv`` says of a user's mailbox: "local mailbox PATH", "local maildir
    PATH/" or "mailbox command COMMAND"."""
    dest = destination(config, spool.passwd_entry(user))
    if dest.kind == "command":
        return f"mailbox command {dest.where}"
    return f"local {dest.kind} {dest.where}"


def deliver(
    config: Config, user: str, message: BinaryIO, *, sender: str, recipient: str,
    original_recipient: str = "", busy: dict[str, str] | None = None,
    group: Group | None = None,
) -> str:
    """Deliver ``message`` to local ``user``'s mailbox wherever it is configured to be; return a
    short note for the log. With ``group`` an mbox or Maildir delivery may wait for the
    group's fsync (see local.group); a mailbox command never does.

    Raises DeliveryError: 5.1.1 unknown user, 5.1.3 unusable name; a command's exit status as
    pipe.run maps it (a command that is missing or cannot be executed is deferred, 4.3.0); the
    mbox and Maildir writers' refusals (symbolic links, foreign owners) are temporary."""
    pw = spool.passwd_entry(user)
    dest = destination(config, pw)
    if dest.kind == "command":
        if group is not None:
            group.prepare(None, -1)  # the command may lock the mailbox we hold
        _run_command(config, pw, dest.where, message, sender=sender, recipient=recipient,
                     original_recipient=original_recipient)
        return f"delivered to command: {dest.where}"
    if not config.home_mailbox:
        return spool.deliver_to_user(config, user, message, sender=sender, recipient=recipient,
                                     busy=busy, group=group)
    _deliver_home(config, pw, dest, message, sender=sender, recipient=recipient, busy=busy,
                  group=group)
    return f"delivered to {dest.kind} {dest.where}"


def _deliver_home(config: Config, pw: pwd.struct_passwd, dest: Destination, message: BinaryIO,
                  *, sender: str, recipient: str, busy: dict[str, str] | None,
                  group: Group | None) -> None:
    """Write into the home directory as the user (effective ids, see pipe.call_as), so that
    the kernel judges every directory on the way: a symbolic link planted anywhere leads
    nowhere the user could not write already, and the writers refuse one as the mailbox
    itself or a file owned by anyone else."""
    uid, gid = pw.pw_uid, pw.pw_gid
    if group is not None:
        # A group keeps descriptors open across deliveries: only where the write runs in this
        # process (not in a child of call_as).
        if not pipe.runs_here(uid, effective_only=True):
            group.prepare(None, -1)
            group = None
        else:
            group.prepare(dest.where if dest.kind == "mailbox" else None, uid)

    def as_user(func: Callable[[], bytes]) -> bytes:
        return pipe.call_as(uid, gid, func, effective_only=True)

    def write() -> bytes:
        if dest.kind == "maildir":
            maildir.deliver(dest.where, message, sender=sender, recipient=recipient,
                            uid=uid, gid=gid, config=config, group=group)
        elif group is not None:
            group.append(dest.where, message, sender=sender, recipient=recipient, uid=uid,
                         gid=gid, config=config, busy=busy, wrap=as_user)
        else:
            mbox.append(dest.where, message, sender=sender, recipient=recipient,
                        uid=uid, gid=gid, config=config, busy=busy)
        return b""

    try:
        as_user(write)
    except OSError as e:
        raise mbox.os_error(f"cannot deliver to {dest.where}", e) from None


def command_environment(config: Config, pw: pwd.struct_passwd, *, sender: str, recipient: str,
                        original_recipient: str) -> dict[str, str]:
    """Postfix's environment for a mailbox command, every value passed through pipe.censor:
    HOME USER LOGNAME SHELL from the passwd entry, SENDER RECIPIENT ORIGINAL_RECIPIENT, and the
    recipient's LOCAL part, DOMAIN and address EXTENSION (the last two only when present)."""
    local = local_name(recipient)
    domain = recipient.rpartition("@")[2].lower() if "@" in recipient else ""
    # Split as local routing splits it, from the address being delivered.
    _, extension = split_extension(local, config.recipient_delimiter)
    if extension is not None and "/" in extension:
        extension = None  # Postfix ignores such an extension (it could be a path)
    env = {
        "HOME": pw.pw_dir,
        "USER": pw.pw_name,
        "LOGNAME": pw.pw_name,
        "SHELL": pw.pw_shell or pipe.SHELL,
        "SENDER": sender,
        "RECIPIENT": recipient,
        "LOCAL": local,
    }
    if domain:
        env["DOMAIN"] = domain
    if extension is not None:
        env["EXTENSION"] = extension
    if original_recipient or recipient:
        env["ORIGINAL_RECIPIENT"] = original_recipient or recipient
    env = {k: pipe.censor(v) for k, v in env.items()}
    env["PATH"] = pipe.PATH
    return env


def _run_command(config: Config, pw: pwd.struct_passwd, command: str, message: BinaryIO, *,
                 sender: str, recipient: str, original_recipient: str) -> None:
    """Run the mailbox command as the user with their supplementary groups (initgroups), in
    their home, the message on stdin after a From_ line, Return-Path: and Delivered-To:.
    Mail for root runs as default_privs (nobody), as Postfix does."""
    mbox.check_envelope(sender, recipient)
    if pw.pw_uid == 0:
        try:
            run_as = pwd.getpwnam(DEFAULT_PRIVS)
        except KeyError:
            raise DeliveryError(f"default_privs user {DEFAULT_PRIVS} does not exist",
                                "4.3.5") from None
        uid, gid, groups, cwd = run_as.pw_uid, run_as.pw_gid, [], "/"
    else:
        uid, gid, cwd = pw.pw_uid, pw.pw_gid, pw.pw_dir if os.path.isdir(pw.pw_dir) else "/"
        groups = os.getgrouplist(pw.pw_name, pw.pw_gid) if os.geteuid() == 0 else []
    env = command_environment(config, pw, sender=sender, recipient=recipient,
                              original_recipient=original_recipient)
    # A command that cannot be executed is a configuration mistake or a package not yet
    # installed: the mail waits for the fix (4.3.0) instead of bouncing.
    pipe.run(pipe.command_argv(command), message, uid=uid, gid=gid, groups=groups, cwd=cwd,
             env=env, config=config, head=mbox.envelope(sender, recipient), unusable="4.3.0",
             name=command)
