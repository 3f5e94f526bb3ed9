"""aliases(5) files: parse names and values, remember whether each file is trusted, cache them."""

import os
import shlex
import stat
from typing import Literal, NamedTuple

from pymailtools.errors import DeliveryError
from pymailtools.log import library_warning

Kind = Literal["address", "file", "command", "include"]

# Characters a shell would interpret. We never run a shell, so a command that relies on one
# (redirection, pipes, variables) is refused instead of being run with those words as arguments.
_SHELL_META = frozenset("|&;<>()$`")


class AliasValue(NamedTuple):
    """One destination on the right-hand side of an alias, a .forward or an :include: file."""

    kind: Kind
    value: str  # address, absolute path, command line (without the "|"), or include path
    argv: tuple[str, ...]  # command words (shlex, no shell); () for other kinds
    error: str  # why this value cannot be used ("" when it can), reported when it is reached
    source: str  # "path:line", for messages
    trusted: bool  # the file is root-owned and not group/world-writable
    owner: int  # uid owning the file, whose rights (or nobody's, for root) commands get


class AliasMap(NamedTuple):
    """A parsed alias file: lower-cased names to values, plus what looked wrong in it."""

    path: str
    entries: dict[str, tuple[AliasValue, ...]]
    trusted: bool
    owner: int
    warnings: tuple[str, ...]


def is_trusted(st: os.stat_result) -> bool:
    """Root-owned and writable by nobody else: only then may it name commands and files."""
    return st.st_uid == 0 and not st.st_mode & 0o022


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes (backslash escapes inside quotes)."""
    parts, buf, quoted, i = [], [], False, 0
    while i < len(text):
        ch = text[i]
        if quoted and ch == "\\" and i + 1 < len(text):
            buf.append(text[i : i + 2])
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append("".join(buf))
            buf = []
            i += 1
            continue
        buf.append(ch)
        i += 1
    parts.append("".join(buf))
    return parts


def unquote(text: str) -> str | None:
    """The content of ``"..."`` when the whole of ``text`` is one quoted string, else None."""
    if len(text) < 2 or text[0] != '"':
        return None
    out, i = [], 1
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
            continue
        if ch == '"':
            return "".join(out) if i == len(text) - 1 else None
        out.append(ch)
        i += 1
    return None


def shell_syntax(command: str) -> str | None:
    """The first shell metacharacter outside single quotes (``$`` and backquote count inside
    double quotes too), or None when shlex words mean exactly what a shell would run."""
    state, i = "", 0
    while i < len(command):
        ch = command[i]
        if state == "'":
            if ch == "'":
                state = ""
        elif ch == "\\":
            i += 1
        elif state == '"':
            if ch == '"':
                state = ""
            elif ch in "$`":
                return ch
        elif ch in "'\"":
            state = ch
        elif ch in _SHELL_META:
            return ch
        i += 1
    return None


def _command_argv(command: str) -> tuple[tuple[str, ...], str]:
    meta = shell_syntax(command)
    if meta:
        return (), (f"command uses shell syntax ({meta!r}), which is not supported "
                    f"(no shell is run): |{command}")
    try:
        argv = tuple(shlex.split(command))
    except ValueError as e:
        return (), f"cannot parse command ({e}): |{command}"
    if not argv:
        return (), "empty command"
    if not argv[0].startswith("/"):
        return (), f"command must be an absolute path: |{command}"
    return argv, ""


def parse_value(text: str, *, source: str, trusted: bool, owner: int) -> AliasValue | None:
    """Classify one destination: ``|command``, ``/file``, ``:include:/path`` or an address.

    A value wholly in double quotes (``"|cmd with args"``, ``"/path with space"``) is unquoted
    first; ``"a b"@host`` stays an address."""
    text = text.strip()
    if not text:
        return None
    inner = unquote(text)
    body = inner if inner is not None else text
    if body.startswith("<") and body.endswith(">"):
        body = body[1:-1].strip()

    def make(kind: Kind, value: str, argv: tuple[str, ...] = (), error: str = "") -> AliasValue:
        return AliasValue(kind, value, argv, error, source, trusted, owner)

    if body.startswith("|"):
        argv, error = _command_argv(body[1:].strip())
        return make("command", body[1:].strip(), argv, error)
    if body.startswith("/"):
        return make("file", body)
    if body[:9].lower() == ":include:":
        path = body[9:].strip()
        error = "" if path.startswith("/") else f"include path must be absolute: {body}"
        return make("include", path, error=error)
    # A quoted local part keeps its quotes; anything else is the address itself.
    return make("address", text if inner is not None and "@" not in inner else body)


def parse_values(text: str, *, source: str, trusted: bool, owner: int,
                 first_line: int = 1) -> list[AliasValue]:
    """Destinations separated by commas or line breaks, as in .forward and :include: files;
    lines whose first non-blank character is ``#`` are comments."""
    values = []
    for n, line in enumerate(text.splitlines(), first_line):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        for part in _split_top(line, ","):
            v = parse_value(part, source=f"{source}:{n}", trusted=trusted, owner=owner)
            if v is not None:
                values.append(v)
    return values


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each entry: a line starting with white space continues the
    previous one; blank and comment lines are skipped without ending an entry (Postfix)."""
    out: list[tuple[int, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t" and out:
            out[-1] = (out[-1][0], out[-1][1] + " " + line.strip())
        else:
            out.append((n, line.strip()))
    return out


def _split_name(entry: str) -> tuple[str, str] | None:
    """("name", "values") split at the first colon outside a quoted name."""
    if entry.startswith('"'):
        end, i = -1, 1
        while i < len(entry):
            if entry[i] == "\\":
                i += 2
                continue
            if entry[i] == '"':
                end = i
                break
            i += 1
        if end < 0:
            return None
        name = unquote(entry[: end + 1])
        rest = entry[end + 1 :].lstrip()
        if name is None or not rest.startswith(":"):
            return None
        return name, rest[1:]
    name, colon, rest = entry.partition(":")
    if not colon:
        return None
    return name.strip(), rest


def parse(text: str, *, path: str, trusted: bool, owner: int) -> AliasMap:
    """Parse the text of an aliases(5) file. Bad lines become warnings, not errors, so that one
    typo does not stop mail to every other alias; the first of duplicate names wins (postalias)."""
    entries: dict[str, tuple[AliasValue, ...]] = {}
    warnings = []
    for n, entry in _logical_lines(text):
        split = _split_name(entry)
        if split is None:
            warnings.append(f"{path}:{n}: missing colon after the name: {entry[:60]!r}")
            continue
        name, rest = split
        name = name.lower()
        if not name:
            warnings.append(f"{path}:{n}: empty name")
            continue
        if name in entries:
            warnings.append(f"{path}:{n}: duplicate entry {name!r} ignored")
            continue
        values = tuple(parse_values(rest, source=path, trusted=trusted, owner=owner,
                                    first_line=n))
        if not values:
            warnings.append(f"{path}:{n}: no destination for {name!r}")
            continue
        entries[name] = values
    return AliasMap(path, entries, trusted, owner, tuple(warnings))


_Key = tuple[int, int, int, int, int]
_cache: dict[str, tuple[_Key, AliasMap]] = {}


def _key(st: os.stat_result) -> _Key:
    # ctime too: a chown or chmod changes whether the file is trusted but not its mtime.
    return (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size, st.st_ctime_ns)


def strip_type(path: str) -> str:
    """Accept Postfix's ``hash:/etc/aliases`` spelling: we always read the text file."""
    kind, colon, rest = path.partition(":")
    if colon and kind in ("hash", "btree", "lmdb", "cdb", "dbm", "texthash") and rest:
        return rest
    return path


