"""Where to connect: --server HOST[:PORT] parsing, address lookup, and the MX walk of --mx."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, NamedTuple

from pymailtools.chat import status
from pymailtools.chat.errors import ChatError, ResolveError
from pymailtools.smtp import nexthop

if TYPE_CHECKING:
    import dns.resolver


class Address(NamedTuple):
    """One address to try: the host name it belongs to, the IP, the port and the family."""

    host: str
    ip: str
    port: int
    family: int


def parse_server(spec: str, default_port: int) -> tuple[str, int]:
    """swaks' forms: ``host``, ``host:port``, ``host/port``, ``[v6]``, ``[v6]:port``, bare v6;
    the port may be a service name. Raises ValueError."""
    hp = nexthop.split(spec, default_port, slash=True, services=True)
    return hp.host, hp.port


def parse_port(text: str) -> int:
    """A port number or a service name (``smtp``, ``submission``)."""
    return nexthop.parse_port(text, services=True)


def system_addresses(host: str, port: int, family: int) -> list[Address]:
    """Addresses from the system resolver (getaddrinfo), in its order, without duplicates."""
    try:
        found = nexthop.system_addresses(host, port, family)
    except socket.gaierror as e:
        raise ResolveError(f"Error resolving {host}: {e.strerror}") from None
    return [Address(host, ip, port, fam) for fam, ip in found]


def make_resolver(server: str | None, timeout: float | None) -> dns.resolver.Resolver:
    """dnspython's resolver, optionally asking only ``server`` (HOST[:PORT], e.g. a test DNS)."""
    try:
        # dnspython is optional: only --mx needs it
        import dns.resolver
    except ImportError:
        raise ChatError("--mx needs dnspython (apt-get install python3-dnspython)",
                        status.MISSING_MODULE) from None
    if server:
        host, port = parse_server(server, 53)
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [host]
        resolver.port = port
    else:
        resolver = dns.resolver.Resolver()
    if timeout:
        resolver.lifetime = timeout
    return resolver


def mx_hosts(domain: str, resolver: dns.resolver.Resolver) -> list[str]:
    """MX hosts by preference, equal preferences shuffled; the domain itself when it has no MX."""
    # only --mx walks MX records: dnspython, and smtp.mx with asyncio behind it
    import dns.exception
    import dns.resolver

    from pymailtools.smtp import mx

    try:
        answer = resolver.resolve(domain, "MX")
    except dns.resolver.NoAnswer:
        return [domain]  # implicit MX (RFC 5321 5.1)
    except dns.resolver.NXDOMAIN:
        raise ResolveError(f"Error resolving MX of {domain}: no such domain") from None
    except dns.exception.DNSException as e:
        raise ResolveError(f"Error resolving MX of {domain}: {e}") from None
    ordered = mx.order([(r.preference, r.exchange.to_text()) for r in answer])
    if ordered is None:
        raise ResolveError(f"{domain} accepts no mail (null MX, RFC 7505)")
    return [name for _, name in ordered]


def dns_addresses(host: str, port: int, family: int,
                  resolver: dns.resolver.Resolver) -> list[Address]:
    """A and AAAA records of an MX host (through the same resolver as the MX lookup)."""
    # dnspython: only --mx resolves through it
    import dns.exception

    if nexthop.is_ip(host):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        return [Address(host, host, port, fam)] if family in (0, fam) else []
    out: list[Address] = []
    for rdtype, fam in (("A", socket.AF_INET), ("AAAA", socket.AF_INET6)):
        if family not in (0, fam):
            continue
        try:
            answer = resolver.resolve(host, rdtype)
        except dns.exception.DNSException:
            continue
        out.extend(Address(host, r.to_text(), port, fam) for r in answer)
    return out
