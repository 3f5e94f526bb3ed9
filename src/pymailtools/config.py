"""Configuration: embedded defaults, TOML files and PYMAILTOOLS_* variables, validated.

Kept cheap to import: the sendmail submission path loads it, so no re, json or dataclasses.
tomllib alone costs about as much as Postfix's whole sendmail run (it pulls in re, typing,
datetime), so the flat ``key = value`` files admins write are read by ``fast_toml``; anything
it does not recognise with certainty goes to tomllib, which stays the authority.
"""

import os
import sys

from pymailtools.errors import ConfigError

# On sendmail's hot path: no typing (~10 ms of start-up) and no `from __future__ import
# annotations` (importing __future__ costs more than evaluating these annotations); the
# names imported for the type checker alone are quoted where they annotate.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

SYSTEM_CONFIG = "/etc/pymailtools/config.toml"
ROOT_QUEUE = "/var/spool/pymailtools"

_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object, key: str = "duration") -> int:
    """Seconds from an int or a Postfix time value like ``300s``, ``5d``, ``1h30m``."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a time like 300s or 5d, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{key}: must not be negative: {value}")
        return value
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: expected a time like 300s or 5d, got {value!r}")
    total, digits = 0, ""
    for ch in value.strip():
        if "0" <= ch <= "9":
            digits += ch
        elif ch in _TIME_UNITS and digits:
            total += int(digits) * _TIME_UNITS[ch]
            digits = ""
        else:
            raise ConfigError(f"{key}: expected a time like 300s or 5d, got {value!r}")
    if digits:
        total += int(digits)
    return total


def _size(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{key}: expected a size in bytes, got {value!r}")
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"{key}: expected a size in bytes, got {value!r}") from None
    if n < 0:
        raise ConfigError(f"{key}: must not be negative: {value!r}")
    return n


def _workers(value: object, key: str) -> int:
    n = _size(value, key)
    if n > MAX_WORKERS:  # a typo's extra zeros would fork the machine to a halt
        raise ConfigError(f"{key}: at most {MAX_WORKERS}, got {value!r}")
    return n


MAX_WORKERS = 1024


def _string(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if "\n" in value or "\r" in value or "\x00" in value:
        raise ConfigError(f"{key}: control characters are not allowed")
    return value


def _path(value: object, key: str) -> str:
    s = _string(value, key)
    if not s.startswith("/"):
        raise ConfigError(f"{key}: expected an absolute path, got {s!r}")
    return s


def _list(value: object, key: str) -> list[str]:
    """A TOML list of strings, or one string split on commas and white space (Postfix style)."""
    if isinstance(value, str):
        return [p for p in value.replace(",", " ").split() if p]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [_string(v, key) for v in value]
    raise ConfigError(f"{key}: expected a list of strings, got {value!r}")


def _choice(*choices: str) -> "Callable[[object, str], str]":
    def check(value: object, key: str) -> str:
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return check


def _boolean(value: object, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("yes", "true", "1", "no", "false", "0"):
        return value.lower() in ("yes", "true", "1")
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _duration(value: object, key: str) -> int:
    return parse_duration(value, key)


def _optional_path(value: object, key: str) -> str:
    """An absolute path, or "" for none."""
    if value == "":
        return ""
    return _path(value, key)


def _home_mailbox(value: object, key: str) -> str:
    """A path below the user's home directory ("Mailbox", "Maildir/"), or "" for the spool."""
    s = _string(value, key)
    if s.startswith("/") or any(part in ("", ".", "..") for part in s.rstrip("/").split("/")):
        if s:
            raise ConfigError(f"{key}: expected a path relative to the home directory such as "
                              f"Mailbox or Maildir/, got {s!r}")
    return s


ANYONE = "static:anyone"


def _users(value: object, key: str) -> list[str]:
    """``static:anyone`` or a list of user names (Postfix's authorized_*_users, without its
    other lookup tables); an empty list admits nobody but root and the queue's owner."""
    items = _list(value, key)
    for item in items:
        if ":" in item and item != ANYONE:
            raise ConfigError(f"{key}: expected static:anyone or user names, got {item!r}")
    return items


def _nameservers(value: object, key: str) -> list[str]:
    """``ip`` or ``ip:port`` (``[v6]:port`` for IPv6 with a port); checked when used."""
    items = _list(value, key)
    for item in items:
        if not all(c.isalnum() or c in ".:[]%" for c in item):
            raise ConfigError(f"{key}: expected ip or ip:port, got {item!r}")
    return items


