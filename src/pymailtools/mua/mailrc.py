"""mail's resource files as s-nail reads them: /etc/mail.rc, then ~/.mailrc ($MAILRC), their
``set``/``unset`` commands, ``account NAME { … }`` blocks (chosen with ``-A NAME``), ``source``;
then the command line's ``-S`` settings on top, which no file can change.

Other commands (alias, ignore, retain, headerpick, define, …) are skipped quietly: what they
do is for reading mail interactively. ``if``/``endif`` blocks are not evaluated: their commands
are skipped, with one warning, so a setting inside never applies by accident.
"""

from __future__ import annotations

import os

from pymailtools.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:  # at run time, collections would cost mail's start-up its import
    from collections.abc import Callable, Mapping

SYSTEM_MAILRC = "/etc/mail.rc"
# command modifiers s-nail accepts before a command (wysh: shell-style quoting)
_MODIFIERS = frozenset({"wysh", "ignerr", "u", "local", "scope", "vput"})
_MAX_DEPTH = 8  # nested source commands


class Resources:
    """Variables set by the resource files, and the account blocks they defined."""

    def __init__(self, warn: Callable[[str], None]) -> None:
        self.variables: dict[str, str] = {}
        self.accounts: dict[str, list[tuple[str, int, str]]] = {}  # name → (file, line, text)
        self.warn = warn
        self._warned_if = False

    # -- reading ----------------------------------------------------------------------------------

    def read_file(self, path: str, *, depth: int = 0, missing_ok: bool = True) -> None:
        """Run the commands of ``path``; a missing file is nothing (unless ``missing_ok``)."""
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 20)
        except FileNotFoundError:
            if missing_ok:
                return
            raise ConfigError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a directory") from None
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from None
        self.run_lines(path, data.decode("utf-8", "surrogateescape").splitlines(), depth)

    def run_lines(self, path: str, lines: list[str], depth: int = 0) -> None:
        block: list[tuple[str, int, str]] | None = None
        skipping = ""  # "define" or "if" while inside such a block
        nesting = 0
        for number, text in _logical_lines(lines):
            words = text.split(None, 1)
            if not words:
                continue
            head = words[0]
            if block is not None:
                if text == "}":
                    block = None
                else:
                    block.append((path, number, text))
                continue
            if skipping:
                if skipping == "define" and text == "}":
                    skipping = ""
                elif skipping == "if":
                    if head == "if":
                        nesting += 1
                    elif head == "endif":
                        nesting -= 1
                        if nesting == 0:
                            skipping = ""
                continue
            if head in ("account", "ac") and text.endswith("{"):
                name = text[len(head):-1].strip()
                block = self.accounts[name.lower()] = []
                continue
            if head == "define" and text.endswith("{"):
                skipping = "define"
                continue
            if head == "if":
                if not self._warned_if:
                    self.warn(f"{path}:{number}: if/endif blocks are not evaluated; their "
                              "commands are skipped")
                    self._warned_if = True
                skipping, nesting = "if", 1
                continue
            self.run_command(path, number, text, depth)

    def run_command(self, path: str, number: int, text: str, depth: int = 0) -> None:
        """One command line (``;`` sequences several)."""
        # s-nail: shell-style quoting with the wysh modifier or a non-empty v15-compat;
        # else the old style, in which $ and ; are plain characters
        shell = text.split(None, 1)[0] == "wysh" or bool(self.variables.get("v15-compat"))
        try:
            commands = _split(text, self.variables, shell=shell)
        except ValueError as e:
            self.warn(f"{path}:{number}: {e}; line ignored")
            return
        for words in commands:
            while words and words[0] in _MODIFIERS:
                words = words[1:]
            if not words:
                continue
            cmd, args = words[0], words[1:]
            if cmd in ("set", "se"):
                for arg in args:
                    set_variable(self.variables, arg)
            elif cmd in ("unset", "uns"):
                for arg in args:
                    self.variables.pop(arg, None)
            elif cmd in ("source", "so") and args:
                if depth >= _MAX_DEPTH:
                    self.warn(f"{path}:{number}: source nested too deeply; ignored")
                else:
                    self.read_file(os.path.expanduser(args[0]), depth=depth + 1,
                                   missing_ok=False)
            elif cmd in ("account", "ac") and len(args) == 1:
                self.activate(args[0])

    def activate(self, name: str) -> None:
        """Run the commands of account ``name``; ConfigError if no file defines it."""
        block = self.accounts.get(name.lower())
        if block is None:
            if name.lower() == "null":  # s-nail's account that always exists
                return
            raise ConfigError(f"account {name} is not defined (account {name} {{ … }} in "
                              "~/.mailrc)")
        for path, number, text in block:
            self.run_command(path, number, text)


def set_variable(variables: dict[str, str], arg: str) -> None:
    """``name=value``, ``name`` (boolean: the empty value) or ``noname`` (unset name)."""
    name, eq, value = arg.partition("=")
    if not eq and name.startswith("no") and len(name) > 2:
        variables.pop(name[2:], None)
        return
    if name:
        variables[name] = value


