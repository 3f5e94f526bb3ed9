"""The mail spool: safe user names, mailbox paths, and delivery to a user's mbox or Maildir."""

import os
import pwd
import re
import time
from typing import TYPE_CHECKING, BinaryIO

from pymailtools.config import Config
from pymailtools.errors import DeliveryError
from pymailtools.local import maildir, mbox

if TYPE_CHECKING:
    from pymailtools.local.group import Group

# Debian's useradd default (NAME_REGEX) without upper case or '$': whatever matches can be
# appended to the spool path as is, with no '/' and no '..'.
_USER_NAME = re.compile(r"[a-z_][a-z0-9_.-]{0,63}\Z")


def valid_user_name(name: str) -> bool:
    """True when ``name`` is safe to use as a file name in the mail spool."""
    return bool(_USER_NAME.match(name)) and name not in (".", "..")


def mailbox_path(config: Config, name: str) -> tuple[str, bool]:
    """The spool mailbox of a (validated) user name, and whether it is a Maildir."""
    spool = config.mail_spool_directory
    return spool.rstrip("/") + "/" + name, spool.endswith("/")


# A delivery looks its user up three times (routing, .forward, the mailbox) and getpwnam
# reads /etc/passwd each time: known users are remembered this long (seconds), as Postfix's
# local(8) caches its passwd look-ups. An unknown user is always asked again.
PASSWD_TTL = 2.0
_passwd_cache: dict[str, tuple[float, pwd.struct_passwd]] = {}


def passwd_entry(user: str) -> pwd.struct_passwd:
    """The passwd entry of local ``user``, whose own name is safe in the spool.

    Raises DeliveryError 5.1.3 for a name unusable as a spool file name, 5.1.1 for an
    unknown user.
    """
    if not valid_user_name(user):
        raise DeliveryError(f"invalid user name: {_quoted(user)}", "5.1.3")
    now = time.monotonic()
    cached = _passwd_cache.get(user)
    if cached is not None and now - cached[0] < PASSWD_TTL:
        return cached[1]
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        _passwd_cache.pop(user, None)
        raise DeliveryError(f"unknown user: {_quoted(user)}", "5.1.1") from None
    # The passwd entry's own name builds the path, never anything taken from the address.
    if not valid_user_name(pw.pw_name):
        raise DeliveryError(f"invalid user name: {_quoted(pw.pw_name)}", "5.1.3")
    if len(_passwd_cache) > 1024:
        _passwd_cache.clear()
    _passwd_cache[user] = (now, pw)
    return pw


def deliver_to_user(
    config: Config, user: str, message: BinaryIO, *, sender: str, recipient: str,
    busy: dict[str, str] | None = None, group: "Group | None" = None,
) -> str:
    """Deliver ``message`` to local ``user``'s mailbox; return a short note for the log.

    Raises DeliveryError: 5.1.1 unknown user, 5.1.3 unusable name, 4.x.x for everything that
    may work later (locks, refusals of unsafe mailboxes, no permission when not root).
    ``busy`` is the run's memory of mailboxes found locked (see mbox.append); with ``group``
    the fsync is left to the group's (see local.group).
    """
    pw = passwd_entry(user)
    path, is_maildir = mailbox_path(config, pw.pw_name)
    if os.geteuid() != 0:
        _check_unprivileged(path, is_maildir, pw)
    if is_maildir:
        maildir.deliver(path + "/", message, sender=sender, recipient=recipient,
                        uid=pw.pw_uid, gid=pw.pw_gid, config=config, group=group)
        return "delivered to maildir"
    if group is not None:
        group.append(path, message, sender=sender, recipient=recipient, uid=pw.pw_uid,
                     gid=pw.pw_gid, config=config, busy=busy)
    else:
        mbox.append(path, message, sender=sender, recipient=recipient, uid=pw.pw_uid,
                    gid=pw.pw_gid, config=config, busy=busy)
    return "delivered to mailbox"


def _quoted(name: str) -> str:
    # Names come from addresses: keep control characters out of the log line.
    return '"' + "".join(c if c.isprintable() and c != '"' else "?" for c in name) + '"'


def _writable(path: str) -> bool:
    return os.access(
        path,
        os.W_OK | os.X_OK if os.path.isdir(path) else os.W_OK,
        effective_ids=os.access in os.supports_effective_ids,
    )


def _check_unprivileged(path: str, is_maildir: bool, pw: pwd.struct_passwd) -> None:
    """Without root we can neither create a mailbox for someone else (no fchown) nor write to
    one we have no permission for: leave those to the root-run queue runner."""
    mine = pw.pw_uid == os.geteuid()
    if is_maildir:
        if os.path.lexists(path):
            ok = all(_writable(os.path.join(path, sub)) for sub in ("tmp", "new")) or (
                mine and _writable(path)
            )
        else:
            ok = mine and _writable(os.path.dirname(path))
    elif os.path.lexists(path):
        ok = _writable(path)
    else:
        ok = mine and _writable(os.path.dirname(path))
    if not ok:
        raise DeliveryError(
            f"cannot deliver to {path} as uid {os.geteuid()} (no permission); "
            "a root-run queue runner will deliver it",
            "4.3.0",
        )
