"""An account on a mail server as s-nail describes it: the URL, the user, the password chain,
~/.netrc, and the TLS and SASL settings, resolved into the client's Policy for any protocol.

Shared by every protocol ``mail`` speaks (SMTP now, IMAP and POP3 later). The variables are
s-nail's (v15-compat form) and are looked up as s-nail's "variable chains": for ``password``
on ``smtp://me@mx.example:587`` the first of ``password-me@mx.example:587``,
``password-me@mx.example``, ``password-mx.example:587``, ``password-mx.example`` and
``password`` that is set wins (USER is never percent-encoded in a variable name).

- ``parse_url(text)``: ``PROTOCOL://[USER[:PASSWORD]@]HOST[:PORT][/path]`` → ``Url``.
- ``chain(variables, name, user, host, port)``: one variable through its chain.
- ``account_user(variables, protocol, url_user, host, port)``: the user (URL, then
  ``PROTOCOL-auth-user``, ``user``, then the .netrc when ``netrc-lookup`` is set).
- ``password(variables, user, host, port)``: the password chain, then the .netrc; None when
  neither has one (a password *command* is no password: ``server_policy`` hands it to the
  client, which runs it when it needs it).
- ``server_policy(cfg, variables, scheme=, user=, host=, port=)``: a Policy with TLS level,
  implicit TLS, CA file/dir/defaults, SASL mechanisms, credentials and the password/token
  commands set from the variables.
- ``unverified(variables, user, host, port)``: whether ``tls-verify`` says ignore/warn (the
  caller prints a loud line: the server's identity is not checked).

Bad values raise UsageError (64), a .netrc others can read ConfigError (78); secrets never
appear in a message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NamedTuple

from pymailtools.config import Config
from pymailtools.errors import ConfigError, UsageError
from pymailtools.fileio import read_private

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pymailtools.smtp.policy import Policy


class Scheme(NamedTuple):
    """A URL scheme: the protocol whose variables apply, its default port, TLS on connect."""

    protocol: str
    port: int
    implicit_tls: bool


SCHEMES = {
    "smtp": Scheme("smtp", 25, False), "submission": Scheme("smtp", 587, False),
    "smtps": Scheme("smtp", 465, True), "submissions": Scheme("smtp", 465, True),
    "imap": Scheme("imap", 143, False), "imaps": Scheme("imap", 993, True),
    "pop3": Scheme("pop3", 110, False), "pop3s": Scheme("pop3", 995, True),
}
# tls-verify: True = the certificate must verify; False = not checked (warn: we cannot go on
# after a failed check and still tell, so warn checks nothing either, and says so)
VERIFY = {"strict": True, "ask": True, "warn": False, "ignore": False}
# SASL mechanisms the client knows (s-nail's smtp-auth values, lower case)
MECHANISMS = ("plain", "login", "xoauth2", "oauthbearer")


class Url(NamedTuple):
    """A parsed server URL; ``user`` and ``password`` percent-decoded, "" when absent."""

    scheme: str
    user: str
    password: str
    host: str
    port: int
    path: str
    shown: str  # as written, the password replaced by ***: for messages

    @property
    def protocol(self) -> str:
        return SCHEMES[self.scheme].protocol


def parse_url(text: str, *, schemes: tuple[str, ...] = tuple(SCHEMES)) -> Url:
    """``PROTOCOL://[USER[:PASSWORD]@]HOST[:PORT][/path]`` with one of ``schemes``;
    UsageError if bad (the password is never in the message)."""
    from urllib.parse import unquote

    from pymailtools.smtp import nexthop

    scheme, sep, rest = text.strip().partition("://")
    if not sep or scheme.lower() not in schemes:
        # never the rest of the text: it may hold a password
        what = f"unsupported URL scheme {scheme.lower()}://" if sep else "not a server URL"
        raise UsageError(f"{what} (expected {', '.join(s + '://' for s in schemes)})")
    scheme = scheme.lower()
    rest, slash, path = rest.partition("/")
    userinfo, at, hostport = rest.rpartition("@")
    user = password = ""
    shown = f"{scheme}://{hostport}"
    if at:
        name, colon, secret = userinfo.partition(":")
        user, password = unquote(name), unquote(secret)
        shown = f"{scheme}://{name}{':***' if colon else ''}@{hostport}"
    try:
        hp = nexthop.split(hostport, SCHEMES[scheme].port)
        host = nexthop.check_host(hp.host)
    except ValueError as e:
        raise UsageError(f"bad server {shown}: {e}") from None
    return Url(scheme, user, password, host, hp.port, path if slash else "", shown)


def chain_names(name: str, user: str, host: str, port: int | None) -> list[str]:
    """The variable names of ``name``'s chain, most specific first."""
    names = []
    if user:
        if port:
            names.append(f"{name}-{user}@{host}:{port}")
        names.append(f"{name}-{user}@{host}")
    if port:
        names.append(f"{name}-{host}:{port}")
    names += [f"{name}-{host}", name]
    return names


