"""Postfix's mailq text and postqueue -j JSON for one entry, in the parts that do not change
until the envelope does: written into the summary index with each envelope (index.py), so a
listing of 100,000 entries only adds the queue id's marker and the arrival date.
Cheap to import (sendmail's hot path writes index lines): no imports at all.
"""

_PAD = " " * 47
_REASON_LINES: dict[str, str] = {}  # a backlog shares a few reasons: format each once
_JSON_SHORT = {"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
               "\\": "\\\\", '"': '\\"'}


def printable(s: str) -> str:
    """Unprintable characters as '?', like Postfix, so one field stays one line."""
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else "?" for c in s)


def json_quote(s: str) -> str:
    """Postfix's json_quote: short escapes, other controls and DEL as \\u00XX (upper case),
    UTF-8 kept; bytes that were not UTF-8 (surrogate escapes) become '?'."""
    if s.isascii() and s.isprintable() and '"' not in s and "\\" not in s:
        return s
    out = []
    for c in s:
        o = ord(c)
        if c in _JSON_SHORT:
            out.append(_JSON_SHORT[c])
        elif o < 0x20 or o == 0x7F:
            out.append("\\u%04X" % o)
        elif 0xD800 <= o <= 0xDFFF:
            out.append("?")
        else:
            out.append(c)
    return "".join(out)


def _reason_line(reason: str) -> str:
    line = _REASON_LINES.get(reason)
    if line is None:
        if len(_REASON_LINES) > 1024:
            _REASON_LINES.clear()
        text = printable(reason) or "reason unavailable"
        line = _REASON_LINES[reason] = "%*s(%s)\n" % (max(0, 76 - len(text)), "", text)
    return line


def mailq_tail(sender: str, pending: list[tuple[str, str]]) -> str:
    """What follows the arrival date in mailq's long-id layout: the sender, then each reason
    above the recipients (not yet done) it applies to. Ends with a newline."""
    if not sender:
        sender = "MAILER-DAEMON"
    elif not sender.isprintable():
        sender = printable(sender)
    out = " " + sender + "\n"
    previous = ""
    for address, reason in pending:
        if reason != previous:
            out += _reason_line(reason)
            previous = reason
        out += _PAD + (address if address.isprintable() else printable(address)) + "\n"
    return out


def json_tail(qid: str, arrival: float, size: int, sender: str,
              pending: list[tuple[str, str]]) -> str:
    """postqueue -j's object after "queue_name": Postfix's keys, order, separators and types.
    Ends with the closing brace, without the newline."""
    rcpts = []
    for address, reason in pending:
        if reason:
            rcpts.append('{"address": "%s", "delay_reason": "%s"}'
                         % (json_quote(address), json_quote(reason)))
        else:
            rcpts.append('{"address": "%s"}' % json_quote(address))
    return ('"queue_id": "%s", "arrival_time": %d, "message_size": %d, '
            '"forced_expire": false, "sender": "%s", "recipients": [%s]}'
            % (json_quote(qid), int(arrival), size, json_quote(sender or "MAILER-DAEMON"),
               ", ".join(rcpts)))