def _maps(value: object, key: str) -> str | list[str]:
    """Lookup tables: one string as Postfix writes it ("hash:/a, regexp:/b"), or a TOML list
    of table specs; pymailtools.tables opens them when they are used."""
    if isinstance(value, str):
        return _string(value, key)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [_string(v, key) for v in value]
    raise ConfigError(f"{key}: expected lookup tables (a string or a list), got {value!r}")


ADDRESS_CLASSES = ("envelope_sender", "envelope_recipient", "header_sender",
                   "header_recipient")


# key -> (parser, default). A default of None is computed in Config.__init__.
SCHEMA: "dict[str, tuple[Callable[[Any, str], Any], Any]]" = {
    "queue_directory": (_path, None),
    "mail_spool_directory": (_path, "/var/mail"),
    "myhostname": (_string, None),
    "mydomain": (_string, None),
    "myorigin": (_string, None),
    "mydestination": (_list, None),
    "alias_maps": (_list, ["/etc/aliases"]),
    "delivery_mode": (_choice("background", "foreground", "queue"), "background"),
    "message_size_limit": (_size, 10240000),
    "header_size_limit": (_size, 102400),
    "minimal_backoff_time": (_duration, 300),
    "maximal_backoff_time": (_duration, 4000),
    "maximal_queue_lifetime": (_duration, 432000),
    "bounce_queue_lifetime": (_duration, 432000),
    "delay_warning_time": (_duration, 0),
    "stale_lock_time": (_duration, 500),
    "deliver_lock_attempts": (_size, 20),
    "deliver_lock_delay": (_duration, 1),
    "command_time_limit": (_duration, 1000),
    # Mailbox delivery of local users, first match wins: a command per user, a command for
    # all, a mailbox in the home directory, else the spool (Postfix's local(8) precedence).
    "mailbox_command_maps": (_maps, ""),
    "mailbox_command": (_string, ""),
    "home_mailbox": (_home_mailbox, ""),
    "forward_path": (_list, ["$home/.forward${recipient_delimiter}${extension}",
                             "$home/.forward"]),
    "allow_mail_to_commands": (_list, ["alias", "forward"]),
    "allow_mail_to_files": (_list, ["alias", "forward"]),
    "syslog": (_boolean, True),
    # Address rewriting: at queue entry (Postfix's cleanup), and smtp_generic_maps on the way
    # out over SMTP.
    "recipient_delimiter": (_string, ""),
    "canonical_maps": (_maps, ""),
    "sender_canonical_maps": (_maps, ""),
    "recipient_canonical_maps": (_maps, ""),
    "canonical_classes": (_list, list(ADDRESS_CLASSES)),
    "masquerade_domains": (_list, []),
    "masquerade_exceptions": (_list, []),
    "masquerade_classes": (_list, ["envelope_sender", "header_sender", "header_recipient"]),
    "virtual_alias_maps": (_maps, ""),
    "virtual_alias_domains": (_list, ["$virtual_alias_maps"]),
    "virtual_alias_recursion_limit": (_size, 1000),
    "virtual_alias_expansion_limit": (_size, 1000),
    "smtp_generic_maps": (_maps, ""),
    # DKIM signing of mail leaving over SMTP, by the From: domain; off while the list is empty.
    "dkim_domains": (_list, []),
    "dkim_selector": (_string, ""),
    "dkim_private_key_file": (_optional_path, ""),
    # Who may list (mailq) and flush (postqueue -f, sendmail -q) the queue; root always may.
    "authorized_mailq_users": (_users, [ANYONE]),
    "authorized_flush_users": (_users, [ANYONE]),
    # Remote delivery (SMTP client); names and defaults are Postfix's where it has them.
    "relayhost": (_string, ""),
    "smtp_port": (_size, 25),
    "dns_nameservers": (_nameservers, []),
    "dns_timeout": (_duration, 10),
    "smtp_mx_address_limit": (_size, 5),
    "smtp_tls_security_level": (_choice("none", "may", "encrypt", "verify", "fingerprint"),
                                "may"),
    "smtp_tls_CAfile": (_optional_path, ""),
    "smtp_tls_CApath": (_optional_path, ""),
    "smtp_tls_wrappermode": (_boolean, False),
    "smtp_tls_cert_file": (_optional_path, ""),
    "smtp_tls_key_file": (_optional_path, ""),
    "smtp_tls_fingerprint_cert_match": (_list, []),
    "smtp_tls_fingerprint_digest": (_string, "sha256"),  # checked by the SMTP client
    "smtp_sasl_username": (_string, ""),
    "smtp_sasl_password": (_string, ""),
    "smtp_sasl_password_file": (_optional_path, ""),
    "smtp_sasl_password_command": (_string, ""),
    "smtp_sasl_oauth2_token_command": (_string, ""),
    "smtp_sasl_command_timeout": (_duration, 30),
    "smtp_sasl_mechanism_filter": (_list, []),
    "smtp_sasl_allow_plaintext": (_boolean, False),
    # Routing: lookup tables ("type:name", Postfix's syntax), searched in order.
    "transport_maps": (_maps, ""),
    "relay_domains": (_list, []),
    "sender_dependent_relayhost_maps": (_maps, ""),
    "smtp_sasl_password_maps": (_maps, ""),
    "smtp_sender_dependent_authentication": (_boolean, False),
    "smtp_connect_timeout": (_duration, 30),
    "smtp_helo_timeout": (_duration, 300),
    "smtp_starttls_timeout": (_duration, 300),
    "smtp_mail_timeout": (_duration, 300),
    "smtp_rcpt_timeout": (_duration, 300),
    "smtp_data_init_timeout": (_duration, 120),
    "smtp_data_xfer_timeout": (_duration, 180),
    "smtp_data_done_timeout": (_duration, 600),
    "smtp_rset_timeout": (_duration, 20),
    "smtp_quit_timeout": (_duration, 300),
    "smtp_connection_reuse_time_limit": (_duration, 300),
    "default_destination_concurrency_limit": (_size, 20),
    "default_destination_recipient_limit": (_size, 50),
    "default_process_limit": (_size, 100),
    # The SMTP listener (sendmail -bd / -bs); addresses and networks are checked when used.
    "smtpd_listen": (_list, ["127.0.0.1:25", "[::1]:25"]),
    "mynetworks": (_list, ["127.0.0.0/8", "::1/128"]),
    "smtpd_recipient_limit": (_size, 1000),
    "smtpd_recipient_overshoot_limit": (_size, 1000),
    "smtpd_client_connection_count_limit": (_size, 50),
    "smtpd_timeout": (_duration, 300),
    "smtpd_error_limit": (_size, 20),
    "smtpd_forbid_bare_newline": (_choice("reject", "normalize"), "reject"),
    "smtpd_tls_cert_file": (_optional_path, ""),
    "smtpd_tls_key_file": (_optional_path, ""),
    "smtpd_sasl_password_file": (_optional_path, ""),
    "smtpd_workers": (_workers, 0),  # 0: two listener processes per CPU
}