def chain(variables: Mapping[str, str], name: str, user: str, host: str,
          port: int | None) -> str | None:
    """The value of the most specific variable of ``name``'s chain that is set, else None.
    An ``ssl-`` name is also looked up as s-nail's older ``ssl-`` spelling of ``tls-``."""
    for n in chain_names(name, user, host, port):
        if n in variables:
            return variables[n]
    if name.startswith("tls-"):
        return chain(variables, "ssl-" + name[4:], user, host, port)
    return None


# -- ~/.netrc -------------------------------------------------------------------------------------

class NetrcEntry(NamedTuple):
    machine: str  # lower case; "*.example.org" matches one more label
    login: str
    password: str


NETRC_LIMIT = 1 << 20  # bytes; a .netrc is a few lines


def netrc_path() -> str:
    return os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")


def read_netrc(path: str | None = None) -> list[NetrcEntry]:
    """The machine entries of a .netrc (``default`` is not used, as in s-nail); [] if absent.

    Raises ConfigError when the file may not hold a secret by fileio.not_private's rule, the
    one for every secret we read: a regular file, owned by root or by us, closed to group and
    others (s-nail too refuses one that others may use)."""
    path = path or netrc_path()
    try:
        data = read_private(path, NETRC_LIMIT)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError(f"cannot open {path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    return _parse_netrc(data.decode("utf-8", "surrogateescape"))


def _parse_netrc(text: str) -> list[NetrcEntry]:
    import shlex

    # comments only where a line starts with #: a password may contain one
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    lexer = shlex.shlex("\n".join(lines), posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    lexer.quotes = '"'
    try:
        tokens = list(lexer)
    except ValueError:  # an unterminated quote: BSD takes the rest as the token
        tokens = "\n".join(lines).split()
    entries: list[NetrcEntry] = []
    machine: str | None = None
    login = password = ""
    i = 0
    while i < len(tokens):
        word = tokens[i]
        value = tokens[i + 1] if i + 1 < len(tokens) else ""
        if word in ("machine", "default"):
            if machine is not None:
                entries.append(NetrcEntry(machine, login, password))
            machine, login, password = (value.lower() if word == "machine" else None), "", ""
            i += 2 if word == "machine" else 1
        elif word in ("login", "password", "account"):
            if word == "login":
                login = value
            elif word == "password":
                password = value
            i += 2
        elif word == "macdef":  # an FTP macro: its body runs to the next empty line
            break
        else:
            i += 1
    if machine is not None:
        entries.append(NetrcEntry(machine, login, password))
    return entries


def _netrc_matches(entries: list[NetrcEntry], host: str) -> list[NetrcEntry]:
    """Entries for ``host``: exact machine names first; else ``*.domain`` wildcards."""
    host = host.lower()
    exact = [e for e in entries if e.machine == host]
    if exact:
        return exact
    return [e for e in entries if e.machine.startswith("*.") and "." in host
            and host.partition(".")[2] == e.machine[2:]]


def netrc_login(host: str, path: str | None = None) -> tuple[str, str] | None:
    """(login, password) of the one .netrc entry for ``host`` that names a login; None when
    there is none or several (ambiguous, as s-nail)."""
    found = [e for e in _netrc_matches(read_netrc(path), host) if e.login]
    return (found[0].login, found[0].password) if len(found) == 1 else None


def netrc_password(user: str, host: str, path: str | None = None) -> str | None:
    """The .netrc password for ``user`` on ``host``, or that of an entry without a login."""
    matches = _netrc_matches(read_netrc(path), host)
    for e in matches:
        if e.login == user and e.password:
            return e.password
    for e in matches:
        if not e.login and e.password:
            return e.password
    return None


# -- user and password ----------------------------------------------------------------------------

def account_user(variables: Mapping[str, str], protocol: str, url_user: str, host: str,
                 port: int | None) -> str:
    """The account's user: from the URL, else ``PROTOCOL-auth-user`` (s-nail's older name),
    ``user``, and with ``netrc-lookup`` the one .netrc login for the host; "" if none."""
    if url_user:
        return url_user
    for name in (f"{protocol}-auth-user", "user"):
        value = chain(variables, name, "", host, port)
        if value:
            return value
    if chain(variables, "netrc-lookup", "", host, port) is not None:
        found = netrc_login(host)
        if found:
            return found[0]
    return ""


def password(variables: Mapping[str, str], user: str, host: str, port: int | None, *,
             protocol: str = "") -> str | None:
    """The password for ``user`` on ``host``: the ``password`` chain (then, given
    ``protocol``, s-nail's older ``PROTOCOL-auth-password`` chain), then the .netrc when
    ``netrc-lookup`` is set; None when none is found. Raises ConfigError for a .netrc with
    a bad mode."""
    names = ["password"] + ([f"{protocol}-auth-password"] if protocol else [])
    for name in names:
        value = chain(variables, name, user, host, port)
        if value:
            return value
    if chain(variables, "netrc-lookup", user, host, port) is not None:
        return netrc_password(user, host)
    return None


def unverified(variables: Mapping[str, str], user: str, host: str, port: int | None) -> bool:
    """Whether ``tls-verify`` (or ``ssl-verify``) says warn or ignore: certificates not
    checked. Raises UsageError for a value s-nail does not know."""
    value = chain(variables, "tls-verify", user, host, port)
    if value is None:
        return False
    if value.lower() not in VERIFY:
        raise UsageError(f"tls-verify: expected strict, ask, warn or ignore, got {value!r}")
    return not VERIFY[value.lower()]


def _mechanisms(value: str) -> tuple[str, ...]:
    words = tuple(w for w in value.lower().replace(",", " ").split() if w)
    for w in words:
        if w not in (*MECHANISMS, "none"):
            raise UsageError(f"smtp-auth: expected none, {', '.join(MECHANISMS)}; got {w!r}")
    return words


def server_policy(cfg: Config, variables: Mapping[str, str], *, scheme: str, user: str,
                  host: str, port: int, url_password: str = "",
                  site_credentials: bool = False) -> Policy:
    """The client Policy for an account on ``host``:``port`` reached with ``scheme``.

    Starts from the configuration's smtp_* settings (timeouts, HELO name, TLS level); the
    configuration's own credentials are kept only when ``site_credentials`` (the server is
    the configured relayhost). Then, from the variables (each through its chain):
    ``PROTOCOL-use-starttls`` (TLS required), ``tls-verify``, ``tls-ca-file``,
    ``tls-ca-dir``, ``tls-ca-no-defaults``, ``PROTOCOL-auth`` (mechanisms; ``none``: no
    AUTH), the user (``account_user``), the password (URL, then ``password``), and our
    ``PROTOCOL-auth-password-command`` and ``PROTOCOL-auth-oauth2-token-command``.

    Certificates are verified whenever credentials or CAs are given, unless ``tls-verify``
    says otherwise. Raises UsageError (64) for bad values or a user without any password
    source, ConfigError (78) for a .netrc others can read."""
    from pymailtools.smtp.policy import Policy

    info = SCHEMES[scheme]
    proto = info.protocol
    policy = Policy.from_config(cfg)
    changes: dict[str, object] = {}
    if not site_credentials:
        # The site's relay credentials are for the relayhost only: never offered to a server
        # the user names (as Postfix keys them by next hop).
        policy = policy.without_credentials()
    if info.implicit_tls or (proto == "smtp" and port == 465):
        changes["implicit_tls"] = True
    mechanisms = _mechanisms(chain(variables, f"{proto}-auth", user, host, port) or "")
    no_auth = mechanisms == ("none",)
    user = "" if no_auth else account_user(variables, proto, user, host, port)
    if mechanisms and not no_auth and not user:
        # s-nail: a user is always required; the login name when nothing else names one
        from pymailtools.submit import submission

        user = submission.login_name(os.getuid())[0]

    def var(name: str) -> str | None:
        return chain(variables, name, user, host, port)

    if var(f"{proto}-use-starttls") is not None and policy.level in ("none", "may"):
        changes["level"] = "encrypt"
    ignore = unverified(variables, user, host, port)
    verify = var("tls-verify")
    ca_file, ca_dir = var("tls-ca-file"), var("tls-ca-dir")
    if ca_file:
        changes["ca_file"] = os.path.expanduser(ca_file)
    if ca_dir:
        changes["ca_path"] = os.path.expanduser(ca_dir)
    if var("tls-ca-no-defaults") is not None:
        changes["ca_defaults"] = False
    if mechanisms and not no_auth:
        changes["mechanisms"] = mechanisms
    if user:
        secret = url_password or password(variables, user, host, port, protocol=proto)
        command = var(f"{proto}-auth-password-command") or ""
        token_command = var(f"{proto}-auth-oauth2-token-command") or ""
        if mechanisms and set(mechanisms) <= {"xoauth2", "oauthbearer"} and not token_command:
            # s-nail takes the access token from the password chain; a token lives an hour,
            # so we take it from a command that prints a fresh one
            raise UsageError(f"smtp-auth={','.join(mechanisms)} needs an access token: set "
                             f"{proto}-auth-oauth2-token-command")
        if not (secret or command or token_command):
            raise UsageError(
                f"no password for {user} on {host}: set password-{user}@{host} (or password,"
                f" {proto}-auth-password-command, netrc-lookup with ~/.netrc)")
        changes.update(username=user, password=secret or "", password_file="",
                       password_command=command, token_command=token_command)
    if ignore:
        if changes.get("level", policy.level) == "verify":
            changes["level"] = "encrypt"
    elif verify is not None or user or ca_file or ca_dir:
        # As s-nail (tls-verify defaults to ask, which fails without a terminal): a password,
        # or CAs named for checking, go only to a server whose certificate verifies.
        changes["level"] = "verify"
    return policy.clone(**changes)
