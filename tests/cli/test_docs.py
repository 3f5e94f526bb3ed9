"""The man pages and shell completions: they render cleanly, document every configuration key
and every sendmail option, and the completions offer only options the man page documents."""

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from pymailtools import config
from pymailtools.errors import ConfigError
from tests.conftest import need_tool

ROOT = Path(__file__).resolve().parents[2]
MAN1 = ROOT / "man" / "man1" / "sendmail.1"
MAN5 = ROOT / "man" / "man5" / "pymailtools.toml.5"
COMPLETIONS = ROOT / "completions"
BASH_COMPLETION = COMPLETIONS / "sendmail.bash"
ZSH_COMPLETION = COMPLETIONS / "_sendmail"
FISH_COMPLETION = COMPLETIONS / "sendmail.fish"
SENDMAIL_SOURCE = ROOT / "src" / "pymailtools" / "cli" / "sendmail.py"

# Postfix's getopt string, which pymailtools' sendmail parses exactly (callers written for
# Postfix's sendmail must work unchanged).
GETOPT = "A:B:C:F:GIL:N:O:R:UV:X:b:ce:f:h:imno:p:r:q:tvx"
# Options whose argument selects a form of its own, documented one by one (-bm, -odi, -qI...).
SUB_FORM_LETTERS = {"b", "o", "q", "A"}

# Every option and option form sendmail accepts: the man page lists exactly these.
SENDMAIL_OPTIONS = frozenset({
    "-Am", "-Ac", "-B", "-bd", "-bD", "-bl", "-bh", "-bH", "-bi", "-bm", "-bp", "-bs", "-bv",
    "-C", "-c", "-e", "-F", "-f", "-G", "-h", "-I", "-i", "-L", "-m", "-N", "-n", "-O",
    "-o", "-odb", "-odi", "-odq", "-oem", "-oi", "-p", "-q", "-qI", "-qR", "-qS", "-R", "-r",
    "-t", "-U", "-V", "-v", "-X", "-x",
})
# Sub-values the completions must offer (sendmail's -b modes and the -o forms cron, mutt, PHP use).
B_MODES = {"-bm", "-bp", "-bv", "-bs", "-bd", "-bi"}
O_FORMS = {"-odb", "-odi", "-odq", "-oi", "-oem"}
DSN_NOTIFY = {"never", "success", "failure", "delay"}

MAN_PAGES = [MAN1, MAN5]


# --- a little roff reading -------------------------------------------------------------------

_ESCAPES = [
    ("\\-", "-"), ("\\(dq", '"'), ("\\(aq", "'"), ("\\(bu", "*"), ("\\&", ""), ("\\c", ""),
    ("\\~", " "), ("\\%", ""), ("\\e", "\\"), ("\\ ", " "),
]
_FONT = re.compile(r"\\f(?:[BIRP]|\[\w*\])")
_MACRO_FONTS = {"B": "B", "I": "I", "BR": "BR", "BI": "BI", "IB": "IB", "IR": "IR",
                "RB": "RB", "RI": "RI"}


def unescape(text: str) -> str:
    text = _FONT.sub("", text)
    for esc, plain in _ESCAPES:
        text = text.replace(esc, plain)
    return text


def macro_args(rest: str) -> list[str]:
    """Arguments of a roff request line: words, or double-quoted strings ("" is a quote)."""
    return [q.replace('""', '"') if q or not w else w
            for q, w in re.findall(r'"((?:[^"]|"")*)"|(\S+)', rest)]


def segments(line: str) -> list[tuple[str, str]]:
    """A text or font-macro line as (font, text) pieces, font being B, I or R."""
    if line.startswith("."):
        name, _, rest = line[1:].partition(" ")
        fonts = _MACRO_FONTS.get(name)
        if fonts is None:
            return [("R", unescape(rest))]
        args = macro_args(rest)
        if len(fonts) == 1:
            return [(fonts, unescape(" ".join(args)))]
        return [(fonts[i % 2], unescape(a)) for i, a in enumerate(args)]
    out, font = [], "R"
    for part in re.split(r"(\\f(?:[BIRP]|\[\w*\]))", line):
        if _FONT.fullmatch(part):
            font = {"B": "B", "I": "I"}.get(part[2:].strip("[]"), "R")
        elif part:
            out.append((font, unescape(part)))
    return out


