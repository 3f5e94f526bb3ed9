"""postmap against Postfix's own postmap: the same table files, the same answers on every key.

Each table is generated (seeded, so a failure reproduces) with the tricky cases mixed in: mixed
case keys, ``+ext`` and ``@domain`` keys, dotted keys, quoted keys, continuation lines,
comments, duplicates, lines without a value; regexp:/pcre: rules with captures, ``if``/``endif``,
negation, flags and ``$$``. Both programs answer ``postmap -q - TYPE:FILE`` for the same keys
(every table key in several spellings plus misses), and the outputs must be identical.
"""

from __future__ import annotations

import os
import pwd
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import missing, need_tool, run_as, script

DOMAINS = [f"Dom{n}.Example" for n in range(40)] + ["example.com", "sub.example.com", "a.b.c.d"]


@pytest.fixture(scope="module")
def postfix_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private Postfix configuration directory: postmap needs a main.cf to read."""
    need_tool("postmap", "postfix")
    d = tmp_path_factory.mktemp("postfix")
    (d / "main.cf").write_text("compatibility_level = 3.7\n")
    return d


def postfix_postmap(cfg: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([need_tool("postmap", "postfix"), "-c", str(cfg), *args],
                          input=stdin, capture_output=True, text=True, timeout=120)


def our_postmap(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([script("postmap"), *args], input=stdin, capture_output=True,
                          text=True, timeout=120)


def compare(cfg: Path, spec: str, keys: list[str], *flags: str) -> int:
    """Both programs answer ``-q -`` for ``keys``; returns how many keys were found."""
    stdin = "".join(k + "\n" for k in keys)
    theirs = postfix_postmap(cfg, *flags, "-q", "-", spec, stdin=stdin)
    ours = our_postmap(*flags, "-q", "-", spec, stdin=stdin)
    assert "fatal" not in theirs.stderr, theirs.stderr
    assert ours.stderr == "", ours.stderr
    their_lines, our_lines = theirs.stdout.splitlines(), ours.stdout.splitlines()
    if their_lines != our_lines:
        theirs_d = dict(line.split("\t", 1) for line in their_lines)
        ours_d = dict(line.split("\t", 1) for line in our_lines)
        diff = [(k, theirs_d.get(k), ours_d.get(k)) for k in keys
                if theirs_d.get(k) != ours_d.get(k)]
        pytest.fail(f"{spec}: {len(diff)} of {len(keys)} keys differ, e.g. {diff[:5]}")
    assert ours.returncode == theirs.returncode
    return len(our_lines)


def spellings(key: str, rnd: random.Random) -> list[str]:
    """The key as written, folded both ways, and one random mixture of cases."""
    mixed = "".join(c.upper() if rnd.random() < 0.5 else c.lower() for c in key)
    return list(dict.fromkeys([key, key.lower(), key.upper(), mixed]))


def write_source(path: Path, rnd: random.Random) -> list[str]:
    """A postmap(1) source of 1,200+ entries; returns the keys as written."""
    lines = ["# generated table: comments, blank lines and continuations included", ""]
    keys: list[str] = []
    for n in range(1200):
        dom = rnd.choice(DOMAINS)
        form = n % 8
        if form == 0:
            key = f"User{n}@{dom}"
        elif form == 1:
            key = f"user{n}+Ext{n % 7}@{dom}"
        elif form == 2:
            key = f"@{dom.upper()}" if n % 16 == 2 else f"@{n}.{dom}"
        elif form == 3:
            key = f"Local{n}"
        elif form == 4:
            key = f"first.last{n}@mail.{dom}"
        elif form == 5:
            key = f".{n}.{dom}"
        elif form == 6:
            key = f'"quoted {n}"@{dom}'
        else:
            key = f"root+{n}"
        value = f"dest{n}@{rnd.choice(DOMAINS)}"
        sep = rnd.choice([" ", "\t", "   ", " \t "])
        if n % 11 == 0:
            lines.append(f"{key}{sep}{value},")
            lines.append(f"  second{n}@x.example,")
            lines.append(f"\tthird{n}@y.example   ")
        elif n % 13 == 0:
            lines.append(f"{key}")
            lines.append(f"    {value}")
        else:
            lines.append(f"{key}{sep}{value}{rnd.choice(['', ' ', '  '])}")
        if n % 17 == 0:
            lines.append(f"   # an indented comment after entry {n}")
        if n % 19 == 0:
            lines.append("")
        if n % 23 == 0:
            lines.append(f"{key.lower()} duplicate-of-{n}")
        if n % 29 == 0:
            lines.append(f"novalue{n}")
        keys.append(key)
    path.write_text("\n".join(lines) + "\n")
    return keys


def lookup_keys(keys: list[str], rnd: random.Random) -> list[str]:
    out: list[str] = []
    for k in keys:
        out.extend(spellings(k, rnd))
    out += [f"missing{n}@{rnd.choice(DOMAINS)}" for n in range(200)]
    out += [f"novalue{n}" for n in range(0, 1200, 29)]
    out += ["second0@x.example", "user1@" + DOMAINS[0], "local3", ".example", "quoted 6"]
    return list(dict.fromkeys(out))


@pytest.mark.interop
def test_hash_and_texthash_agree_with_postfix(postfix_dir: Path, tmp_path: Path) -> None:
    rnd = random.Random(16)
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    keys = write_source(theirs, rnd)
    ours.write_bytes(theirs.read_bytes())
    assert postfix_postmap(postfix_dir, f"hash:{theirs}").returncode == 0
    built = our_postmap(str(ours))
    assert built.returncode == 0, built.stderr
    assert "duplicate entry" in built.stderr and "expected format" in built.stderr
    queries = lookup_keys(keys, rnd)
    assert len(queries) > 4000

    stdin = "".join(k + "\n" for k in queries)
    for flags in ((), ("-f",)):
        if flags:  # -f: keys keep their case, in the index and in the lookup
            assert postfix_postmap(postfix_dir, "-f", f"hash:{theirs}").returncode == 0
            assert our_postmap("-f", str(ours)).returncode == 0
        a = postfix_postmap(postfix_dir, *flags, "-q", "-", f"hash:{theirs}", stdin=stdin)
        b = our_postmap(*flags, "-q", "-", f"hash:{ours}", stdin=stdin)
        assert a.stdout.splitlines() == b.stdout.splitlines(), flags
        assert len(b.stdout.splitlines()) > 1200
        found = compare(postfix_dir, f"texthash:{ours}", queries, *flags)
        assert found > 1200
        # -s: the same entries (Postfix's hash order is its own: compare sorted)
        dump_a = postfix_postmap(postfix_dir, *flags, "-s", f"hash:{theirs}").stdout
        dump_b = our_postmap(*flags, "-s", f"hash:{ours}").stdout
        assert sorted(dump_a.splitlines()) == sorted(dump_b.splitlines())

    # one key at a time: the value alone, exit 1 for a miss, as Postfix
    for key in (keys[0].upper(), keys[1], "no-such-key"):
        a = postfix_postmap(postfix_dir, "-q", key, f"hash:{theirs}")
        b = our_postmap("-q", key, f"hash:{ours}")
        assert (a.stdout, a.returncode) == (b.stdout, b.returncode), key


@pytest.mark.interop
def test_inline_agrees_with_postfix(postfix_dir: Path) -> None:
    rnd = random.Random(7)
    pairs = [(f"Key{n}.{rnd.choice(DOMAINS)}", f"value{n}") for n in range(1000)]
    pairs.append(("key0." + DOMAINS[0].lower(), "overrides"))  # the last duplicate wins
    items = [f"{k}={v}" for k, v in pairs] + ["{ spaced =value with spaces, comma }"]
    spec = "inline:{ " + ", ".join(items) + " }"
    queries = [q for k, _ in pairs for q in spellings(k, rnd)] + ["spaced", "nope"]
    assert compare(postfix_dir, spec, queries) > 1000


REGEXP_COMMON = r"""
# captures, ${n} and $(n), $$, continuation lines, comments, if/endif, negation
if /@example\.com$/
/^([^+@]+)\+([^@]*)@/	ext:$1:${2}:$(1)
/^postmaster@/	$$admin@example.com
endif
if !/@/
/^(root|admin)$/	local-$1
/^owner-(.*)$/	owner:$1
!/^[a-z]/	not-lower
endif
/^([A-Z]+)@CASE\.example$/i	sensitive:$1
/^(.*)@(sub\.)?(example\.org)$/	user=$1 sub=$2 dom=$3
/^a\.b\.(c|d)@/ dotted-$1
# a multi-line result: the text is joined
/^multi@/	first part
	second part
