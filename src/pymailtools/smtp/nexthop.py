"""Next-hop syntax as Postfix writes it: ``host``, ``host:port``, ``[host]``, ``[host]:port``."""

import ipaddress
from typing import NamedTuple

from pymailtools.errors import ConfigError

IMPLICIT_TLS_PORT = 465  # submissions (RFC 8314): TLS from the first byte, no STARTTLS


class NextHop(NamedTuple):
    """Where to send: ``host`` with or without an MX lookup, on ``port``."""

    host: str
    port: int
    mx: bool  # False for [host]: connect to the host's own addresses
    implicit_tls: bool

    def __str__(self) -> str:
        host = f"[{self.host}]" if not self.mx else self.host
        return f"{host}:{self.port}"


def _check_host(host: str, text: str) -> str:
    if not host or len(host) > 253:
        raise ConfigError(f"relayhost: bad host name in {text!r}")
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    for label in labels:
        if not label or len(label) > 63 or label.startswith("-") or label.endswith("-") or \
                not all(c.isascii() and (c.isalnum() or c in "-_") for c in label):
            raise ConfigError(f"relayhost: bad host name in {text!r}")
    return host.rstrip(".").lower()


def parse(text: str, default_port: int = 25) -> NextHop:
    """Parse a ``relayhost`` value; raises ConfigError naming the key.

    ``[ipv6:2001:db8::1]`` and ``[2001:db8::1]`` are IPv6 literals (the first is Postfix's)."""
    value = text.strip()
    if not value:
        raise ConfigError("relayhost: empty")
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ConfigError(f"relayhost: missing ']' in {text!r}")
        host, rest, mx = value[1:end], value[end + 1 :], False
        if host.lower().startswith("ipv6:"):
            host = host[5:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            host, port_text = value, ""
        rest, mx = (":" + port_text) if sep else "", True
        if ":" in host:
            raise ConfigError(f"relayhost: write an IPv6 address as [ipv6:addr] in {text!r}")
    port = default_port
    if rest:
        if not rest.startswith(":") or not rest[1:].isdigit() or not rest[1:].isascii():
            raise ConfigError(f"relayhost: bad port in {text!r}")
        port = int(rest[1:])
        if not 0 < port < 65536:
            raise ConfigError(f"relayhost: port out of range in {text!r}")
    host = _check_host(host, text)
    return NextHop(host, port, mx, port == IMPLICIT_TLS_PORT)