class Config:
    """Effective settings; attribute names are the configuration keys."""

    queue_directory: str
    mail_spool_directory: str
    myhostname: str
    mydomain: str
    myorigin: str
    mydestination: list[str]
    alias_maps: list[str]
    delivery_mode: str
    message_size_limit: int
    header_size_limit: int
    minimal_backoff_time: int
    maximal_backoff_time: int
    maximal_queue_lifetime: int
    bounce_queue_lifetime: int
    delay_warning_time: int
    stale_lock_time: int
    deliver_lock_attempts: int
    deliver_lock_delay: int
    command_time_limit: int
    mailbox_command_maps: str | list[str]
    mailbox_command: str
    home_mailbox: str
    forward_path: list[str]
    allow_mail_to_commands: list[str]
    allow_mail_to_files: list[str]
    syslog: bool
    recipient_delimiter: str
    canonical_maps: str | list[str]
    sender_canonical_maps: str | list[str]
    recipient_canonical_maps: str | list[str]
    canonical_classes: list[str]
    masquerade_domains: list[str]
    masquerade_exceptions: list[str]
    masquerade_classes: list[str]
    virtual_alias_maps: str | list[str]
    virtual_alias_domains: list[str]
    virtual_alias_recursion_limit: int
    virtual_alias_expansion_limit: int
    smtp_generic_maps: str | list[str]
    dkim_domains: list[str]
    dkim_selector: str
    dkim_private_key_file: str
    authorized_mailq_users: list[str]
    authorized_flush_users: list[str]
    relayhost: str
    smtp_port: int
    dns_nameservers: list[str]
    dns_timeout: int
    smtp_mx_address_limit: int
    smtp_tls_security_level: str
    smtp_tls_CAfile: str
    smtp_tls_CApath: str
    smtp_tls_wrappermode: bool
    smtp_tls_cert_file: str
    smtp_tls_key_file: str
    smtp_tls_fingerprint_cert_match: list[str]
    smtp_tls_fingerprint_digest: str
    smtp_sasl_username: str
    smtp_sasl_password: str
    smtp_sasl_password_file: str
    smtp_sasl_password_command: str
    smtp_sasl_oauth2_token_command: str
    smtp_sasl_command_timeout: int
    smtp_sasl_mechanism_filter: list[str]
    smtp_sasl_allow_plaintext: bool
    transport_maps: str | list[str]
    relay_domains: list[str]
    sender_dependent_relayhost_maps: str | list[str]
    smtp_sasl_password_maps: str | list[str]
    smtp_sender_dependent_authentication: bool
    smtp_connect_timeout: int
    smtp_helo_timeout: int
    smtp_starttls_timeout: int
    smtp_mail_timeout: int
    smtp_rcpt_timeout: int
    smtp_data_init_timeout: int
    smtp_data_xfer_timeout: int
    smtp_data_done_timeout: int
    smtp_rset_timeout: int
    smtp_quit_timeout: int
    smtp_connection_reuse_time_limit: int
    default_destination_concurrency_limit: int
    default_destination_recipient_limit: int
    default_process_limit: int
    smtpd_listen: list[str]
    mynetworks: list[str]
    smtpd_recipient_limit: int
    smtpd_recipient_overshoot_limit: int
    smtpd_client_connection_count_limit: int
    smtpd_timeout: int
    smtpd_error_limit: int
    smtpd_forbid_bare_newline: str
    smtpd_tls_cert_file: str
    smtpd_tls_key_file: str
    smtpd_sasl_password_file: str
    smtpd_workers: int

    def __init__(self, values: "Mapping[str, Any] | None" = None) -> None:
        values = dict(values or {})
        for key, (parse, default) in SCHEMA.items():
            if key in values:
                setattr(self, key, parse(values[key], key))
            elif default is not None:
                setattr(self, key, list(default) if isinstance(default, list) else default)
        self.warnings: list[str] = [
            f"unknown configuration key {key!r} ignored" for key in values if key not in SCHEMA
        ]
        if not hasattr(self, "myhostname"):
            self.myhostname = os.uname().nodename or "localhost"
        if not hasattr(self, "mydomain"):
            _, dot, rest = self.myhostname.partition(".")
            self.mydomain = rest if dot and rest else "localdomain"
        if not hasattr(self, "myorigin"):
            self.myorigin = self.myhostname
        if not hasattr(self, "mydestination"):
            short = self.myhostname.partition(".")[0]
            self.mydestination = list(
                dict.fromkeys([self.myhostname, short, "localhost", "localhost.localdomain"])
            )
        if not hasattr(self, "queue_directory"):
            self.queue_directory = default_queue_directory()

    @property
    def public_listing(self) -> bool:
        """May every user list the queue? Then Queue.ensure makes the listing readable."""
        return ANYONE in self.authorized_mailq_users

    @property
    def rewrites(self) -> bool:
        """Is any queue-entry rewriting configured? Without it, submission does nothing new."""
        return bool(self.canonical_maps or self.sender_canonical_maps
                    or self.recipient_canonical_maps or self.masquerade_domains
                    or self.virtual_alias_maps)

    def is_local_domain(self, domain: str) -> bool:
        d = domain.lower().rstrip(".")
        return any(d == x.lower().rstrip(".") for x in self.mydestination)


