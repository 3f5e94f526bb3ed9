"""postmap and postalias: build lookup table indexes, query tables, dump them (Postfix's syntax)."""

from __future__ import annotations

import sys

from pymailtools import tables
from pymailtools.cli.common import getopt, run_main
from pymailtools.errors import EX_OK, ConfigError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

# Postfix's own option letters. -N/-n (a NUL byte after keys), -o (keep root privileges),
# -v (verbose) and -c (the directory of main.cf) change nothing here: our index has no NUL
# convention, we never switch users, and a table needs no configuration.
POSTMAP_OPTS = "Nc:fnopq:rsvw"
POSTMAP_USAGE = "usage: postmap [-fNnoprsvw] [-c config_dir] [-q key] [-s] [type:]file..."
POSTALIAS_OPTS = "Nc:fnopq:rsvw"
POSTALIAS_USAGE = "usage: postalias [-fNnoprsvw] [-c config_dir] [-q key] [-s] [type:]file..."
NOT_FOUND = 1  # postmap -q, as Postfix's: exit 1 when no key was found


class Options:
    """What the command line asked for."""

    def __init__(self) -> None:
        self.folded = True
        self.query: str | None = None
        self.dump = False
        self.keep_mode = True
        self.warn_duplicates = True
        self.tables: list[str] = []


def parse(args: list[str], optstring: str, usage: str) -> Options:
    opts, first = getopt(args, optstring, usage=f"\n{usage}")
    o = Options()
    for flag, value in opts:
        if flag == "f":
            o.folded = False
        elif flag == "q":
            o.query = value
        elif flag == "s":
            o.dump = True
        elif flag == "p":
            o.keep_mode = False
        elif flag in "rw":
            o.warn_duplicates = False
    o.tables = args[first:]
    if not o.tables:
        raise UsageError(usage)
    if o.query is not None and o.dump:
        raise UsageError("specify only one of -q and -s")
    return o


def _write(line: str) -> None:
    sys.stdout.buffer.write(line.encode("utf-8", "surrogateescape"))


def _stdin_keys() -> Iterator[str]:
    for raw in sys.stdin.buffer:
        key = raw.decode("utf-8", "surrogateescape").rstrip("\r\n")
        if key:
            yield key


# --- postmap


def postmap(o: Options) -> int:
    if o.query is not None:
        maps = [tables.open_table(tables.spec_of(t), folded=o.folded) for t in o.tables]
        return _query(o.query, lambda key: tables.Tables(maps).get(key))
    if o.dump:
        for t in o.tables:
            for key, value in tables.open_table(tables.spec_of(t), folded=o.folded).items():
                _write(f"{key}\t{value}\n")
        return EX_OK
    for t in o.tables:
        kind, name = tables.split_spec(tables.spec_of(t))
        if kind not in ("hash", "lmdb"):
            raise ConfigError(f"{kind}:{name}: a {kind}: table has no index to build "
                              "(postmap builds hash: and lmdb:)")
        for warning in tables.build_index(name, folded=o.folded, keep_mode=o.keep_mode):
            if o.warn_duplicates or "duplicate entry" not in warning:
                print(f"postmap: warning: {warning}", file=sys.stderr)
    return EX_OK


def _query(key: str, lookup: Callable[[str], str | None]) -> int:
    """``-q KEY`` prints the value; ``-q -`` prints ``key<TAB>value`` for each stdin key
    found. Exit 0 when something was found, 1 when nothing was."""
    if key != "-":
        value = lookup(key)
        if value is None:
            return NOT_FOUND
        _write(value + "\n")
        return EX_OK
    found = False
    for k in _stdin_keys():
        value = lookup(k)
        if value is not None:
            _write(f"{k}\t{value}\n")
            found = True
    return EX_OK if found else NOT_FOUND


# --- postalias: aliases(5) files, through the parser local delivery uses


def postalias(o: Options) -> int:
    from pymailtools.local import aliases
    from pymailtools.qmgr.verify import check_aliases

    paths = [aliases.strip_type(t) for t in o.tables]
    if o.query is not None:
        maps = [aliases.load(p) for p in paths]

        def lookup(key: str) -> str | None:
            name = key.lower()
            for amap in maps:
                values = amap.entries.get(name)
                if values is not None:
                    return aliases.format_values(values)
            return None

        return _query(o.query, lookup)
    if o.dump:
        for p in paths:
            for name, values in aliases.load(p).entries.items():
                _write(f"{name}: {aliases.format_values(values)}\n")
        return EX_OK
    # Local delivery reads alias files directly (always current), so there is no database to
    # build: postalias and newaliases check the files and report what is wrong, as sendmail -bi.
    return check_aliases(paths, "postalias")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv if argv is None else argv
    return run_main("postmap", lambda: postmap(parse(args[1:], POSTMAP_OPTS, POSTMAP_USAGE)))


def main_postalias(argv: list[str] | None = None) -> int:
    args = sys.argv if argv is None else argv
    return run_main("postalias",
                    lambda: postalias(parse(args[1:], POSTALIAS_OPTS, POSTALIAS_USAGE)))
