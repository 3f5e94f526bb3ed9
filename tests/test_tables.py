"""Lookup tables: Postfix's table types, syntax and lookup orders (tables.py)."""

from pathlib import Path

import pytest

from pymailtools.errors import ConfigError
from pymailtools.tables import (
    find_address,
    find_address_key,
    find_domain,
    open_table,
    open_tables,
)


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


def test_address_order_follows_canonical5(tmp_path: Path) -> None:
    """canonical(5), ADDRESS EXTENSION: "the lookup order becomes: user+foo@domain,
    user@domain, user+foo, user, and @domain"; the user forms only for our own domains, and
    each query pattern goes to every table before the next pattern is tried."""
    order = ["user+foo@domain", "user@domain", "user+foo", "user", "@domain"]
    for i, winner in enumerate(order):
        # the winner in the second table, every later form in the first: the form wins
        first = ", ".join(f"{k}=first-{k}" for k in order[i + 1 :]) or "unrelated=x"
        maps = open_tables([f"inline:{{ {first} }}", f"inline:{{ {winner}=second }}"])
        assert find_address(maps, "user+foo@domain", delimiter="+", local=True) == "second"
    remote = open_tables("inline:{ user+foo=a, user=b }")
    assert find_address(remote, "user+foo@domain", delimiter="+") is None
    # no delimiter configured: no extension forms
    maps = open_tables("inline:{ user@domain=a }")
    assert find_address(maps, "user+foo@domain") is None
    assert find_address(maps, "USER@Domain") == "a"


def test_extension_split_as_postfix() -> None:
    from pymailtools.tables import split_extension

    assert split_extension("user+foo+bar", "+") == ("user", "foo+bar")
    assert split_extension("user-foo", "+-") == ("user", "foo")
    assert split_extension("+foo", "+") == ("+foo", None)
    assert split_extension("postmaster", "+") == ("postmaster", None)
    assert split_extension("owner-list", "-") == ("owner-list", None)
    assert split_extension("list-request", "-") == ("list-request", None)
    assert split_extension("owner-list", "+") == ("owner-list", None)
    assert split_extension("MAILER-DAEMON", "-") == ("MAILER-DAEMON", None)


def test_pattern_tables_see_only_the_full_address(tmp_path: Path) -> None:
    src = tmp_path / "re"
    src.write_text("/^user$/ partial\n/^@domain$/ partial\n/^(.*)@other$/ full-$1\n")
    maps = open_tables(f"regexp:{src}")
    assert find_address(maps, "user+x@domain", delimiter="+", local=True) is None
    assert find_address(maps, "User+x@other", delimiter="+") == "full-User+x"
    assert find_domain(open_tables(f"regexp:{src}"), "domain") is None


def test_long_keys_are_not_matched_against_patterns(tmp_path: Path) -> None:
    import time

    from pymailtools.tables import MAX_PATTERN_KEY, TableError

    src = tmp_path / "re"
    src.write_text("/(.*)\\.(.*)\\.(.*)@x$/ slow\n")
    t = open_table(f"regexp:{src}")
    start = time.monotonic()
    assert t.get(("a." * MAX_PATTERN_KEY)[:MAX_PATTERN_KEY]) is None
    with pytest.raises(TableError, match="longer than"):
        t.get("a." * 5000)
    assert time.monotonic() - start < 3


def test_posix_syntax_and_flags(tmp_path: Path) -> None:
    src = tmp_path / "re"
    src.write_text("/^[[:digit:]]+[]x]$/ bracket\n/^bre\\(a*\\)+$/x bre-$1\n"
                   "/^Exact$/i exact\n/\\<word\\>/ word\n")
    t = open_table(f"regexp:{src}")
    assert t.get("123]") == "bracket"
    assert t.get("breaa+") == "bre-aa"
    assert t.get("Exact") == "exact" and t.get("exact") is None
    assert t.get("a word here") == "word" and t.get("swords") is None
    pcre = tmp_path / "pcre"
    pcre.write_text("/^a.b$/ dotall\n/^(\\d+)[[:alpha:]]$/ d$1\n/^x/U lazy\n")
    with pytest.raises(ConfigError, match=":3: .*ungreedy"):
        open_table(f"pcre:{pcre}")
    pcre.write_text("/^a.b$/ dotall\n/^(\\d+)[[:alpha:]]$/ d$1\n")
    t = open_table(f"pcre:{pcre}")
    assert t.get("a\nb") == "dotall" and t.get("12z") == "d12"