def default_queue_directory() -> str:
    """Root's queue; for an ordinary user the system queue when it exists, else a private one."""
    if os.geteuid() == 0 or os.path.isdir(ROOT_QUEUE):
        return ROOT_QUEUE
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "pymailtools")


_BARE_KEY = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"


def _controls(text: str) -> bool:
    """Does ``text`` hold a control character (C0 or DEL)? A printable text cannot, and that
    check is one C call: the character loop runs only for the rest (tabs, rare characters)."""
    return not text.isprintable() and any(ord(c) < 0x20 or c == "\x7f" for c in text)


def _fast_string(text: str, i: int) -> tuple[str, int] | None:
    """A one-line basic or literal string without escapes starting at text[i]."""
    quote = text[i]
    end = text.find(quote, i + 1)
    if end < 0:
        return None
    value = text[i + 1 : end]
    if "\\" in value or _controls(value):
        return None
    if text.startswith(quote * 2, i):  # '' / "" could open a multi-line string
        return None
    return value, end + 1


def _fast_value(text: str) -> tuple[object, str] | None:
    """(value, rest of line) for a string, integer, boolean or one-line array of strings."""
    if not text:
        return None
    if text[0] in "\"'":
        got = _fast_string(text, 0)
        return None if got is None else (got[0], text[got[1] :])
    if text[0] == "[":
        items: list[object] = []
        i = 1
        while True:
            while i < len(text) and text[i] in " \t":
                i += 1
            if i < len(text) and text[i] == "]":
                return items, text[i + 1 :]
            if i >= len(text) or text[i] not in "\"'":
                return None
            got = _fast_string(text, i)
            if got is None:
                return None
            items.append(got[0])
            i = got[1]
            while i < len(text) and text[i] in " \t":
                i += 1
            if i < len(text) and text[i] == ",":
                i += 1
            elif i >= len(text) or text[i] != "]":
                return None
    head = text.split("#", 1)[0].split(" ")[0].split("\t")
    word = head[0]
    rest = text[len(word) :]
    if word in ("true", "false"):
        return word == "true", rest
    digits = word[1:] if word[:1] in "+-" else word
    if digits.isdigit() and digits.isascii() and (digits == "0" or digits[0] != "0"):
        return int(word), rest
    return None


