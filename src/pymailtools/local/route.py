"""Local routing: addresses to delivery targets through aliases and ~/.forward, with loop checks."""

import errno
import os
import pwd
import shlex
import stat
from collections.abc import Callable
from typing import BinaryIO, NamedTuple

from pymailtools.address import check_envelope, local_part
from pymailtools.config import Config
from pymailtools.errors import AddressError, DeliveryError
from pymailtools.local import aliases
from pymailtools.local.aliases import AliasValue
from pymailtools.local.spool import passwd_entry
from pymailtools.local.targets import Command, File, Mailbox, Remote, Target
from pymailtools.log import library_warning
from pymailtools.tables import split_extension

MAX_DEPTH = 20  # nested aliases, .forward files and includes before we call it a loop
READ_LIMIT = 4 << 20  # largest .forward or :include: file we read
HEADER_SCAN_LIMIT = 1 << 20  # bytes of header block searched for Delivered-To
_QUICK_LOOK = 1 << 16  # bytes read at once before the header block is searched line by line
DEFAULT_PRIVS = "nobody"  # Postfix's default_privs: who runs commands of root-owned aliases


def is_local(config: Config, address: str) -> bool:
    """No domain, or a domain listed in mydestination."""
    return "@" not in address or config.is_local_domain(address.rpartition("@")[2])


def local_name(address: str) -> str:
    """The lookup key of a local address: its local part, unquoted and lower-cased."""
    local = local_part(address)
    unquoted = aliases.unquote(local)
    return (local if unquoted is None else unquoted).lower()


class _Rights(NamedTuple):
    uid: int
    gid: int
    home: str


class _Context(NamedTuple):
    """Where values come from: ``origin`` is the allow_mail_to_* word that applies ("alias",
    "forward" or "include"); ``user`` is the .forward's owner, None under aliases."""

    origin: str
    user: pwd.struct_passwd | None


def _home(pw: pwd.struct_passwd) -> str:
    return pw.pw_dir if os.path.isdir(pw.pw_dir) else "/"


def _alias_rights(owner: int) -> _Rights:
    """Commands and files of an alias file run as its owner; as nobody when that is root."""
    try:
        pw = pwd.getpwnam(DEFAULT_PRIVS) if owner == 0 else pwd.getpwuid(owner)
    except KeyError:
        who = DEFAULT_PRIVS if owner == 0 else f"uid {owner}"
        raise DeliveryError(f"alias file owner {who} does not exist", "4.3.5") from None
    return _Rights(pw.pw_uid, pw.pw_gid, _home(pw))


def _reader(path: str, owners: tuple[int, ...] | None, unsafe_mode: int) -> Callable[[], bytes]:
    """A function reading ``path`` for call_as: b"D" + content, or b"I" + why it is refused.

    The checks use fstat() of the descriptor actually read, so a swapped file cannot slip by."""

    def read() -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return b"Iis not a regular file"
        with os.fdopen(fd, "rb") as f:
            if owners is not None and st.st_uid not in owners:
                return f"Ihas a bad owner (uid {st.st_uid})".encode()
            if st.st_mode & unsafe_mode:
                return b"Iis group or world writable" if unsafe_mode & 0o020 else \
                    b"Iis world writable"
            data = f.read(READ_LIMIT + 1)
        if len(data) > READ_LIMIT:
            return f"Iis larger than {READ_LIMIT} bytes".encode()
        return b"D" + data

    return read


def _read_as(uid: int, gid: int, func: Callable[[], bytes]) -> bytes:
    """Run a reader with the user's permissions: in a child when we are root, else as
    ourselves (an unprivileged process has no more rights than the user to begin with)."""
    if os.geteuid() != 0 or uid == 0:
        return func()
    # Here, not at the top: pipe brings subprocess and json into every process that imports
    # route only to ask whether an address is local (the SMTP listener).
    from pymailtools.local import pipe

    return pipe.call_as(uid, gid, func)