def section(path: Path, title: str) -> list[str]:
    """The source lines of one .SH section."""
    lines, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(".SH"):
            inside = line[3:].strip().strip('"') == title
            continue
        if inside:
            lines.append(line)
    assert lines, f"{path.name}: no {title} section"
    return lines


def tags(lines: list[str]) -> list[str]:
    """The tag lines of .TP/.TQ items."""
    return [lines[i + 1] for i, line in enumerate(lines[:-1]) if line in (".TP", ".TQ")]


def documented_options() -> dict[str, list[tuple[str, str]]]:
    """Option name (the first bold word of each OPTIONS tag) -> the tag's pieces."""
    found: dict[str, list[tuple[str, str]]] = {}
    for tag in tags(section(MAN1, "OPTIONS")):
        pieces = segments(tag)
        bold = [text for font, text in pieces if font == "B"]
        assert bold and bold[0].startswith("-"), f"OPTIONS tag without a bold option: {tag!r}"
        found.setdefault(bold[0].split()[0], pieces)
    return found


def getopt_letters() -> dict[str, bool]:
    """Letter -> whether it takes an argument, from a getopt(3) string."""
    letters = {}
    for i, ch in enumerate(GETOPT):
        if ch != ":":
            letters[ch] = GETOPT[i + 1:i + 2] == ":"
    return letters


def is_documented(option: str, documented: set[str]) -> bool:
    """An offered option is documented as such, or is the letter of documented forms (-b)."""
    return option in documented or (
        len(option) == 2 and any(d.startswith(option) for d in documented))


# --- the man pages render without warnings ----------------------------------------------------

