"""Postfix-style lookup tables: open ``type:name`` specs and look keys up in Postfix's orders.

Supported types, with Postfix's file syntax so existing files work unchanged:

- ``hash:/path``, ``lmdb:/path``: the text source ``/path``, compiled by ``postmap /path`` into
  an index next to it (``/path.sqlite``); a source newer than its index is an error.
- ``texthash:/path``: the same source format, read directly.
- ``inline:{ k=v, { k = v with spaces } }``, ``static:value``.
- ``regexp:/path``, ``pcre:/path``: ``/re/flags result`` rules with ``if``/``endif``, on
  Python's ``re``; ``$1`` / ``${1}`` / ``$(1)`` substitute groups, ``$$`` is a dollar.

Opened tables are cached by spec and revalidated by their files' identity (inode, size,
mtime), so a long-running process opens a table once and sees an edited file on the next
``open_table``. Only ``os`` is imported at module level: the queue's entry path may load this.
"""

from __future__ import annotations

import os

from pymailtools.errors import EX_TEMPFAIL, ConfigError, MailError

TYPE_CHECKING = False  # typing costs start-up time on sendmail's hot path
if TYPE_CHECKING:
    import re
    import sqlite3
    from collections.abc import Iterator

FIXED_TYPES = ("hash", "lmdb", "texthash", "inline", "static")
PATTERN_TYPES = ("regexp", "pcre")
TYPES = FIXED_TYPES + PATTERN_TYPES

# Suffix of the index ``postmap`` builds next to a hash:/lmdb: source. Not Postfix's ``.db`` /
# ``.lmdb``: a box moved from Postfix keeps its Berkeley DB files beside ours without either
# program mistaking the other's file for its own.
INDEX_SUFFIX = ".sqlite"

# Keys longer than this are not matched against regular expressions (the lookup fails for
# now instead): an SMTP path is at most 256 octets (RFC 5321), a hostname 253, and bounding
# the subject bounds how long a polynomially backtracking pattern such as
# /(.*)\.(.*)\.(.*)@x$/ can run on a hostile address: about 0.3 s at 256 characters, 4 s
# at 512. (A pattern that backtracks exponentially is slow on short keys too; no bound helps.)
MAX_PATTERN_KEY = 256

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class TableError(MailError):
    """A lookup could not be answered (a key too long for a pattern table): try again later (75)."""

    exit_code = EX_TEMPFAIL


def fold(key: str) -> str:
    """Postfix's case folding of fixed-string keys: ASCII letters only, as its lowercase()."""
    return key.translate(_ASCII_LOWER)


class Table:
    """One opened table. ``fixed`` tables match whole strings (Postfix's DICT_FLAG_FIXED) and
    take part in partial lookups (``user``, ``@domain``, parent domains); pattern tables see
    only full keys."""

    spec: str
    fixed: bool = True

    def __init__(self, spec: str) -> None:
        self.spec = spec

    @property
    def label(self) -> str:
        """The table's name in messages, never an inline table's text (see spec_label)."""
        return spec_label(self.spec)

    def get(self, key: str) -> str | None:
        """The value for ``key``, or None."""
        raise NotImplementedError

    def items(self) -> Iterator[tuple[str, str]]:
        """Every key and value, in file order (``postmap -s``); pattern tables have none."""
        raise ConfigError(f"{self.label}: table does not support enumeration")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}>"


class DictTable(Table):
    """A table held as a dict: texthash:, inline:, and the index-less reading of a source."""

    def __init__(self, spec: str, entries: dict[str, str], folded: bool = True) -> None:
        super().__init__(spec)
        self.entries = entries
        self.folded = folded

    def get(self, key: str) -> str | None:
        return self.entries.get(fold(key) if self.folded else key)

    def items(self) -> Iterator[tuple[str, str]]:
        yield from self.entries.items()


