"""Lookup tables: Postfix's table types, syntax and lookup orders (tables.py)."""

from pathlib import Path

import pytest

from pymailtools.errors import ConfigError
from pymailtools.tables import find_address, find_domain, open_table, open_tables


def test_inline_static_texthash_hash(tmp_path: Path) -> None:
    t = open_table("inline:{ Foo=bar, { key = value with spaces } }")
    assert t.get("FOO") == "bar"
    assert t.get("key") == "value with spaces"
    assert t.get("nope") is None
    assert open_table("static:{ a b }").get("anything") == "a b"
    src = tmp_path / "virtual"
    src.write_text("# comment\nUser@Example.COM  one,\n  two\n@example.org catch\n")
    t = open_table(f"texthash:{src}")
    assert t.get("user@example.com") == "one,  two"
    assert open_tables(f"texthash:{src}, inline:{{x=y}}").get("X") == "y"


def test_regexp_captures_and_if(tmp_path: Path) -> None:
    src = tmp_path / "re"
    src.write_text("if /@example\\.com$/\n/^(.*)\\+(.*)@/ ${1}-$2@ex.net\nendif\n"
                   "!/@/ local\n/^ROOT@/ admin$$\n")
    t = open_table(f"regexp:{src}")
    assert t.get("a+b@EXAMPLE.com") == "a-b@ex.net"
    assert t.get("a+b@example.org") is None
    assert t.get("bare") == "local"
    assert t.get("root@x") == "admin$"


def test_bad_regexp_names_file_and_line(tmp_path: Path) -> None:
    src = tmp_path / "re"
    src.write_text("/ok/ fine\n\n/(unclosed/ x\n")
    with pytest.raises(ConfigError, match=f"{src}:3: "):
        open_table(f"regexp:{src}")


def test_address_and_domain_order() -> None:
    maps = open_tables("inline:{ user+ext@d=1, user@d=2, user+ext=3, user=4, @d=5 }")
    assert find_address(maps, "user+ext@d", delimiter="+") == "1"
    assert find_address(maps, "user+other@d", delimiter="+") == "2"
    maps = open_tables("inline:{ user+ext=3, user=4, @d=5 }")
    assert find_address(maps, "user+ext@d", delimiter="+", local=True) == "3"
    assert find_address(maps, "user+x@d", delimiter="+", local=True) == "4"
    assert find_address(maps, "user+x@d", delimiter="+") == "5"
    maps = open_tables("inline:{ example.com=a, .example.com=b }")
    assert find_domain(maps, "example.com") == "a"
    assert find_domain(maps, "mx.sub.example.com") == "b"
    assert find_domain(maps, "example.org") is None


def test_hash_needs_a_fresh_index(tmp_path: Path) -> None:
    import os

    from pymailtools.tables import build_index

    src = tmp_path / "map"
    src.write_text("Key value\n")
    with pytest.raises(ConfigError, match="run postmap"):
        open_table(f"hash:{src}")
    build_index(str(src))
    assert open_table(f"hash:{src}").get("KEY") == "value"
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ConfigError, match="older than source"):
        open_table(f"hash:{src}")
