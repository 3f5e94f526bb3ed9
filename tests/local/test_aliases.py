"""aliases(5) parsing, trust (root-owned, not group/world-writable) and the per-file cache."""

import os
import pwd
from pathlib import Path

import pytest

from pymailtools.errors import DeliveryError
from pymailtools.local import aliases, pipe
from tests.conftest import need_root


def parse(text: str, trusted: bool = True) -> aliases.AliasMap:
    return aliases.parse(text, path="/etc/aliases", trusted=trusted, owner=0)


def values(amap: aliases.AliasMap, name: str) -> list[tuple[str, str]]:
    return [(v.kind, v.value) for v in amap.entries[name]]


def test_simple_entries_and_multiple_values() -> None:
    amap = parse("postmaster: root\nroot: alice, bob@example.com\n")
    assert values(amap, "postmaster") == [("address", "root")]
    assert values(amap, "root") == [("address", "alice"), ("address", "bob@example.com")]
    assert amap.warnings == ()


def test_continuation_lines_and_comments() -> None:
    text = (
        "# the staff list\n"
        "staff: alice,\n"
        "  bob,\n"
        "# a comment inside an entry does not end it\n"
        "\n"
        "\tcarol\n"
        "other: dave\n"
        "    # indented comment\n"
    )
    amap = parse(text)
    assert values(amap, "staff") == [("address", "alice"), ("address", "bob"),
                                     ("address", "carol")]
    assert values(amap, "other") == [("address", "dave")]
    assert amap.entries["staff"][0].source == "/etc/aliases:2"


def test_names_are_case_insensitive_and_quoted_names(tmp_path: Path) -> None:
    amap = parse('Root: alice\n"John Doe": john\n"odd:name": x\n')
    assert set(amap.entries) == {"root", "john doe", "odd:name"}
    path = tmp_path / "aliases"
    path.write_text("MixedCase: alice\n")
    assert aliases.lookup([str(path)], "MIXEDCASE") is not None
    assert aliases.lookup([str(path)], "mixedcase") is not None


def test_value_kinds() -> None:
    amap = parse(
        "a: /var/log/mail.archive\n"
        "b: |/usr/bin/logger -t mail\n"
        "c: \"|/usr/bin/foo --opt 'a b', c\", d\n"
        "d: :include:/etc/mail/list\n"
        "e: :INCLUDE: /etc/mail/other\n"
        'f: "/path with space"\n'
        'g: "john doe"@example.com, <angle@example.com>, \\alice\n'
    )
    assert values(amap, "a") == [("file", "/var/log/mail.archive")]
    b = amap.entries["b"][0]
    assert (b.kind, b.argv, b.error) == ("command", ("/usr/bin/logger", "-t", "mail"), "")
    c = amap.entries["c"]
    assert c[0].argv == ("/usr/bin/foo", "--opt", "a b,", "c")
    assert (c[1].kind, c[1].value) == ("address", "d")
    assert values(amap, "d") == [("include", "/etc/mail/list")]
    assert values(amap, "e") == [("include", "/etc/mail/other")]
    assert values(amap, "f") == [("file", "/path with space")]
    assert values(amap, "g") == [("address", '"john doe"@example.com'),
                                 ("address", "angle@example.com"), ("address", "\\alice")]


def test_commands_needing_a_shell_are_marked_not_guessed() -> None:
    amap = parse(
        'a: "|/usr/bin/env > /home/alice/env.txt"\n'
        'b: "|/usr/bin/procmail -a $EXTENSION"\n'
        "c: |relative/prog\n"
        "d: \"|/usr/bin/foo 'a > b; $x'\"\n"
        'e: "|/usr/bin/foo \'unterminated"\n'
    )
    for name in "abce":
        v = amap.entries[name][0]
        assert v.kind == "command" and v.argv == () and v.error, name
    assert "shell syntax" in amap.entries["a"][0].error
    # Metacharacters inside single quotes are plain argument text.
    assert amap.entries["d"][0].argv == ("/usr/bin/foo", "a > b; $x")