class StaticTable(Table):
    """``static:value``: every key finds the same value."""

    def __init__(self, spec: str, value: str) -> None:
        super().__init__(spec)
        self.value = value

    def get(self, key: str) -> str | None:
        return self.value

    def items(self) -> Iterator[tuple[str, str]]:
        return iter(())


# --- the source format shared by hash:, lmdb:, texthash: (postmap(1) "INPUT FILE FORMAT")


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Postfix's readlline(): (first line number, logical line) pairs. Blank lines and lines
    whose first non-blank character is ``#`` are dropped; a line starting with whitespace
    continues the previous logical line."""
    buf: list[str] = []
    start = 0
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.rstrip("\r")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t" and buf:
            buf.append(line)  # joined as is: only the newline goes, as in Postfix
            continue
        if buf:
            yield start, "".join(buf).strip()
        buf, start = [line], lineno
    if buf:
        yield start, "".join(buf).strip()


def parse_entry(line: str) -> tuple[str, str] | None:
    """``key whitespace value``; None when the line has no value or an unbalanced quote.

    Whitespace inside double quotes does not end the key and a backslash protects the next
    character, but both stay in the key: ``"no reply"@example.com`` is looked up with its
    quotes, as an RFC 5322 local part is written (postmap(1), Postfix 3.2 and later)."""
    end, quoted = 0, False
    while end < len(line):
        ch = line[end]
        if ch == "\\":
            end += 1
        elif ch == '"':
            quoted = not quoted
        elif ch.isspace() and not quoted:
            break
        end += 1
    if quoted:
        return None
    key, rest = line[:end], line[end:]
    value = rest.strip()
    if not key or not value:
        return None
    return key, value


def read_source(path: str, spec: str, *, folded: bool = True,
                warn: list[str] | None = None) -> dict[str, str]:
    """The entries of a postmap source file; the first of duplicate keys wins, as Postfix's."""
    text = read_text(path, spec)
    entries: dict[str, str] = {}
    for lineno, line in logical_lines(text):
        entry = parse_entry(line)
        if entry is None:
            if warn is not None:
                warn.append(f"{path}, line {lineno}: expected format: key whitespace value"
                            " -- ignoring this line")
            continue
        key = fold(entry[0]) if folded else entry[0]
        if key in entries:
            if warn is not None:
                warn.append(f"{path}, line {lineno}: duplicate entry: \"{key}\"")
            continue
        entries[key] = entry[1]
    return entries


