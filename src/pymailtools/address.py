"""Addresses: RFC 5322 address lists (argv and headers) and RFC 5321 envelope addresses.

Hand-written scanner because this runs on sendmail's hot path (email.utils costs ~35 ms).
"""

from pymailtools.errors import AddressError

# On sendmail's hot path: no typing (~10 ms of start-up) and no `from __future__ import
# annotations` (importing __future__ costs more than evaluating these annotations); the
# names imported for the type checker alone are quoted where they annotate.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

MAX_ADDRESS = 320  # RFC 5321: 64 local-part + @ + 255 domain
_BREAK = frozenset(' \t\r\n"(<,;:[')


def _unsafe_char(s: str) -> str | None:
    for ch in s:
        if ch in "\r\n\x00" or ord(ch) < 0x20 and ch != "\t" or ch == "\x7f":
            return repr(ch)
    return None


_Token = tuple[str, str, int, int]


def _tokens(s: str) -> list[_Token]:
    """Split into (kind, text, start, end): atom, quoted, comment, angle, sep, colon; ``s[start:
    end]`` is the token's source (brackets, quotes and parentheses included)."""
    out: list[_Token] = []
    i, n = 0, len(s)
    while i < n:
        ch = s[i]
        if ch in " \t\r\n":
            i += 1
        elif ch in ",;":
            out.append(("sep", ch, i, i + 1))
            i += 1
        elif ch == ":":
            out.append(("colon", ch, i, i + 1))
            i += 1
        elif ch == '"':
            j, buf = i + 1, ['"']
            while j < n and s[j] != '"':
                if s[j] == "\\" and j + 1 < n:
                    buf.append(s[j : j + 2])
                    j += 2
                    continue
                buf.append(s[j])
                j += 1
            out.append(("quoted", "".join(buf) + '"', i, min(j + 1, n)))
            i = j + 1
        elif ch == "(":
            depth, j = 1, i + 1
            while j < n and depth:
                if s[j] == "\\":
                    j += 2
                    continue
                depth += {"(": 1, ")": -1}.get(s[j], 0)
                j += 1
            out.append(("comment", s[i + 1 : j - 1], i, min(j, n)))
            i = j
        elif ch == "<":
            j = s.find(">", i + 1)
            j = n if j < 0 else j
            out.append(("angle", s[i + 1 : j].strip(), i, min(j + 1, n)))
            i = j + 1
        elif ch == "[":
            j = s.find("]", i + 1)
            j = n - 1 if j < 0 else j
            out.append(("atom", s[i : j + 1], i, j + 1))
            i = j + 1
        else:
            j = i
            while j < n and s[j] not in _BREAK:
                j += 1
            out.append(("atom", s[i:j], i, j))
            i = j
    return out


def _unquote_phrase(text: str) -> str:
    if text.startswith('"') and text.endswith('"') and len(text) >= 2:
        text = text[1:-1]
        out, i = [], 0
        while i < len(text):
            if text[i] == "\\" and i + 1 < len(text):
                i += 1
            out.append(text[i])
            i += 1
        return "".join(out)
    return text


def parse_list(text: str) -> list[tuple[str, str]]:
    """(display name, address) for each mailbox in an RFC 5322 address list.

    Handles ``a@x, "Doe, J" <j@y>``, comments, groups (``G: a@x, b@y;``,
    ``undisclosed-recipients:;``) and source routes in angle addresses. Adjacent atoms
    without a separator are joined, as in ``user @ host``.
    """
    result: list[tuple[str, str]] = []
    for group in _mailboxes(text):
        angle = [t for k, t, _, _ in group if k == "angle"]
        comments = [t for k, t, _, _ in group if k == "comment"]
        if angle:
            idx = next(i for i, t in enumerate(group) if t[0] == "angle")
            name = " ".join(_unquote_phrase(t) for k, t, _, _ in group[:idx]
                            if k in ("atom", "quoted"))
            addr = angle[0]
            if addr.startswith("@") and ":" in addr:
                addr = addr.split(":", 1)[1]
        else:
            addr = "".join(t for k, t, _, _ in group if k in ("atom", "quoted"))
            name = comments[0] if comments else ""
        if addr or angle:
            result.append((name.strip(), addr))
    return result


