"""Host and port syntax: Postfix's next hops (``host``, ``host:port``, ``[host]``, ``[host]:port``)
and the looser forms of command lines, all split by one parser (``split``)."""

import ipaddress
import socket
from typing import NamedTuple

from pymailtools.errors import ConfigError

IMPLICIT_TLS_PORT = 465  # submissions (RFC 8314): TLS from the first byte, no STARTTLS


class HostPort(NamedTuple):
    """A host as written (brackets removed), its port, and whether it was in brackets."""

    host: str
    port: int
    bracketed: bool


class NextHop(NamedTuple):
    """Where to send: ``host`` with or without an MX lookup, on ``port``."""

    host: str
    port: int
    mx: bool  # False for [host]: connect to the host's own addresses
    implicit_tls: bool

    def __str__(self) -> str:
        host = f"[{self.host}]" if not self.mx else self.host
        return f"{host}:{self.port}"


def split(text: str, default_port: int, *, slash: bool = False,
          services: bool = False) -> HostPort:
    """``host``, ``host:port``, ``[host]``, ``[host]:port`` → HostPort; raises ValueError.

    ``[ipv6:2001:db8::1]`` and ``[2001:db8::1]`` are IPv6 literals (the first is Postfix's); a
    bare IPv6 address (more than one colon) is a host without a port. ``slash`` also accepts
    swaks' ``host/port``; ``services`` accepts a service name (``submission``) as the port."""
    value = text.strip()
    port_text: str | None = None
    bracketed = value.startswith("[")
    if bracketed:
        end = value.find("]")
        if end < 0:
            raise ValueError("missing ']'")
        host, rest = value[1:end], value[end + 1 :]
        if host.lower().startswith("ipv6:"):
            host = host[5:]
        if rest:
            if rest[:1] != ":" and not (slash and rest[:1] == "/"):
                raise ValueError("junk after ']'")
            port_text = rest[1:]
    elif slash and "/" in value:
        host, _, port_text = value.partition("/")
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    else:
        host = value
    if not host:
        raise ValueError("empty host")
    port = default_port if port_text is None else parse_port(port_text, services=services)
    return HostPort(host, port, bracketed)


def parse_port(text: str, *, services: bool = False) -> int:
    """A port number 1-65535, or with ``services`` a service name; raises ValueError."""
    if text.isascii() and text.isdigit():
        port = int(text)
        if not 0 < port < 65536:
            raise ValueError(f"port out of range: {text}")
        return port
    if services and text:
        try:
            return socket.getservbyname(text, "tcp")
        except OSError:
            raise ValueError(f"unknown port or service {text!r}") from None
    raise ValueError(f"bad port {text!r}")


def is_ip(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address rather than a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_host(host: str) -> str:
    """A host name or IP address, normalised (lower case, no final dot); ValueError if bad."""
    if not host or len(host) > 253:
        raise ValueError("bad host name")
    if is_ip(host):
        return host
    labels = host.rstrip(".").split(".")
    for label in labels:
        if not label or len(label) > 63 or label.startswith("-") or label.endswith("-") or \
                not all(c.isascii() and (c.isalnum() or c in "-_") for c in label):
            raise ValueError("bad host name")
    return host.rstrip(".").lower()


def parse(text: str, default_port: int = 25, key: str = "relayhost") -> NextHop:
    """Parse a ``relayhost`` value (or another next hop, named by ``key``); raises
    ConfigError naming it."""
    if not text.strip():
        raise ConfigError(f"{key}: empty")
    try:
        hp = split(text, default_port)
        if ":" in hp.host and not hp.bracketed:
            raise ValueError("write an IPv6 address as [ipv6:addr]")
        host = check_host(hp.host)
    except ValueError as e:
        raise ConfigError(f"{key}: {e} in {text!r}") from None
    return NextHop(host, hp.port, not hp.bracketed, hp.port == IMPLICIT_TLS_PORT)


def is_relayhost(relayhost: str, host: str, port: int, default_port: int = 25) -> bool:
    """Is ``host``:``port`` the next hop the ``relayhost`` setting names? The site's single
    smtp_sasl_* account is offered there only, never to another server."""
    if not relayhost.strip():
        return False
    try:
        relay = parse(relayhost, default_port)
    except ConfigError:
        return False
    return relay.host.lower() == host.lower() and relay.port == port


def system_addresses(host: str, port: int, family: int = 0) -> list[tuple[int, str]]:
    """(family, IP) of ``host`` from the system resolver (getaddrinfo, so /etc/hosts counts),
    in its order, without duplicates. Raises socket.gaierror."""
    seen: dict[tuple[str, int], None] = {}
    for fam, _, _, _, sockaddr in socket.getaddrinfo(host, port, family, socket.SOCK_STREAM):
        seen.setdefault((str(sockaddr[0]), int(fam)), None)
    return [(fam, ip) for ip, fam in seen]