def fast_toml(text: str) -> dict[str, object] | None:
    """Parse a flat TOML file of ``key = value`` lines, or return None to defer to tomllib.

    Must never disagree with tomllib: whatever it is not sure about (tables, escapes, floats,
    dates, dotted or quoted keys, duplicates, multi-line values) returns None.
    """
    out: dict[str, object] = {}
    raws = text.split("\n")
    for n, raw in enumerate(raws):
        if raw.endswith("\r") and n < len(raws) - 1:
            raw = raw[:-1]  # CRLF; a CR anywhere else is an error tomllib should report
        if "\r" in raw:
            return None
        line = raw.strip(" \t")
        if not line or line.startswith("#"):
            if _controls(line.replace("\t", " ")):
                return None  # TOML allows no control character in a comment either
            continue
        key, eq, value = line.partition("=")
        key = key.strip(" \t")
        if not eq or not key or key.strip(_BARE_KEY) or key in out:
            return None
        got = _fast_value(value.strip(" \t"))
        if got is None:
            return None
        rest = got[1].strip(" \t")
        if rest and (not rest.startswith("#") or _controls(rest.replace("\t", " "))):
            return None
        out[key] = got[0]
    return out


def _read_toml(path: str, check_owner: bool) -> "dict[str, Any]":
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot open: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if check_owner and (st.st_uid != 0 or st.st_mode & 0o022):
            raise ConfigError(
                f"{path}: unsafe permissions: must be owned by root and not group/world-writable"
            )
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    fast = fast_toml(text)
    if fast is not None:
        return fast
    # off the hot path: only a file the fast parser declines needs tomllib
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        head, sep, tail = msg.partition(" (at line ")
        if sep:
            line = tail.split(",", 1)[0]
            raise ConfigError(f"{path}:{line}: {head}") from None
        raise ConfigError(f"{path}: {msg}") from None


def load(path: str | None = None, environ: "Mapping[str, str] | None" = None) -> Config:
    """Read the configuration: the system and user files, or ``path`` / $PYMAILTOOLS_CONFIG
    alone, then PYMAILTOOLS_<KEY> variables. Raises ConfigError naming the file or key."""
    env = os.environ if environ is None else environ
    root = os.geteuid() == 0
    values: dict[str, Any] = {}
    explicit = path or env.get("PYMAILTOOLS_CONFIG")
    if explicit:
        if not os.path.exists(explicit):
            raise ConfigError(f"{explicit}: no such configuration file")
        files = [explicit]
    else:
        files = [SYSTEM_CONFIG]
        if not root:
            xdg = env.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
            files.append(os.path.join(xdg, "pymailtools", "config.toml"))
    for f in files:
        if os.path.exists(f):
            values.update(_read_toml(f, check_owner=root))
    # Environment names are upper case; smtp_tls_CAfile keeps Postfix's mixed case. The names
    # alone are looked at first: decoding every variable's value costs more than the rest.
    names = [name for name in env if name.startswith("PYMAILTOOLS_")]
    if names and names != ["PYMAILTOOLS_CONFIG"]:
        by_lower = {k.lower(): k for k in SCHEMA}
        for name in names:
            key = by_lower.get(name[len("PYMAILTOOLS_") :].lower())
            if key is not None and name != "PYMAILTOOLS_CONFIG":
                values[key] = env[name]
    return Config(values)


def warn(config: Config, prog: str) -> None:
    """Print configuration warnings (unknown keys) the Postfix way."""
    for w in config.warnings:
        print(f"{prog}: warning: {w}", file=sys.stderr)