def _mailboxes(text: str) -> list[list[_Token]]:
    """The tokens of each mailbox of an address list (group names and separators left out)."""
    groups: list[list[_Token]] = []
    group: list[_Token] = []
    for tok in _tokens(text):
        kind = tok[0]
        if kind == "sep":
            if group:
                groups.append(group)
            group = []
        elif kind == "colon":
            if any(t[0] == "angle" for t in group):
                continue
            group = []  # a group's display name
        else:
            group.append(tok)
    if group:
        groups.append(group)
    return groups


def rewrite_list(text: str, rewrite: "Callable[[str], str]") -> str:
    """``text`` (an address list header value) with each mailbox's address replaced by
    ``rewrite(address)``; display names, comments, groups, RFC 2047 words, spacing and folding
    stay as they were. An address the function returns unchanged is not touched at all."""
    edits: list[tuple[int, int, str]] = []
    for group in _mailboxes(text):
        angle = next((t for t in group if t[0] == "angle"), None)
        if angle is not None:
            addr = angle[1]
            if addr.startswith("@") and ":" in addr:
                addr = addr.split(":", 1)[1]  # a source route goes when the address changes
            new = rewrite(addr) if addr else addr
            if new != addr:
                edits.append((angle[2], angle[3], f"<{new}>"))
            continue
        parts = [t for t in group if t[0] in ("atom", "quoted")]
        addr = "".join(t[1] for t in parts)
        if not addr:
            continue
        new = rewrite(addr)
        if new != addr:
            start, end = parts[0][2], parts[-1][3]
            inner = [t for t in group if t[0] == "comment" and start < t[2] < end]
            edits.append((start, end, " ".join([new, *(text[t[2]:t[3]] for t in inner)])))
    for start, end, new in reversed(edits):
        text = text[:start] + new + text[end:]
    return text


def check_envelope(addr: str, what: str = "address") -> str:
    """Validate an envelope address (no CR/LF/NUL/controls, no leading '-', sane length)."""
    bad = _unsafe_char(addr)
    if bad:
        raise AddressError(f"{what} contains a control character {bad}: {addr!r}")
    if addr.startswith("-"):
        raise AddressError(f"{what} must not start with '-': {addr}")
    if len(addr) > MAX_ADDRESS:
        raise AddressError(f"{what} is longer than {MAX_ADDRESS} characters")
    local, at, domain = addr.rpartition("@")
    if at and (not local or not domain or " " in domain or domain.startswith(".")):
        raise AddressError(f"bad {what}: {addr}")
    if not at and not addr:
        raise AddressError(f"empty {what}")
    if any(c in addr for c in "<>") or (" " in addr and not local.startswith('"')):
        raise AddressError(f"bad {what}: {addr}")
    return addr


def qualify(addr: str, origin: str) -> str:
    """Append ``@origin`` to a bare local part, as Postfix's append_at_myorigin does."""
    return addr if "@" in addr or not addr else f"{addr}@{origin}"


def parse_recipients(text: str, origin: str) -> list[str]:
    """Envelope recipients from one argument or header value, validated and qualified."""
    if _unsafe_char(text.replace("\t", " ")):
        raise AddressError(f"recipient contains a control character: {text!r}")
    out = []
    for _, addr in parse_list(text):
        if not addr:
            continue
        out.append(qualify(check_envelope(addr, "recipient"), origin))
    return out


def parse_sender(text: str, origin: str) -> str:
    """The envelope sender from -f/-r: '' or '<>' is the null sender; first of a list wins."""
    if _unsafe_char(text):
        raise AddressError(f"sender contains a control character: {text!r}")
    if text.strip() in ("", "<>"):
        return ""
    if text.startswith("-"):
        raise AddressError(f"sender must not start with '-': {text}")
    found = [a for _, a in parse_list(text) if a]
    if not found:
        return ""
    return qualify(check_envelope(found[0], "sender"), origin)


def domain_of(addr: str) -> str:
    return addr.rpartition("@")[2].lower() if "@" in addr else ""


def local_part(addr: str) -> str:
    return addr.rpartition("@")[0] if "@" in addr else addr