def test_bad_results_are_config_errors(tmp_path: Path) -> None:
    src = tmp_path / "re"
    for text, msg in [("/(a)/ $2\n", "out-of-range"), ("/a/ $name\n", "non-numeric"),
                      ("!/(a)/ $1\n", "negated"), ("endif\n", "endif without if"),
                      ("/a/q x\n", "unknown regexp option"), ("/a x\n", "no closing"),
                      ("/a/ x$\n", "empty macro name"), ("/a/ x$-y\n", "empty macro name"),
                      ("/(a)/ ${1\n", "missing '}'")]:
        src.write_text(text)
        with pytest.raises(ConfigError, match=msg):
            open_table(f"regexp:{src}")


def test_tables_are_cached_until_the_file_changes(tmp_path: Path) -> None:
    import os

    src = tmp_path / "t"
    src.write_text("k one\n")
    t = open_table(f"texthash:{src}")
    assert open_table(f"texthash:{src}") is t
    src.write_text("k two\n")
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert open_table(f"texthash:{src}").get("k") == "two"


def test_map_keys_keep_inline_tables_whole(config_values: dict[str, object]) -> None:
    """Every key holding tables reaches open_tables with ``inline:{ a=b, c=d }`` in one piece
    (Postfix's map lists split on commas and spaces outside braces only)."""
    from pymailtools.config import SCHEMA, Config

    keys = [k for k in SCHEMA if k.endswith("_maps") and k != "alias_maps"]
    assert "transport_maps" in keys and "canonical_maps" in keys
    for key in keys:
        cfg = Config({**config_values, key: "inline:{ a=b, {c=d e} }, static:x"})
        maps = open_tables(getattr(cfg, key))
        assert [t.spec for t in maps.tables] == ["inline:{ a=b, {c=d e} }", "static:x"], key
        assert maps.get("c") == "d e" and maps.get("zz") == "x"
        cfg = Config({**config_values, key: ["static:1", "static:2"]})
        assert [t.spec for t in open_tables(getattr(cfg, key)).tables] == ["static:1",
                                                                            "static:2"]
    assert not open_tables(Config(config_values).transport_maps)


SECRET = "pa$!x-s3cret"


@pytest.mark.parametrize("spec", [
    "inline:{ [relay.test]=user:" + SECRET + ", broken" + SECRET + " }",
    "inline:{ [relay.test]=user:" + SECRET,
    "inline:{ [relay.test]=user:" + SECRET + " }}",
    "regexp:{ {/relay/ user:" + SECRET + "} }",
    "regexp:{ {/relay/ user:pa${x-s3cret} }",
    "regexp:{ {/relay/ user:pa$name-s3cret} }",
    "inlin:{ [relay.test]=user:" + SECRET + " }",
])
def test_errors_never_quote_an_inline_table_or_a_result(spec: str) -> None:
    with pytest.raises(ConfigError) as e:
        open_tables(spec)
    assert "s3cret" not in str(e.value), e.value


def test_regexp_file_error_names_file_and_line_not_the_result(tmp_path: Path) -> None:
    src = tmp_path / "sasl"
    src.write_text(f"/relay/ user:{SECRET}\n")
    with pytest.raises(ConfigError, match=f"^regexp:{src}, |^{src}:1: ") as e:
        open_table(f"regexp:{src}")
    assert "s3cret" not in str(e.value)


def test_find_address_key_names_the_form_that_matched() -> None:
    maps = open_tables("inline:{ joe=x@y, @other.com=z@w, ann+tag@a.test=t@a }")
    assert find_address_key(maps, "joe+foo@other.com", delimiter="+", local=False) == \
        ("z@w", "@other.com")
    assert find_address_key(maps, "joe+foo@other.com", delimiter="+", local=True) == \
        ("x@y", "joe")
    assert find_address_key(maps, "ann+tag@a.test", delimiter="+") == ("t@a", "ann+tag@a.test")
    assert find_address_key(maps, "nobody@a.test", delimiter="+") is None
    assert find_address(maps, "joe+foo@other.com", delimiter="+") == "z@w"