/^[[:digit:]]+@numbers\.example$/	digits
|^pipe/delim@([a-z.]+)$|	slash-in-key $1
"""


def pattern_table(rnd: random.Random, pcre: bool) -> tuple[str, list[str]]:
    rules = [REGEXP_COMMON]
    if pcre:
        rules.append(r"/^(?!owner-)(.*)-outgoing@(.*)$/	use ${1}@${2}" "\n")
        rules.append(r"/^(\d+)\.(\w+?)@digits\.example$/	n=$1 w=$2" "\n")
        rules.append(r"/^  spaced \s (x)/x	verbose-$1" "\n")
        rules.append(r"/^anchored/A	anchored" "\n")
    keys = ["joe+list@example.com", "joe+@example.com", "postmaster@example.com",
            "Joe+List@EXAMPLE.COM", "root", "admin", "owner-list", "Upper", "ROOT",
            "ABC@CASE.example", "abc@CASE.example", "x@sub.example.org", "x@example.org",
            "X@SUB.EXAMPLE.ORG", "a.b.c@z", "a.b.d@z", "aXb.c@z", "multi@x", "123@numbers.example",
            "12a@numbers.example", "pipe/delim@host.example", "list-outgoing@lists.example",
            "owner-list-outgoing@lists.example", "42.word@digits.example", "spacedx",
            "anchored@x", "not-anchored@x", "", "@", "a@b@c"]
    for n in range(300):
        dom = rnd.choice(DOMAINS).lower().replace(".", r"\.")
        rules.append(f"/^(user{n})(\\+[^@]*)?@{dom}$/\tmapped{n}:$1$2\n")
        if n % 10 == 0:
            rules.append(f"if /^dept{n}-/\n/^dept{n}-([a-z]+)@(.+)$/\tdept:$2:$1\nendif\n")
            keys += [f"dept{n}-sales@x.example", f"dept{n}-@x.example", f"Dept{n}-HR@y"]
        raw = dom.replace("\\", "")
        keys += [f"user{n}@{raw}", f"USER{n}+tag@{raw.upper()}", f"user{n}x@{raw}",
                 f"user{n}+a+b@{raw}"]
    for n in range(600):
        keys.append(f"random{n}+{rnd.randrange(99)}@{rnd.choice(DOMAINS)}")
    return "".join(rules), keys


@pytest.mark.interop
@pytest.mark.parametrize("kind", ["regexp", "pcre"])
def test_pattern_tables_agree_with_postfix(postfix_dir: Path, tmp_path: Path, kind: str) -> None:
    if kind == "pcre":
        types = subprocess.run(["postconf", "-c", str(postfix_dir), "-m"], capture_output=True,
                               text=True).stdout.split()
        if "pcre" not in types:
            missing("Postfix has no pcre: tables (apt-get install postfix-pcre)")
    text, keys = pattern_table(random.Random(3), pcre=kind == "pcre")
    table = tmp_path / kind
    table.write_text(text)
    keys = [k for k in keys if k]  # postmap -q - skips empty lines
    assert len(keys) >= 1000
    found = compare(postfix_dir, f"{kind}:{table}", keys)
    assert found > 600


# --- our own errors: one line, exit 78


@pytest.mark.parametrize(("setup", "spec", "expect"), [
    (None, "hash:{d}/missing", "cannot open {d}/missing"),
    ("source", "hash:{d}/t", "no index {d}/t.sqlite: run postmap {d}/t"),
    ("stale", "hash:{d}/t", "index {d}/t.sqlite is older than source file {d}/t"),
    (None, "nosuch:{d}/t", "unsupported table type 'nosuch'"),
    ("badre", "regexp:{d}/re", "{d}/re:2: bad regular expression"),
    ("badre", "pcre:{d}/re", "{d}/re:2: bad regular expression"),
    ("unbalanced", "regexp:{d}/re", "{d}/re:1: if without endif"),
])
def test_errors_are_one_line_exit_78(tmp_path: Path, setup: str | None, spec: str,
                                     expect: str) -> None:
    d = str(tmp_path)
    (tmp_path / "t").write_text("key value\n")
    if setup == "stale":
        assert our_postmap(f"{d}/t").returncode == 0
        st = os.stat(f"{d}/t")
        os.utime(f"{d}/t", ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    if setup == "badre":
        (tmp_path / "re").write_text("/ok/ fine\n/(unclosed/ x\n")
    if setup == "unbalanced":
        (tmp_path / "re").write_text("if /x/\n/y/ z\n")
    r = our_postmap("-q", "key", spec.format(d=d))
    assert r.returncode == 78, r
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("postmap: "), r.stderr
    assert expect.format(d=d) in lines[0]


def test_unreadable_table(world_dir: Path, system_user: pwd.struct_passwd) -> None:
    """A table its user cannot read: one line naming the spec and the reason, exit 78."""
    from pymailtools.cli.postmap import main

    t = world_dir / "t"
    t.write_text("k v\n")
    t.chmod(0o600)
    err = world_dir / "err"
    err.touch()
    err.chmod(0o666)

    def body() -> int:
        with open(err, "w") as sys.stderr:
            return main(["postmap", "-q", "k", f"texthash:{t}"])

    assert run_as(system_user, body) == 78
    assert err.read_text() == f"postmap: texthash:{t}: cannot open {t}: Permission denied\n"


def test_build_refuses_pattern_tables_and_usage(tmp_path: Path) -> None:
    (tmp_path / "re").write_text("/x/ y\n")
    r = our_postmap(f"regexp:{tmp_path}/re")
    assert r.returncode == 78 and "no index to build" in r.stderr
    r = our_postmap()
    assert r.returncode == 64 and r.stderr.startswith("postmap: usage: postmap")
    r = our_postmap("-Z", "x")
    assert r.returncode == 64 and "invalid option" in r.stderr


# --- the man page and the completions

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = {"-c", "-f", "-N", "-n", "-o", "-p", "-q", "-r", "-s", "-v", "-w"}


def test_man_page_renders_and_documents_every_option() -> None:
    import re

    groff = need_tool("groff", "groff-base")
    page = ROOT / "man" / "man1" / "postmap.1"
    p = subprocess.run([groff, "-t", "-man", "-Tutf8", "-ww", "-z", str(page)],
                       capture_output=True, text=True)
    assert (p.returncode, p.stderr) == (0, "")
    text = page.read_text().replace("\\-", "-")
    for opt in OPTIONS:
        assert re.search(rf"^\.(?:B|BI|BR|RB|IB|TP)\b[^\n]*(?<![\w-]){opt}(?![\w-])", text,
                         re.M), opt
    from pymailtools.cli.postmap import POSTALIAS_OPTS, POSTMAP_OPTS

    assert {f"-{c}" for c in POSTMAP_OPTS if c != ":"} == OPTIONS
    assert POSTALIAS_OPTS == POSTMAP_OPTS


@pytest.mark.parametrize("name", ["postmap.bash", "_postmap", "postmap.fish"])
def test_completions_offer_exactly_the_options(name: str) -> None:
    import re

    text = (ROOT / "completions" / name).read_text()
    if name.endswith(".fish"):
        offered = {f"-{s}" for s in re.findall(r"complete -c \$cmd .*?-s (\w)\b", text)}
    elif name.startswith("_"):
        offered = set(re.findall(r"'(?:\([^)]*\))?(-\w)[+]?\[", text))
    else:
        offered = set(re.findall(r'compgen -W "(-c [^"]*)"', text)[0].split())
    assert offered == OPTIONS


# --- postalias and newaliases: the alias parser local delivery uses


def test_postalias_checks_queries_and_dumps(tmp_path: Path) -> None:
    aliases = tmp_path / "aliases"
    aliases.write_text("Root: admin, \"|/bin/cat x\"\npostmaster: root\nbad line\n")
    run = [script("postalias")]
    p = subprocess.run([*run, str(aliases)], capture_output=True, text=True)
    assert (p.returncode, p.stdout) == (0, "")
    assert p.stderr == f"postalias: warning: {aliases}:3: missing colon after the name: " \
                       "'bad line'\n"
    p = subprocess.run([*run, "-q", "ROOT", f"hash:{aliases}"], capture_output=True, text=True)
    assert (p.returncode, p.stdout) == (0, 'admin, "|/bin/cat x"\n')
    p = subprocess.run([*run, "-q", "nobody", str(aliases)], capture_output=True, text=True)
    assert (p.returncode, p.stdout) == (1, "")
    p = subprocess.run([*run, "-s", str(aliases)], capture_output=True, text=True)
    assert p.stdout.splitlines() == ['root: admin, "|/bin/cat x"', "postmaster: root"]
    p = subprocess.run([*run, str(tmp_path / "missing")], capture_output=True, text=True)
    assert p.returncode == 78
    assert p.stderr == f"postalias: cannot open {tmp_path}/missing: No such file or directory\n"


def test_newaliases_is_sendmail_bi(tmp_path: Path, config_file: Path,
                                   config_values: dict[str, object]) -> None:
    aliases = Path(str(config_values["alias_maps"][0]))  # type: ignore[index]
    aliases.write_text("postmaster: root\nbroken line\n")
    p = subprocess.run([script("newaliases")], capture_output=True, text=True)
    assert p.returncode == 0
    assert p.stderr.splitlines() == [
        f"newaliases: warning: {aliases}:2: missing colon after the name: 'broken line'"]