class _Expander:
    """One resolve() call: follows aliases, .forward and includes depth-first."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.targets: list[Target] = []
        self.done: set[tuple[str, str]] = set()  # expanded once already: no need to repeat
        self.how = "mailbox"  # what the top-level name was: "alias", "forward" or "mailbox"
        # sendmail -bv as an ordinary user: what could not be checked (another user's
        # .forward) is noted here and passed by; None (delivery) makes it an error.
        self.unverified: list[str] | None = None
        self.extension: tuple[str, str] | None = None  # (delimiter, text) of the recipient
        self.steps: list[str] = []  # for sendmail -bv: the recipient_delimiter split

    # -- names ------------------------------------------------------------------------------

    def name(self, name: str, chain: tuple[tuple[str, str], ...]) -> None:
        """Expand a local name; ``chain`` holds the (stage, name) pairs that led here."""
        if not name:
            raise DeliveryError("empty local part", "5.1.3")
        if ("name", name) in self.done:
            return
        if any(n == name for stage, n in chain if stage != "include"):
            parent = next(e for e in reversed(chain) if e[0] != "include")
            if parent[1] != name:
                path = " -> ".join(n for stage, n in chain if stage != "include")
                raise DeliveryError(f"mail forwarding loop: {path} -> {name}", "5.4.6")
            # Listed in its own alias or .forward: that means the mailbox (Postfix), after
            # the .forward when the self-reference came from the alias.
            self.user(name, chain, forward=parent[0] == "alias")
            return
        self._depth(chain, name)
        values = aliases.lookup(self.config.alias_maps, name)
        if values is not None:
            if not chain:
                self.how = "alias"
            sub = (*chain, ("alias", name))
            for v in values:
                self.value(v, sub, _Context("alias", None))
        else:
            self.user(name, chain, forward=True)
        self.done.add(("name", name))

    def top(self, name: str) -> None:
        """The recipient's own local part: with recipient_delimiter, ``user+tag`` is looked up
        as an alias whole, then as ``user`` (alias, ~/.forward+tag, ~/.forward, mailbox)."""
        base, ext = split_extension(name, self.config.recipient_delimiter)
        if ext is None or aliases.lookup(self.config.alias_maps, name) is not None:
            self.name(name, ())
            return
        self.extension = (name[len(base)], ext)
        self.steps.append(f"recipient_delimiter: {name} -> {base} (extension {ext})")
        if aliases.lookup(self.config.alias_maps, base) is not None:
            self.name(base, ())
        else:
            self._depth((), base)
            self.user(base, (), forward=True, extension=self.extension)

    def user(self, name: str, chain: tuple[tuple[str, str], ...], *, forward: bool,
             extension: tuple[str, str] | None = None) -> None:
        """A passwd user: their .forward if they have one (and ``forward``), else the mailbox.
        ``extension`` (delimiter, text) selects ~/.forward+text first."""
        # Never a path: the mailbox is spool + "/" + a validated passwd name.
        pw = passwd_entry(name)
        if forward:
            values = self.forward(pw, extension)
            if values:
                if not chain:
                    self.how = "forward"
                sub = (*chain, ("forward", name))
                for v in values:
                    self.value(v, sub, _Context("forward", pw))
                return
        self.targets.append(Mailbox(pw.pw_name))

    def _depth(self, chain: tuple[tuple[str, str], ...], what: str) -> None:
        if len(chain) >= MAX_DEPTH:
            raise DeliveryError(f"alias expansion nested more than {MAX_DEPTH} levels at "
                                f"{what}: mail forwarding loop?", "5.4.6")

    # -- .forward ---------------------------------------------------------------------------

    def forward(self, pw: pwd.struct_passwd,
                extension: tuple[str, str] | None = None) -> list[AliasValue] | None:
        """The first .forward on forward_path that exists and is safe, read as the user.

        Safe = a regular file owned by the user or root, not group/world-writable; anything
        else is ignored with a warning, as sendmail and Postfix do. An entry naming
        $extension or $recipient_delimiter is skipped when the address has no extension."""
        delim, ext = extension if extension is not None else ("", "")
        for template in self.config.forward_path:
            path = template
            if ext == "" and ("$extension" in path or "${extension}" in path
                              or "recipient_delimiter" in path):
                continue
            for var, value in (("home", pw.pw_dir), ("user", pw.pw_name),
                               ("recipient_delimiter", delim), ("extension", ext)):
                path = path.replace("${" + var + "}", value).replace("$" + var, value)
            if "$" in path or not path.startswith("/") or "/" in ext:
                library_warning(__name__, f"forward_path entry {template!r}: only $home, $user, "
                                "$recipient_delimiter and $extension are supported; skipped")
                continue
            try:
                os.stat(path)  # cheap check as ourselves: most users have no .forward
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError:
                pass  # we may not see it; the user may
            try:
                reply = _read_as(pw.pw_uid, pw.pw_gid,
                                 _reader(path, (pw.pw_uid, 0), unsafe_mode=0o022))
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR):
                    continue
                if os.geteuid() not in (0, pw.pw_uid) and self.unverified is not None:
                    self.unverified.append(f"cannot read {path} as an ordinary user")
                    continue
                if os.geteuid() not in (0, pw.pw_uid):
                    raise DeliveryError(f"cannot read {path} without root privileges: "
                                        f"{e.strerror}", "4.3.0") from None
                if e.errno in (errno.EACCES, errno.EPERM, errno.ELOOP):
                    library_warning(__name__, f"{path}: cannot be read by {pw.pw_name}: "
                                              f"{e.strerror}; ignored")
                    continue
                raise DeliveryError(f"cannot read {path}: {e.strerror}", "4.3.0") from None
            if reply[:1] != b"D":
                library_warning(__name__, f"{path} {reply[1:].decode('utf-8', 'replace')}; "
                                          "ignored")
                continue
            text = reply[1:].decode("utf-8", "surrogateescape")
            return aliases.parse_values(text, source=path, trusted=False, owner=pw.pw_uid)
        return None

    # -- values -----------------------------------------------------------------------------

    def value(self, v: AliasValue, chain: tuple[tuple[str, str], ...], ctx: _Context) -> None:
        if v.kind == "address":
            self.address(v, chain)
        elif v.kind == "include":
            self.include(v, chain, ctx)
        elif v.kind == "command":
            self._allowed(v, ctx, self.config.allow_mail_to_commands, "commands")
            rights = self._rights(v, ctx)
            self.targets.append(Command(v.argv, rights.uid, rights.gid, rights.home))
        else:
            self._allowed(v, ctx, self.config.allow_mail_to_files, "files")
            rights = self._rights(v, ctx)
            self.targets.append(File(os.path.normpath(v.value), rights.uid, rights.gid))

    def address(self, v: AliasValue, chain: tuple[tuple[str, str], ...]) -> None:
        text = v.value
        if text.startswith("\\") and is_local(self.config, text[1:]):
            # \user: that user's mailbox, no further alias or .forward expansion.
            self.user(local_name(text[1:]), chain, forward=False)
            return
        text = text.removeprefix("\\")
        try:
            check_envelope(text, "address")
            text.encode("utf-8")
        except (AddressError, UnicodeError) as e:
            raise DeliveryError(f"{v.source}: bad address: {e}", "5.1.3") from None
        if is_local(self.config, text):
            self.name(local_name(text), chain)
        else:
            self.targets.append(Remote(text))

    def include(self, v: AliasValue, chain: tuple[tuple[str, str], ...], ctx: _Context) -> None:
        if v.error:
            raise DeliveryError(f"{v.source}: {v.error}", "5.3.5")
        path = os.path.normpath(v.value)
        if ("include", path) in chain:
            raise DeliveryError(f"mail forwarding loop: {path} includes itself", "5.4.6")
        if ("include", path) in self.done:
            return
        self._depth(chain, path)
        # Read with the rights of whoever wrote the directive: the .forward's user, or the
        # alias file's owner (root reads what root's own alias file names).
        if ctx.user is not None:
            uid, gid = ctx.user.pw_uid, ctx.user.pw_gid
        elif v.owner == 0:
            uid, gid = 0, 0
        else:
            try:
                uid, gid = v.owner, pwd.getpwuid(v.owner).pw_gid
            except KeyError:
                raise DeliveryError(f"{v.source}: owner uid {v.owner} does not exist",
                                    "4.3.5") from None
        try:
            reply = _read_as(uid, gid, _reader(path, None, unsafe_mode=0o002))
        except OSError as e:
            raise DeliveryError(f"{v.source}: cannot open include file {path}: {e.strerror}",
                                "4.3.5") from None
        if reply[:1] != b"D":
            raise DeliveryError(f"{v.source}: include file {path} "
                                f"{reply[1:].decode('utf-8', 'replace')}", "4.3.5")
        values = aliases.parse_values(reply[1:].decode("utf-8", "surrogateescape"),
                                      source=path, trusted=False, owner=uid)
        sub = (*chain, ("include", path))
        for x in values:
            self.value(x, sub, _Context("include", ctx.user))
        self.done.add(("include", path))

    def _allowed(self, v: AliasValue, ctx: _Context, allow: list[str], what: str) -> None:
        where = v.source.rpartition(":")[0] or v.source
        if ctx.origin == "include":
            raise DeliveryError(f"{v.source}: mail to {what} is not allowed in :include: "
                                "files", "5.7.1")
        if ctx.origin not in allow:
            raise DeliveryError(f"{v.source}: mail to {what} is restricted "
                                f"(allow_mail_to_{what} does not include {ctx.origin})", "5.7.1")
        if ctx.origin == "alias" and not v.trusted:
            raise DeliveryError(f"{v.source}: mail to {what} is restricted: {where} is not "
                                "owned by root, or is group/world-writable", "5.7.1")
        if v.error:
            raise DeliveryError(f"{v.source}: {v.error}", "5.3.5")

    def _rights(self, v: AliasValue, ctx: _Context) -> _Rights:
        if ctx.user is not None:
            return _Rights(ctx.user.pw_uid, ctx.user.pw_gid, _home(ctx.user))
        return _alias_rights(v.owner)


def _expand(config: Config, address: str) -> _Expander:
    exp = _Expander(config)
    exp.top(local_name(address))
    return exp


def resolve(config: Config, address: str, *, local: bool = False) -> list[Target]:
    """Where mail for ``address`` goes: [Remote(address)] for other domains; for local ones the
    mailboxes, files, commands and remote addresses its aliases and .forward lead to.
    ``local``: the local transport was chosen for it (transport_maps), whatever its domain.

    Raises DeliveryError: unknown user 5.1.1, bad name 5.1.3, loop or too deep 5.4.6,
    forbidden command/file 5.7.1, unusable value 5.3.5, unreadable alias data 4.x."""
    if not local and not is_local(config, address):
        return [Remote(address)]
    return list(dict.fromkeys(_expand(config, address).targets))


def describe(target: Target) -> str:
    """A target as aliases(5) would write it."""
    if isinstance(target, Mailbox):
        return target.user
    if isinstance(target, Remote):
        return target.address
    if isinstance(target, File):
        return target.path
    return '"|' + shlex.join(target.argv) + '"'


def explain(config: Config, address: str, *, local: bool = False) -> str:
    """One line for ``sendmail -bv`` about a local address (``local``: whatever its domain, as
    a transport_maps ``local:`` route); raises DeliveryError when it is undeliverable. What
    this user could not check (another user's .forward) is said after the answer."""
    if not local and not is_local(config, address):
        raise ValueError(f"{address} is not local: the queue manager routes it")
    exp = _Expander(config)
    exp.unverified = []
    exp.top(local_name(address))
    targets = list(dict.fromkeys(exp.targets))
    note = f" (not verified: {'; '.join(exp.unverified)})" if exp.unverified else ""
    note += "".join(f" ({step})" for step in exp.steps)
    if exp.how == "mailbox" and len(targets) == 1 and isinstance(targets[0], Mailbox):
        # Here, not at the top: mailbox brings in the delivery agents (see _read_as).
        from pymailtools.local import mailbox

        return f"{address}: deliverable: {mailbox.describe(config, targets[0].user)}{note}"
    verb = "aliased to" if exp.how == "alias" else "forwarded to"
    return f"{address}: {verb} {', '.join(describe(t) for t in targets) or 'nothing'}{note}"


def delivered_to_loop(message: BinaryIO, recipient: str) -> bool:
    """True when the message's header block already has ``Delivered-To: recipient``: it has
    been here before (Postfix's loop test). Reads at most HEADER_SCAN_LIMIT bytes; the file
    position is restored."""
    want = recipient.strip().strip("<>").lower()
    pos = message.tell()
    message.seek(0)
    try:
        # Most messages name no Delivered-To at all: when the first read holds the whole
        # message, or an empty line (the end of the header block), without one, no need to
        # look line by line.
        head = message.read(_QUICK_LOOK)
        if ((len(head) < _QUICK_LOOK or b"\n\n" in head)
                and b"delivered-to" not in head.lower()):
            return False
        message.seek(0)
        seen, partial = 0, False
        current: list[bytes] | None = None  # the Delivered-To header being collected

        def matches(parts: list[bytes] | None) -> bool:
            if parts is None:
                return False
            value = b" ".join(p.strip() for p in parts).decode("utf-8", "replace")
            return value.strip().strip("<>").strip().lower() == want

        while seen < HEADER_SCAN_LIMIT:
            raw = message.readline(8192)
            if not raw:
                break
            seen += len(raw)
            was_partial, partial = partial, not raw.endswith(b"\n")
            line = raw.rstrip(b"\r\n")
            if was_partial or line[:1] in (b" ", b"\t"):
                if current is not None:  # the rest of a long line, or a folded header
                    current.append(line)
                continue
            if matches(current):
                return True
            if not line:
                return False  # end of the header block
            name, colon, value = line.partition(b":")
            current = [value] if colon and name.strip().lower() == b"delivered-to" else None
        return matches(current)
    finally:
        message.seek(pos)