def read_text(path: str, spec: str) -> str:
    """A table file's text, or a one-line ConfigError naming the spec."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{spec}: cannot open {path}: {e.strerror}") from None
    return data.decode("utf-8", "surrogateescape")


# --- inline: and static:


def spec_label(spec: str) -> str:
    """How errors and logs name a table: ``type:name``, with an inline table's text (and a
    static: value) replaced by ``{...}``, since it may hold passwords
    (smtp_sasl_password_maps = inline:{ host=user:secret })."""
    kind, colon, name = spec.strip().partition(":")
    if not colon:
        return "{...}" if "{" in spec else spec
    if "{" in name or kind == "static":
        return f"{kind}:{{...}}"
    return spec.strip()


def split_top(text: str, seps: str = ", \t\n", *, keep_braces: bool = False) -> list[str]:
    """Split on separators outside braces; a braced element loses its outer braces and the
    blanks just inside them (Postfix's mystrtokq + extpar), unless ``keep_braces`` (a map
    list, whose ``inline:{...}`` specs keep theirs)."""
    parts: list[str] = []
    buf: list[str] = []
    depth = 0
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if depth == 0 and ch in seps:
            if buf:
                parts.append("".join(buf))
                buf = []
            continue
        buf.append(ch)
    if depth != 0:
        # never the text: it may be an inline table holding passwords
        raise ConfigError("unbalanced braces in a table list or inline table")
    if buf:
        parts.append("".join(buf))
    return parts if keep_braces else [unbrace(p) for p in parts]


def unbrace(text: str) -> str:
    """``{ text }`` -> ``text``; anything else unchanged."""
    if text.startswith("{") and text.endswith("}"):
        return text[1:-1].strip()
    return text


def open_inline(spec: str, name: str, folded: bool) -> DictTable:
    if not (name.startswith("{") and name.endswith("}")):
        raise ConfigError(f"{spec_label(spec)}: expected inline:{{ key=value, ... }}")
    entries: dict[str, str] = {}
    for n, item in enumerate(split_top(name[1:-1]), 1):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:  # the entry's text is never quoted: it may be a password
            raise ConfigError(f"{spec_label(spec)}: entry {n} is not key=value")
        entries[fold(key) if folded else key] = value  # the last of duplicates wins, as Postfix
    return DictTable(spec, entries, folded)


# --- opening, caching


_cache: dict[tuple[str, bool], tuple[tuple[tuple[int, int, int], ...], Table]] = {}


def _identity(paths: tuple[str, ...]) -> tuple[tuple[int, int, int], ...]:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            out.append((0, 0, 0))
        else:
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def split_spec(spec: str) -> tuple[str, str]:
    """``"hash:/etc/x"`` -> ``("hash", "/etc/x")``; a bare path is an aliases-style hash."""
    spec = spec.strip()
    kind, colon, name = spec.partition(":")
    if not colon:
        if spec.startswith("/"):
            return "hash", spec
        raise ConfigError(f"{spec_label(spec)}: expected type:name, e.g. hash:/etc/postfix/virtual")
    if kind not in TYPES:
        raise ConfigError(f"{spec_label(spec)}: unsupported table type {kind!r} "
                          f"(supported: {', '.join(TYPES)})")
    if not name:
        raise ConfigError(f"{spec_label(spec)}: missing table name after {kind}:")
    return kind, name


def spec_of(name: str, default: str = "hash") -> str:
    """A command-line table name: ``type:name`` as given, a bare file name as ``hash:file``
    (Postfix's default_database_type)."""
    kind, colon, _ = name.partition(":")
    if colon and kind.isalnum():
        return name
    return f"{default}:{name}"


def open_table(spec: str, *, folded: bool = True) -> Table:
    """Open ``type:name`` (cached). ``folded=False`` is ``postmap -f``: keys keep their case.
    ConfigError on anything wrong: unknown type, unreadable or missing file, stale index, a
    bad rule (with file:line)."""
    kind, name = split_spec(spec)
    files: tuple[str, ...] = ()
    if kind in ("hash", "lmdb"):
        files = (name, name + INDEX_SUFFIX)
    elif kind in ("texthash", "regexp", "pcre"):
        files = (name,)
    ident = _identity(files)
    hit = _cache.get((spec, folded))
    if hit is not None and hit[0] == ident and all(i != (0, 0, 0) for i in ident):
        return hit[1]
    table: Table
    if kind in ("hash", "lmdb"):
        table = IndexTable.open(spec, name, folded)
    elif kind == "texthash":
        table = DictTable(spec, read_source(name, spec, folded=folded), folded)
    elif kind == "inline":
        table = open_inline(spec, name, folded)
    elif kind == "static":
        table = StaticTable(spec, unbrace(name))
    else:
        table = PatternTable.load(spec, name, pcre=kind == "pcre")
    if files:
        _cache[(spec, folded)] = (ident, table)
    return table


# --- hash: and lmdb: through an index


class IndexTable(Table):
    """hash:/lmdb: — the compiled index of a postmap source.

    The index is an SQLite file: the standard library always has sqlite3 (dbm's backends vary
    by build and dbm.dumb is slow and not crash-safe), a reader sees either the old or the new
    file whole because ``postmap`` writes a temporary and renames it, and one file holds both
    the entries and how they were built (case folded or not)."""

    def __init__(self, spec: str, db: sqlite3.Connection, folded: bool) -> None:
        super().__init__(spec)
        self.db = db
        self.folded = folded

    @classmethod
    def open(cls, spec: str, source: str, folded: bool) -> IndexTable:
        import sqlite3

        index = source + INDEX_SUFFIX
        try:
            src_st = os.stat(source)
        except OSError as e:
            raise ConfigError(f"{spec}: cannot open {source}: {e.strerror}") from None
        try:
            idx_st = os.stat(index)
        except FileNotFoundError:
            raise ConfigError(f"{spec}: no index {index}: run postmap {source}") from None
        except OSError as e:
            raise ConfigError(f"{spec}: cannot open {index}: {e.strerror}") from None
        if src_st.st_mtime_ns > idx_st.st_mtime_ns:
            raise ConfigError(f"{spec}: index {index} is older than source file {source}: "
                              f"run postmap {source}")
        try:
            db = sqlite3.connect(f"file:{_uri_path(index)}?mode=ro", uri=True,
                                 check_same_thread=False)
            db.execute("SELECT count(*) FROM entries WHERE 0").fetchall()
        except sqlite3.Error as e:
            raise ConfigError(f"{spec}: cannot read index {index}: {e}") from None
        return cls(spec, db, folded)

    def get(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM entries WHERE key = ?",
                              (fold(key) if self.folded else key,)).fetchone()
        return None if row is None else str(row[0])

    def items(self) -> Iterator[tuple[str, str]]:
        for key, value in self.db.execute("SELECT key, value FROM entries ORDER BY rowid"):
            yield str(key), str(value)


def _uri_path(path: str) -> str:
    from urllib.parse import quote

    return quote(os.path.abspath(path))


def build_index(source: str, *, folded: bool = True, keep_mode: bool = True) -> list[str]:
    """``postmap FILE``: compile ``FILE`` into ``FILE.sqlite`` (written aside and renamed into
    place, so a reader never sees half an index), with the source's permission bits unless
    ``keep_mode`` is off (``postmap -p``). Returns Postfix-style warnings (malformed lines,
    duplicate keys). ConfigError when the source cannot be read or the index written."""
    import sqlite3

    warnings: list[str] = []
    entries = read_source(source, f"postmap {source}", folded=folded, warn=warnings)
    index = source + INDEX_SUFFIX
    tmp = f"{index}.{os.getpid()}.tmp"
    try:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        # Created 0600 before sqlite opens it: a table of passwords is never readable by others,
        # not even while it is being written (its final mode follows the source below).
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        db = sqlite3.connect(tmp)
        try:
            db.execute("PRAGMA journal_mode = OFF")
            db.execute("CREATE TABLE entries (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.executemany("INSERT INTO entries VALUES (?, ?)", entries.items())
            db.commit()
        finally:
            db.close()
        if keep_mode:
            os.chmod(tmp, os.stat(source).st_mode & 0o777)
        os.replace(tmp, index)
    except (OSError, sqlite3.Error) as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        reason = e.strerror if isinstance(e, OSError) else str(e)
        raise ConfigError(f"cannot create {index}: {reason}") from None
    return warnings


# --- regexp: and pcre:


class Rule:
    """One line of a pattern table: a rule with a result, or an ``if``/``endif`` marker."""

    __slots__ = ("regex", "negated", "result", "kind", "skip_to", "where")

    def __init__(self, regex: re.Pattern[str] | None, negated: bool, result: str, kind: str,
                 where: str) -> None:
        self.regex = regex
        self.negated = negated
        self.result = result
        self.kind = kind  # "rule", "if", "endif"
        self.skip_to = 0  # for "if": the index just past its endif
        self.where = where


class PatternTable(Table):
    """regexp:/pcre: — rules tried in file order against the whole key, ``$n`` substituted."""

    fixed = False

    def __init__(self, spec: str, rules: list[Rule]) -> None:
        super().__init__(spec)
        self.rules = rules

    @classmethod
    def load(cls, spec: str, path: str, pcre: bool) -> PatternTable:
        if path.startswith("{"):
            # regexp:{ {rule}, {rule} }: each braced element is one line of a table
            if not path.endswith("}"):
                raise ConfigError(f"{spec_label(spec)}: expected {{ {{rule}}, {{rule}} ... }}")
            text = "\n".join(split_top(path[1:-1]))
            return cls(spec, parse_rules(text, spec_label(spec), pcre))
        return cls(spec, parse_rules(read_text(path, spec), path, pcre))

    def get(self, key: str) -> str | None:
        if len(key) > MAX_PATTERN_KEY:
            raise TableError(f"{self.label}: lookup key longer than {MAX_PATTERN_KEY} "
                             f"characters not matched")
        rules = self.rules
        i = 0
        while i < len(rules):
            rule = rules[i]
            if rule.kind == "endif":
                i += 1
                continue
            assert rule.regex is not None
            m = rule.regex.search(key)
            if rule.kind == "if":
                i = i + 1 if (m is None) == rule.negated else rule.skip_to
                continue
            if rule.negated:
                if m is None:
                    return rule.result
            elif m is not None:
                # an empty result means "not found" (Postfix warns that it is not allowed)
                return expand(rule.result, m) or None
            i += 1
        return None


def expand(result: str, m: re.Match[str]) -> str:
    """Substitute ``$n``, ``${n}``, ``$(n)`` by group n (empty if it did not take part);
    ``$$`` is ``$``."""
    if "$" not in result:
        return result
    out: list[str] = []
    for kind, text in parse_result(result, "", 0):
        out.append(text if kind == "text" else (m.group(int(text)) or ""))
    return "".join(out)


def parse_result(result: str, where: str, ngroups: int) -> list[tuple[str, str]]:
    """Split a result into ("text", s) and ("group", digits) pieces. When ``where`` is given
    (loading a table), what Postfix rejects as bad replacement syntax is a ConfigError naming
    it: a ``$`` with no name after it, an unclosed ``${``, a non-numeric or out-of-range
    ``$name``."""
    pieces: list[tuple[str, str]] = []
    i, n = 0, len(result)
    buf: list[str] = []
    while i < n:
        ch = result[i]
        if ch != "$":
            buf.append(ch)
            i += 1
            continue
        nxt = result[i + 1] if i + 1 < n else ""
        if nxt == "$":
            buf.append("$")
            i += 2
            continue
        if nxt and nxt in "{(":
            close = "}" if nxt == "{" else ")"
            end = result.find(close, i + 2)
            if end < 0:
                if where:
                    # never the result itself: it may be a password
                    raise ConfigError(f"{where}: missing '{close}' in result")
                buf.append(ch)
                i += 1
                continue
            name, i = result[i + 2 : end], end + 1
        elif nxt and (nxt.isalnum() or nxt == "_"):
            j = i + 1
            while j < n and (result[j].isalnum() or result[j] == "_"):
                j += 1
            name, i = result[i + 1 : j], j
        else:
            if where:
                raise ConfigError(f"{where}: empty macro name after $ in result "
                                  "(write $$ for a dollar sign)")
            buf.append(ch)
            i += 1
            continue
        if where:
            if not name.isdigit():  # the name is part of the result: not quoted
                raise ConfigError(f"{where}: non-numeric replacement index in result")
            if int(name) > ngroups:
                raise ConfigError(f"{where}: out-of-range replacement index ${name}")
        if buf:
            pieces.append(("text", "".join(buf)))
            buf = []
        pieces.append(("group", name))
    if buf:
        pieces.append(("text", "".join(buf)))
    return pieces


def parse_rules(text: str, path: str, pcre: bool) -> list[Rule]:
    """A regexp_table(5) / pcre_table(5) file, checked whole: any bad line is a ConfigError
    with file:line (Postfix warns and skips such a line; a rule silently missing from a table
    that routes or rewrites mail is worse than refusing to start)."""
    rules: list[Rule] = []
    open_ifs: list[int] = []
    for lineno, line in logical_lines(text):
        where = f"{path}:{lineno}"
        word = line[:5].lower()
        if word == "endif" and (len(line) == 5 or not line[5].isalnum()):
            if line[5:].strip():
                raise ConfigError(f"{where}: text after endif")
            if not open_ifs:
                raise ConfigError(f"{where}: endif without if")
            rules[open_ifs.pop()].skip_to = len(rules) + 1
            rules.append(Rule(None, False, "", "endif", where))
            continue
        kind = "rule"
        body = line
        if word[:2] == "if" and len(line) > 2 and not line[2].isalnum():
            kind, body = "if", line[2:]
        elif line[0].isalnum():
            raise ConfigError(f"{where}: expected /pattern/ result, if or endif")
        negated, source, flags, rest = split_pattern(body, where)
        regex = compile_pattern(source, flags, pcre, where)
        if kind == "if":
            if rest:
                raise ConfigError(f"{where}: text after if /pattern/")
            open_ifs.append(len(rules))
            rules.append(Rule(regex, negated, "", "if", where))
            continue
        pieces = parse_result(rest, where, regex.groups)
        if negated and any(k == "group" for k, _ in pieces):
            raise ConfigError(f"{where}: $number in a negated (!) pattern's result")
        rules.append(Rule(regex, negated, rest, "rule", where))
    if open_ifs:
        raise ConfigError(f"{rules[open_ifs[-1]].where}: if without endif")
    return rules


def split_pattern(body: str, where: str) -> tuple[bool, str, str, str]:
    """``[!]/re/flags result`` -> (negated, re, flags, result)."""
    negated, i = False, 0
    while i < len(body) and (body[i] == "!" or body[i].isspace()):
        if body[i] == "!":
            negated = not negated
        i += 1
    if i >= len(body):
        raise ConfigError(f"{where}: no regexp")
    delim = body[i]
    if delim.isalnum():
        raise ConfigError(f"{where}: a pattern starts with a delimiter such as /, not "
                          f"{delim!r}")
    j = i + 1
    while j < len(body) and body[j] != delim:
        j += 2 if body[j] == "\\" and j + 1 < len(body) else 1
    if j >= len(body):
        raise ConfigError(f"{where}: no closing regexp delimiter \"{delim}\"")
    source = body[i + 1 : j]
    k = j + 1
    while k < len(body) and not body[k].isspace():
        k += 1
    return negated, source, body[j + 1 : k], body[k:].strip()


def compile_pattern(source: str, flags: str, pcre: bool, where: str) -> re.Pattern[str]:
    """Compile one pattern with Postfix's flag toggles (i on by default for both types; x is
    POSIX extended syntax, on by default, for regexp: and verbose, off, for pcre:)."""
    import re as re_mod

    opts = re_mod.IGNORECASE | (re_mod.DOTALL if pcre else 0)
    multiline = False
    extended = True  # regexp: POSIX ERE by default; pcre: verbose off by default
    verbose = False
    for f in flags:
        if f == "i":
            opts ^= re_mod.IGNORECASE
        elif f == "m":
            multiline = not multiline
        elif f == "x" and not pcre:
            extended = not extended
        elif f == "x" and pcre:
            verbose = not verbose
        elif pcre and f == "s":
            opts ^= re_mod.DOTALL
        elif pcre and f in "AEX":
            # A anchors (done by prefixing \A); E and X change nothing for keys without
            # newlines, which addresses and domains never contain. U (ungreedy) has no
            # counterpart in Python's re and is refused below.
            if f == "A":
                source = r"\A(?:" + source + ")"
        elif pcre and f == "U":
            raise ConfigError(f"{where}: regexp option \"U\" (ungreedy) is not supported: "
                              "write lazy quantifiers (*?, +?) instead")
        else:
            raise ConfigError(f"{where}: unknown regexp option \"{f}\"")
    if multiline:
        opts |= re_mod.MULTILINE
    if verbose:
        opts |= re_mod.VERBOSE
    if not pcre and not multiline:
        opts |= re_mod.DOTALL  # POSIX: without REG_NEWLINE, '.' and [^...] match a newline
    source = posix_to_python(source, extended, where, pcre)
    import warnings

    try:
        with warnings.catch_warnings():
            # "possible nested set" and the like: valid POSIX/PCRE, and nothing an admin
            # reading the mail log could act on
            warnings.simplefilter("ignore", FutureWarning)
            return re_mod.compile(source, opts)
    except re_mod.error as e:
        raise ConfigError(f"{where}: bad regular expression /{source}/: {e}") from None


_POSIX_CLASSES = {
    "alpha": "a-zA-Z", "digit": "0-9", "alnum": "a-zA-Z0-9", "upper": "A-Z", "lower": "a-z",
    "space": r" \t\n\r\f\v", "blank": r" \t", "punct": r"!-/:-@\[-`{-~", "xdigit": "0-9A-Fa-f",
    "cntrl": r"\x00-\x1f\x7f", "print": r"\x20-\x7e", "graph": r"\x21-\x7e",
}


def posix_to_python(source: str, extended: bool, where: str, pcre: bool = False) -> str:
    """Rewrite a POSIX regular expression (ERE, or BRE when ``extended`` is off) for Python's
    ``re``: bracket expressions (``[[:alpha:]]``, a literal backslash, ``]`` first), GNU's
    ``\\<``/``\\>`` word edges, and BRE's escaped operators. Python picks the first matching
    alternative where POSIX picks the longest; the difference shows only in captures.
    With ``pcre``, only the ``[:class:]`` names inside brackets are rewritten (PCRE has them,
    Python's re does not); backslashes keep their PCRE meaning."""
    out: list[str] = []
    i, n = 0, len(source)
    while i < n:
        ch = source[i]
        if ch == "[":
            j = i + 1
            parts = ["["]
            if j < n and source[j] == "^":
                parts.append("^")
                j += 1
            if j < n and source[j] == "]":
                parts.append(r"\]")
                j += 1
            while j < n and source[j] != "]":
                if source.startswith("[:", j):
                    end = source.find(":]", j + 2)
                    name = source[j + 2 : end] if end > 0 else ""
                    if name not in _POSIX_CLASSES:
                        raise ConfigError(f"{where}: bad character class [:{name}:]")
                    parts.append(_POSIX_CLASSES[name])
                    j = end + 2
                    continue
                c = source[j]
                if pcre and c == "\\" and j + 1 < n:
                    parts.append(source[j : j + 2])
                    j += 2
                    continue
                parts.append("\\" + c if c in "\\[" else c)
                j += 1
            if j >= n:
                raise ConfigError(f"{where}: unterminated [ in regular expression")
            parts.append("]")
            out.append("".join(parts))
            i = j + 1
            continue
        if ch == "\\" and i + 1 < n and pcre:
            out.append(source[i : i + 2])
            i += 2
            continue
        if ch == "\\" and i + 1 < n:
            nxt = source[i + 1]
            if nxt == "<":
                out.append(r"\b(?=\w)")
            elif nxt == ">":
                out.append(r"\b(?<=\w)")
            elif not extended and nxt in "(){}|+?":
                out.append(nxt)
            elif nxt.isalnum() and nxt not in "wWsSbB" and not nxt.isdigit():
                out.append(nxt)  # glibc: an unknown escaped letter is the letter itself
            else:
                out.append(source[i : i + 2])
            i += 2
            continue
        if not extended and ch in "(){}|+?":
            out.append("\\" + ch)
        else:
            out.append(ch)
        i += 1
    return "".join(out)


# --- lists of tables, and Postfix's lookup orders


class Tables:
    """An ordered list of tables, searched in order (a Postfix "maps" parameter)."""

    def __init__(self, tables: list[Table]) -> None:
        self.tables = tables

    def __bool__(self) -> bool:
        return bool(self.tables)

    def __repr__(self) -> str:
        return f"<Tables {', '.join(t.label for t in self.tables)}>"

    def get(self, key: str, *, fixed_only: bool = False) -> str | None:
        """The first table's answer. ``fixed_only`` skips pattern tables, as Postfix does for
        partial keys (``user``, ``@domain``, ``.parent.domain``)."""
        for table in self.tables:
            if fixed_only and not table.fixed:
                continue
            value = table.get(key)
            if value is not None:
                return value
        return None


def open_tables(value: str | list[str], *, folded: bool = True) -> Tables:
    """From a config value (``"hash:/a, regexp:/b"`` or a list); empty finds nothing."""
    specs: list[str] = []
    for item in [value] if isinstance(value, str) else value:
        specs.extend(split_top(item, keep_braces=True))
    return Tables([open_table(s, folded=folded) for s in specs if s])


# Postfix never splits these at the recipient delimiter
_NO_SPLIT = ("postmaster", "mailer-daemon", "double-bounce")


def split_extension(localpart: str, delimiter: str) -> tuple[str, str | None]:
    """``user+ext`` -> ("user", "ext") at the first of ``delimiter``'s characters, as
    Postfix's split_addr: never for postmaster, MAILER-DAEMON, double-bounce, nor (with "-"
    among the delimiters) owner-foo and foo-request, nor when the user part would be empty."""
    if not delimiter:
        return localpart, None
    low = fold(localpart)
    if low in _NO_SPLIT:
        return localpart, None
    if "-" in delimiter and (low.startswith("owner-") or
                             (len(low) > 8 and low.endswith("-request"))):
        return localpart, None
    for i, ch in enumerate(localpart):
        if ch in delimiter:
            if i == 0:
                return localpart, None
            return localpart[:i], localpart[i + 1 :]
    return localpart, None


def find_address(maps: Tables, address: str, *, delimiter: str = "",
                 local: bool = False) -> str | None:
    """Postfix's address lookup order (mail_addr_find): ``user+ext@domain``, ``user@domain``,
    then only when ``local`` (the domain is one of ours) ``user+ext``, ``user``; then
    ``@domain``. Pattern tables see only the full address. ``delimiter`` is
    recipient_delimiter ("" = no extension handling). An address without a domain is local."""
    found = find_address_key(maps, address, delimiter=delimiter, local=local)
    return None if found is None else found[0]


def find_address_key(maps: Tables, address: str, *, delimiter: str = "",
                     local: bool = False) -> tuple[str, str] | None:
    """As find_address, with the key that matched: (value, key). A caller tells from the key
    whether the extension was stripped to match (``user@domain``, ``user``) or not."""
    user, at, domain = address.rpartition("@")
    if not at:
        user, domain, local = address, "", True
    bare, ext = split_extension(user, delimiter)
    keys: list[tuple[str, bool]] = [(address, False)]  # (key, fixed tables only)
    if domain:
        if ext is not None:
            keys.append((f"{bare}@{domain}", True))
        if local:
            if ext is not None:
                keys.append((user, True))
            keys.append((bare, True))
        keys.append((f"@{domain}", True))
    elif ext is not None:
        keys.append((bare, True))
    for key, fixed_only in keys:
        value = maps.get(key, fixed_only=fixed_only)
        if value is not None:
            return value, key
    return None


def find_domain(maps: Tables, domain: str) -> str | None:
    """transport(5)'s domain lookup: ``domain`` itself, then ``.parent.domain`` forms from the
    nearest parent up (``a.b.example`` -> ``.b.example``, ``.example``). Fixed tables only: a
    pattern table is consulted with the full address by the caller."""
    domain = domain.rstrip(".")
    if not domain:
        return None
    value = maps.get(domain, fixed_only=True)
    if value is not None:
        return value
    i = domain.find(".", 1)
    while i >= 0:
        value = maps.get(domain[i:], fixed_only=True)
        if value is not None:
            return value
        i = domain.find(".", i + 1)
    return None