def test_bad_lines_are_warnings_and_first_duplicate_wins() -> None:
    amap = parse("no colon here\nx: first\nX: second\n: nameless\nempty:\ny: ok\n")
    assert values(amap, "x") == [("address", "first")]
    assert values(amap, "y") == [("address", "ok")]
    assert "empty" not in amap.entries
    assert len(amap.warnings) == 4
    assert any("duplicate" in w for w in amap.warnings)


def test_include_file_format() -> None:
    vals = aliases.parse_values("# members\nalice\nbob, carol\n\n  dave  \n",
                                source="/x", trusted=False, owner=0)
    assert [v.value for v in vals] == ["alice", "bob", "carol", "dave"]
    assert [v.source for v in vals] == ["/x:2", "/x:3", "/x:3", "/x:5"]


def test_missing_file_means_no_aliases(tmp_path: Path) -> None:
    amap = aliases.load(str(tmp_path / "nope"))
    assert amap.entries == {}
    assert aliases.lookup([str(tmp_path / "nope")], "root") is None


def test_first_map_with_the_name_wins(tmp_path: Path) -> None:
    (tmp_path / "one").write_text("a: one\n")
    (tmp_path / "two").write_text("a: two\nb: two\n")
    maps = [str(tmp_path / "one"), str(tmp_path / "two")]
    assert aliases.lookup(maps, "a")[0].value == "one"  # type: ignore[index]
    assert aliases.lookup(maps, "b")[0].value == "two"  # type: ignore[index]


def test_postfix_map_type_prefix_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "aliases").write_text("a: b\n")
    assert "a" in aliases.load(f"hash:{tmp_path}/aliases").entries


def test_trust_follows_owner_and_mode(tmp_path: Path, system_user: pwd.struct_passwd) -> None:
    path = tmp_path / "aliases"
    path.write_text("a: |/usr/bin/true\n")
    os.chmod(path, 0o644)
    first = aliases.load(str(path))
    assert first.trusted and first.entries["a"][0].trusted and first.owner == 0
    os.chmod(path, 0o664)  # same content and mtime: the cache must still notice
    assert not aliases.load(str(path)).entries["a"][0].trusted
    os.chmod(path, 0o646)
    assert not aliases.load(str(path)).trusted
    os.chmod(path, 0o644)
    assert aliases.load(str(path)).trusted
    os.chown(path, system_user.pw_uid, system_user.pw_gid)
    amap = aliases.load(str(path))
    assert not amap.trusted and amap.owner == system_user.pw_uid


def test_cache_by_file_identity(tmp_path: Path) -> None:
    path = tmp_path / "aliases"
    path.write_text("a: b\n")
    first = aliases.load(str(path))
    assert aliases.load(str(path)) is first
    path.write_text("a: c, d\n")  # new size and mtime
    assert values(aliases.load(str(path)), "a") == [("address", "c"), ("address", "d")]
    replacement = tmp_path / "new"
    replacement.write_text("a: e\n")
    os.utime(replacement, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
    os.replace(replacement, path)  # new inode
    assert values(aliases.load(str(path)), "a") == [("address", "e")]


def test_unreadable_file_is_a_temporary_error(tmp_path: Path,
                                              system_user: pwd.struct_passwd) -> None:
    need_root()
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(shared, 0o755)
    path = shared / "aliases"
    path.write_text("a: b\n")
    os.chmod(path, 0o600)

    def load_as_user() -> bytes:
        aliases.load(str(path))
        return b""

    with pytest.raises(DeliveryError) as e:
        pipe.call_as(system_user.pw_uid, system_user.pw_gid, load_as_user)
    assert e.value.status.startswith("4.")
    assert "Permission denied" in e.value.reason


def test_alias_file_that_is_not_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    with pytest.raises(DeliveryError) as e:
        aliases.load(str(tmp_path / "dir"))
    assert e.value.status.startswith("4.")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(DeliveryError):
        aliases.load(str(fifo))  # must not block