def load(path: str) -> AliasMap:
    """Parse an alias file, from the cache when unchanged. A missing file has no aliases; one
    that cannot be read raises DeliveryError 4.3.0 (mail waits instead of being misrouted)."""
    path = strip_type(path)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        _cache.pop(path, None)
        return AliasMap(path, {}, True, 0, ())
    except OSError as e:
        raise DeliveryError(f"cannot read alias file {path}: {e.strerror}", "4.3.0") from None
    hit = _cache.get(path)
    if hit and hit[0] == _key(st):
        return hit[1]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return AliasMap(path, {}, True, 0, ())
    except OSError as e:
        raise DeliveryError(f"cannot read alias file {path}: {e.strerror}", "4.3.0") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise DeliveryError(f"alias file {path} is not a regular file", "4.3.5")
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    amap = parse(data.decode("utf-8", "surrogateescape"), path=path, trusted=is_trusted(st),
                 owner=st.st_uid)
    for w in amap.warnings:
        library_warning(__name__, w)
    _cache[path] = (_key(st), amap)
    return amap


def format_values(values: tuple[AliasValue, ...]) -> str:
    """The destinations as an alias file would write them (``postalias -q``, ``-s``)."""
    prefix = {"address": "", "file": "", "command": "|", "include": ":include:"}
    out = []
    for v in values:
        text = prefix[v.kind] + v.value
        out.append(f'"{text}"' if v.kind != "address" and ("," in text or " " in text)
                   else text)
    return ", ".join(out)


def lookup(alias_maps: list[str], name: str) -> tuple[AliasValue, ...] | None:
    """The values of ``name`` (case-insensitive) in the first map that has it, else None."""
    key = name.lower()
    for path in alias_maps:
        values = load(path).entries.get(key)
        if values is not None:
            return values
    return None