@pytest.mark.parametrize("page", MAN_PAGES, ids=lambda p: p.name)
def test_man_page_renders_without_groff_warnings(page: Path) -> None:
    groff = need_tool("groff", "groff-base")
    r = subprocess.run([groff, "-t", "-man", "-Tutf8", "-ww", "-z", str(page)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr


@pytest.mark.parametrize("page", MAN_PAGES, ids=lambda p: p.name)
def test_man_page_renders_with_man(page: Path) -> None:
    man = need_tool("man", "man-db")
    env = dict(os.environ, LC_ALL="C.UTF-8", MANWIDTH="80", MAN_DISABLE_SECCOMP="1")
    r = subprocess.run([man, "--warnings", "-E", "UTF-8", "-l", str(page)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr
    assert "NAME" in r.stdout and "SEE ALSO" in r.stdout


def test_man_pages_see_each_other() -> None:
    assert "pymailtools.toml (5)" in MAN1.read_text().replace("\\fR", "").replace(".BR ", "")
    assert "sendmail (1)" in MAN5.read_text().replace(".BR ", "")


# --- pymailtools.toml(5) documents every configuration key -------------------------------------

_KEY_TAG = re.compile(r"^(\w+) \((.+?); default: (.+)\)$")


def documented_keys() -> dict[str, tuple[str, str]]:
    keys: dict[str, tuple[str, str]] = {}
    for tag in tags(section(MAN5, "KEYS")):
        m = _KEY_TAG.match(unescape(tag))
        assert m, f"pymailtools.toml.5: key tag not in 'key (type; default: value)' form: {tag!r}"
        key, type_, default = m.groups()
        assert key not in keys, f"{key} documented twice"
        keys[key] = (type_, default)
    return keys


def test_every_config_key_is_documented() -> None:
    keys = documented_keys()
    missing = sorted(set(config.SCHEMA) - set(keys))
    unknown = sorted(set(keys) - set(config.SCHEMA))
    assert not missing, f"keys in config.SCHEMA missing from pymailtools.toml.5: {missing}"
    assert not unknown, f"pymailtools.toml.5 documents keys config.SCHEMA lacks: {unknown}"


REFUSED = "refused"


def _parsed(parse, value: object, key: str) -> object:
    """What a key's parser makes of a value, or REFUSED when it raises ConfigError."""
    try:
        return parse(value, key)
    except ConfigError:
        return REFUSED


# documented type -> (value, what the parser must make of it) pairs
TYPE_PROBES: dict[str, list[tuple[object, object]]] = {
    "time": [("1h30m", 5400), (7, 7), ("300", 300), ("5x", REFUSED), (-1, REFUSED)],
    "size": [("12", 12), (12, 12), ("12k", REFUSED), (-1, REFUSED)],
    "integer": [("12", 12), (12, 12), ("twelve", REFUSED), (-1, REFUSED)],
    "list": [("a, b c", ["a", "b", "c"]), (["x"], ["x"]), (5, REFUSED)],
    "boolean": [("yes", True), ("0", False), (False, False), ("maybe", REFUSED)],
    "path": [("/x/y", "/x/y"), ("relative", REFUSED), ("/a\nb", REFUSED)],
    "string": [("mail.example.org", "mail.example.org"), ("a\nb", REFUSED), (5, REFUSED)],
}


@pytest.mark.parametrize("key", sorted(config.SCHEMA))
def test_documented_type_matches_parser(key: str) -> None:
    type_, _ = documented_keys()[key]
    parse, _ = config.SCHEMA[key]
    if "|" in type_:
        words = [w.strip() for w in type_.split("|")]
        probes: list[tuple[object, object]] = [(w, w) for w in words]
        probes.append(("no-such-" + words[0], REFUSED))
    else:
        assert type_ in TYPE_PROBES, f"{key}: unknown documented type {type_!r}"
        probes = TYPE_PROBES[type_]
    for value, expected in probes:
        got = _parsed(parse, value, key)
        assert got == expected, (
            f"{key} is documented as {type_}, but its parser makes {got!r} of {value!r}")


@pytest.mark.parametrize("key", sorted(config.SCHEMA))
def test_documented_default_matches_schema(key: str) -> None:
    _, default_text = documented_keys()[key]
    parse, default = config.SCHEMA[key]
    if default is None:
        assert default_text == "computed", f"{key}: default is computed at run time"
        return
    try:
        documented = tomllib.loads(f"v = {default_text}")["v"]
    except tomllib.TOMLDecodeError:
        pytest.fail(f"{key}: documented default {default_text!r} is not a TOML value")
    assert parse(documented, key) == parse(default, key), (
        f"{key}: pymailtools.toml.5 says {default_text}, config.SCHEMA says {default!r}")


def test_time_units_are_documented() -> None:
    values = section(MAN5, "VALUES")
    for unit in config._TIME_UNITS:
        assert f".B {unit}" in values, f"time unit {unit!r} not documented"


def test_example_configuration_is_valid() -> None:
    lines = section(MAN5, "EXAMPLE")
    start = lines.index("# /etc/pymailtools/config.toml")
    block = lines[start:lines.index(".EE", start)]
    values = tomllib.loads(unescape("\n".join(block)))
    cfg = config.Config(values)
    assert cfg.warnings == []
    assert set(values) <= set(config.SCHEMA)


def test_root_rule_and_environment_are_documented() -> None:
    text = unescape(MAN5.read_text())
    assert "ROOT SAFETY RULE" in text and "owned by root" in text and "78" in text
    for name in ("PYMAILTOOLS_CONFIG", "PYMAILTOOLS_", "/etc/pymailtools/config.toml",
                 "~/.config/pymailtools/config.toml"):
        assert name in text


# --- sendmail(1) documents every option ---------------------------------------------------------

def test_sendmail_man_page_lists_exactly_the_options() -> None:
    documented = set(documented_options())
    assert documented - SENDMAIL_OPTIONS == set(), "documented but not an option of sendmail"
    assert SENDMAIL_OPTIONS - documented == set(), "options missing from sendmail.1"


def test_every_getopt_letter_is_documented_with_its_argument() -> None:
    options = documented_options()
    for letter, takes_arg in getopt_letters().items():
        forms = [o for o in options if o[1:2] == letter]
        assert forms, f"-{letter} is in Postfix's getopt string but not in sendmail.1"
        if letter in SUB_FORM_LETTERS:
            continue
        pieces = options[f"-{letter}"]
        has_arg = any(font == "I" and text.strip() for font, text in pieces)
        assert has_arg == takes_arg, (
            f"-{letter}: sendmail.1 shows {'an' if has_arg else 'no'} argument, getopt says "
            f"{'one' if takes_arg else 'none'}")


def test_getopt_string_matches_implementation() -> None:
    source = SENDMAIL_SOURCE.read_text()
    # "q::" in ours: -q's argument is only ever attached (Postfix's getopt string says "q:")
    found = [f.replace("::", ":") for f in
             re.findall(r"[\"']((?:[A-Za-z]:{0,2}){20,})[\"']", source)]
    assert GETOPT in found, f"sendmail.py parses {found}, the documentation says {GETOPT}"


# a sample argument for each documented option that takes one
OPTION_SAMPLES = {"-B": "8BITMIME", "-C": "/dev/null", "-e": "x", "-F": "Cron Daemon",
                  "-f": "a@example.org", "-h": "3", "-L": "label", "-N": "never", "-O": "a=b",
                  "-o": "7", "-p": "smtp", "-R": "hdrs", "-r": "a@example.org", "-V": "envid",
                  "-X": "/tmp/log"}


@pytest.mark.parametrize("option", sorted(SENDMAIL_OPTIONS))
def test_documented_option_is_parsed_by_sendmail(option: str) -> None:
    """The real command-line parser takes each documented option, with or without an
    argument as documented: the word after it is a recipient, not swallowed."""
    from pymailtools.cli import sendmail

    parse = getattr(sendmail, "parse", None)
    if parse is None:
        pytest.skip("pymailtools.cli.sendmail.parse does not exist")
    argv = ["sendmail", option]
    if option in OPTION_SAMPLES:
        argv.append(OPTION_SAMPLES[option])
    elif option == "-qI":
        argv[1] += "A1b2"
    elif option in ("-qR", "-qS"):
        argv[1] += "example.org"
    req = parse([*argv, "root"])
    assert req.recipients == ["root"], f"{argv[1:]} left {req.recipients}"


def test_sendmail_man_page_sections() -> None:
    text = MAN1.read_text()
    for title in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "INPUT", "EXIT STATUS",
                  "ENVIRONMENT", "FILES", "DIFFERENCES FROM POSTFIX", "SEE ALSO"):
        assert re.search(rf'^\.SH "?{title}"?$', text, re.M), f"sendmail.1 lacks {title}"
    codes = re.findall(r"^(\d+)\tEX_", "\n".join(section(MAN1, "EXIT STATUS")), re.M)
    assert codes == ["0", "64", "65", "67", "68", "69", "73", "74", "77", "78"]
    for name in ("PYMAILTOOLS_CONFIG", "NAME"):
        assert any(name in line for line in section(MAN1, "ENVIRONMENT"))


# --- completions ----------------------------------------------------------------------------------

def _documented_names() -> set[str]:
    return set(documented_options())


def test_bash_completion_syntax() -> None:
    bash = need_tool("bash", "bash")
    r = subprocess.run([bash, "-n", str(BASH_COMPLETION)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def bash_complete(*words: str) -> list[str]:
    """COMPREPLY for a command line whose last word is being completed."""
    bash = need_tool("bash", "bash")
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    script = (f"source '{BASH_COMPLETION}'\n"
              f"COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; COMPREPLY=()\n"
              "_pymailtools_sendmail 2>/dev/null\n"
              'printf "%s\\n" "${COMPREPLY[@]}"\n')
    r = subprocess.run([bash, "--norc", "--noprofile", "-c", script], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return [w for w in r.stdout.splitlines() if w]


def test_bash_completion_offers_documented_options() -> None:
    documented = _documented_names()
    offered = bash_complete("sendmail", "-")
    assert offered
    undocumented = [o for o in offered if o != "--" and not is_documented(o, documented)]
    assert undocumented == []
    letters = {o[1] for o in offered if o != "--"}
    assert set(getopt_letters()) <= letters


def test_bash_completion_values() -> None:
    assert B_MODES <= set(bash_complete("sendmail", "-b"))
    assert O_FORMS <= set(bash_complete("sendmail", "-o"))
    assert set(bash_complete("sendmail", "-N", "")) == DSN_NOTIFY
    assert bash_complete("sendmail", "-N", "never,su") == ["never,success"]
    assert set(bash_complete("sendmail", "-R", "")) == {"hdrs", "full"}
    assert set(bash_complete("sendmail", "-B", "")) == {"7BIT", "8BITMIME"}
    for offered in (bash_complete("sendmail", "-b"), bash_complete("sendmail", "-o"),
                    bash_complete("sendmail", "-q")):
        assert all(is_documented(o, _documented_names()) for o in offered), offered


def test_bash_completion_files_users_and_no_permutation(tmp_path: Path) -> None:
    (tmp_path / "alt.toml").write_text("")
    assert bash_complete("sendmail", "-C", str(tmp_path / "al")) == [str(tmp_path / "alt.toml")]
    assert "root" in bash_complete("sendmail", "-i", "ro")
    assert "root" in bash_complete("sendmail", "-if", "ro")  # -f's argument, after a bundle
    # Postfix does not permute: after a recipient or "--" every word is a recipient.
    assert bash_complete("sendmail", "root", "-") == []
    assert bash_complete("sendmail", "--", "-") == []
    assert bash_complete("sendmail", "-fx", "-") != []  # attached argument: still options


def test_zsh_completion_syntax() -> None:
    zsh = need_tool("zsh", "zsh")
    r = subprocess.run([zsh, "-n", str(ZSH_COMPLETION)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert ZSH_COMPLETION.read_text().startswith("#compdef sendmail\n")


def zsh_offered_options() -> set[str]:
    """Options in the _arguments specs, plus -b/-o/-q forms from the _describe arrays."""
    text = ZSH_COMPLETION.read_text()
    letters = re.findall(r"^\s*'(?:\([^)]*\))?\*?-([A-Za-z])[-+=]?\[", text, re.M)
    offered = {f"-{c}" for c in letters}
    for func, letter in (("mode", "b"), ("o", "o"), ("q", "q")):
        body = re.search(rf"_pymailtools_sendmail_{func}\(\) \{{(.*?)\n\}}", text, re.S)
        assert body, f"_sendmail: no _pymailtools_sendmail_{func} function"
        values = re.findall(r"^\s*'([^:']+):", body.group(1), re.M)
        offered |= {f"-{letter}{v}" for v in values}
    return offered


def test_zsh_completion_offers_documented_options() -> None:
    offered = zsh_offered_options()
    documented = _documented_names()
    assert [o for o in sorted(offered) if not is_documented(o, documented)] == []
    assert set(getopt_letters()) <= {o[1] for o in offered}
    assert B_MODES <= offered and O_FORMS <= offered
    text = ZSH_COMPLETION.read_text()
    for value in (*DSN_NOTIFY, "hdrs full", "7BIT 8BITMIME", "_files", "_users"):
        assert value in text


_ZSH_CAPTURE = r"""
zmodload zsh/zpty || exit 2
zpty z zsh -f -i
local line
setopt rcquotes
() {
  zpty -w z source $1
  repeat 4; do
    zpty -r z line
    [[ $line == ok* ]] && return
  done
  echo 'error initializing.' >&2
  exit 2
} =( <<< '
PROMPT=
fpath=('$1' $fpath)
autoload -U compinit
compinit -u -D
zstyle '':completion:*'' list-grouped false
zstyle '':completion:*'' list-separator ''''
bindkey ''^I'' complete-word
null-line () { echo -E - $''\0'' }
compprefuncs=( null-line )
comppostfuncs=( null-line exit )
zstyle '':completion:*'' list-prompt ''''
zstyle '':completion:*'' select-prompt ''''
LISTMAX=10000
compadd () {
  if [[ ${@[1,(i)(-|--)]} == *-(O|A|D)\ * ]]; then
    builtin compadd "$@"
    return $?
  fi
  typeset -a __hits
  builtin compadd -A __hits "$@"
  setopt localoptions norcexpandparam extendedglob
  typeset -A apre hpre hsuf asuf
  zparseopts -E P:=apre p:=hpre S:=asuf s:=hsuf
  [[ -n $__hits ]] || return
  for i in {1..$#__hits}; do
    echo -E - $IPREFIX$apre$hpre$__hits[$i]$hsuf$asuf
  done
}
echo ok')
zpty -w z "$2"$'\t'
integer tog=0
while zpty -r z; do :; done | while IFS= read -r line; do
  if [[ $line == *$'\0\r' ]]; then
    (( tog++ )) && return 0 || continue
  fi
  (( tog )) && echo -E - $line
done
return 2
"""


def zsh_complete(tmp_path: Path, line: str) -> set[str]:
    """What zsh offers for ``line`` followed by TAB (driven through zpty)."""
    zsh = need_tool("zsh", "zsh")
    capture = tmp_path / "capture.zsh"
    capture.write_text(_ZSH_CAPTURE)
    r = subprocess.run([zsh, "-f", str(capture), str(COMPLETIONS), line],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return {w.strip() for w in r.stdout.splitlines() if w.strip()}


def test_zsh_completion_in_a_real_shell(tmp_path: Path) -> None:
    documented = _documented_names()
    options = zsh_complete(tmp_path, "sendmail -")
    assert set(getopt_letters()) <= {o[1] for o in options}
    assert B_MODES <= zsh_complete(tmp_path, "sendmail -b")
    assert O_FORMS <= zsh_complete(tmp_path, "sendmail -o")
    assert zsh_complete(tmp_path, "sendmail -A") == {"-Am", "-Ac"}
    assert DSN_NOTIFY <= zsh_complete(tmp_path, "sendmail -N ")
    for line in ("sendmail -", "sendmail -b", "sendmail -o", "sendmail -q"):
        offered = zsh_complete(tmp_path, line)
        assert [o for o in offered if not is_documented(o, documented)] == [], line
    assert "root" in zsh_complete(tmp_path, "sendmail -i ro")


def test_fish_completion_syntax() -> None:
    fish = need_tool("fish", "fish")
    r = subprocess.run([fish, "-n", str(FISH_COMPLETION)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def fish_complete(line: str) -> list[str]:
    fish = need_tool("fish", "fish")
    r = subprocess.run([fish, "--no-config", "-c",
                        f"source {FISH_COMPLETION}; complete -C {line!r}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [w.split("\t")[0] for w in r.stdout.splitlines() if w]


def test_fish_completion_offers_documented_options() -> None:
    documented = _documented_names()
    options = fish_complete("sendmail -")
    assert set(getopt_letters()) <= {o[1] for o in options}
    assert B_MODES <= set(fish_complete("sendmail -b"))
    assert O_FORMS <= set(fish_complete("sendmail -o"))
    assert {"-q", "-qI", "-qR"} == set(fish_complete("sendmail -q"))
    assert DSN_NOTIFY <= set(fish_complete("sendmail -N "))
    assert set(fish_complete("sendmail -R ")) == {"hdrs", "full"}
    assert set(fish_complete("sendmail -B ")) == {"7BIT", "8BITMIME"}
    for line in ("sendmail -", "sendmail -b", "sendmail -o", "sendmail -A"):
        offered = fish_complete(line)
        assert [o for o in offered if not is_documented(o, documented)] == [], line
    assert "root" in fish_complete("sendmail -i ro")
    assert not any(o.startswith("-") for o in fish_complete("sendmail root -"))