def load(command_line: Mapping[str, str], *, system: bool = True, account: str | None = None,
         user_file: str | None = None, system_file: str = SYSTEM_MAILRC,
         unset: frozenset[str] = frozenset(),
         warn: Callable[[str], None] = lambda msg: None) -> dict[str, str]:
    """The variables of the resource files (the system file unless ``system`` is False or
    $MAILX_NO_SYSTEM_RC is set; ``user_file``, default $MAILRC or ~/.mailrc, "" for none),
    then account ``account``, then ``command_line`` (-S) over them; ``unset`` names -S
    settings like ``-S nosave`` that remove a variable whatever the files say.

    Raises ConfigError for an account no file defines or a ``source`` file that is missing."""
    res = Resources(warn)
    # -S settings are known while the files run: $var expansion and v15-compat see them
    res.variables.update(command_line)
    if system and "MAILX_NO_SYSTEM_RC" not in os.environ:
        res.read_file(system_file)
    if user_file is None:
        user_file = os.environ.get("MAILRC") or os.path.join(os.path.expanduser("~"),
                                                            ".mailrc")
    if user_file:
        res.read_file(user_file)
    if account:
        res.activate(account)
    variables = res.variables
    for name in unset:
        variables.pop(name, None)
    variables.update(command_line)
    return variables


def _logical_lines(lines: list[str]) -> list[tuple[int, str]]:
    """Lines stripped, backslash-newline joined (follow lines lose their leading blanks),
    comments and empty lines dropped; with the number of each command's first line."""
    out: list[tuple[int, str]] = []
    pending = ""
    start = 0
    for number, raw in enumerate(lines, 1):
        line = raw.strip() if not pending else raw.lstrip()
        if not pending:
            start = number
        if line.endswith("\\") and not line.endswith("\\\\"):
            pending += line[:-1]
            continue
        line = pending + line
        pending = ""
        line = line.strip()
        if line and not line.startswith("#"):
            out.append((start, line))
    if pending.strip() and not pending.lstrip().startswith("#"):
        out.append((start, pending.strip()))
    return out


_ESCAPES = {"a": "\a", "b": "\b", "E": "\x1b", "e": "\x1b", "f": "\f", "n": "\n", "r": "\r",
            "t": "\t", "v": "\v", "\\": "\\", "'": "'", '"': '"'}


def _split(text: str, variables: Mapping[str, str], *, shell: bool) -> list[list[str]]:
    """The words of a command line: quotes and backslash; with ``shell`` also ``$'…'``,
    ``$VAR``/``${VAR}`` (s-nail's variables, then the environment), ``#`` comments and ``;``
    between commands, else a backslash inside quotes escapes only the quote.
    Raises ValueError for an unterminated quote."""
    commands: list[list[str]] = [[]]
    word: list[str] = []
    in_word = False
    i, n = 0, len(text)

    def expand(j: int) -> tuple[str, int]:
        if j < n and text[j] == "{":
            end = text.find("}", j)
            if end < 0:
                raise ValueError("missing } after ${")
            name = text[j + 1:end]
            j = end + 1
        else:
            k = j
            while k < n and (text[k].isalnum() or text[k] in "_-@.") and not (
                    k == j and text[k].isdigit()):
                k += 1
            name, j = text[j:k], k
            if not name:
                return "$", j
        value = variables.get(name)
        return (value if value is not None else os.environ.get(name, "")), j

    while i < n:
        c = text[i]
        if c in " \t":
            if in_word:
                commands[-1].append("".join(word))
                word, in_word = [], False
            i += 1
        elif c == ";" and shell:
            if in_word:
                commands[-1].append("".join(word))
                word, in_word = [], False
            commands.append([])
            i += 1
        elif c == "#" and not in_word and shell:
            break
        elif c == "\\":
            if i + 1 < n:
                word.append(text[i + 1])
            in_word = True
            i += 2
        elif c in "'\"" or (c == "$" and shell and text.startswith("$'", i)):
            quote = "'" if c == "$" else c
            start = i + 1 + (c == "$")
            if c == "$":  # $'...': C-like escapes
                escapes: Mapping[str, str] = _ESCAPES
            elif shell and c == "'":  # '...': all literal
                escapes = {}
            elif shell:  # "...": the shell's few escapes
                escapes = {ch: ch for ch in '$`"\\'}
            else:  # old style: only the quote itself
                escapes = {quote: quote}
            value, i = _quoted(text, start, quote, escapes,
                               expand if shell and c == '"' else None)
            word.append(value)
            in_word = True
        elif c == "$" and shell:
            value, i = expand(i + 1)
            word.append(value)
            in_word = True
        else:
            word.append(c)
            in_word = True
            i += 1
    if in_word:
        commands[-1].append("".join(word))
    return [c for c in commands if c]


def _quoted(text: str, i: int, quote: str, escapes: Mapping[str, str],
            expand: Callable[[int], tuple[str, int]] | None) -> tuple[str, int]:
    """The text of a quoted string starting at ``i`` (after the opening quote) and the index
    after its closing ``quote``; ``escapes[c]`` is what backslash-c stands for (others: both
    characters as they are); ``expand`` replaces ``$name``. ValueError if unterminated."""
    out: list[str] = []
    n = len(text)
    while i < n and text[i] != quote:
        c = text[i]
        escaped = escapes.get(text[i + 1]) if c == "\\" and i + 1 < n else None
        if escaped is not None:
            out.append(escaped)
            i += 2
        elif c == "$" and expand is not None:
            value, i = expand(i + 1)
            out.append(value)
        else:
            out.append(c)
            i += 1
    if i >= n:
        raise ValueError(f"unterminated {quote} quote")
    return "".join(out), i + 1
