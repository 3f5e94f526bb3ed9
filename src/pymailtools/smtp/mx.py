"""MX lookup on dnspython: the addresses to try for a domain, with Postfix's error classes."""

import asyncio
import ipaddress
import random
from typing import NamedTuple

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from pymailtools.config import Config
from pymailtools.errors import ConfigError, DeliveryError
from pymailtools.smtp.nexthop import NextHop, is_ip, split

# RFC 3463 codes: NXDOMAIN is 5.1.2, a null MX 5.1.10 (RFC 7505 3.2).
NXDOMAIN_STATUS = "5.1.2"
NULL_MX_STATUS = "5.1.10"
NO_ADDRESS_STATUS = "5.4.4"
TEMP_STATUS = "4.4.3"
LOOP_STATUS = "5.4.6"


class Hop(NamedTuple):
    """One address to try: the MX host's name (for SNI, verification, logs), IP and port."""

    host: str
    address: str
    port: int
    preference: int

    @property
    def relay(self) -> str:
        """Postfix's ``host[ip]:port`` for log lines."""
        return f"{self.host}[{self.address}]:{self.port}"


def make_resolver(cfg: Config) -> dns.asyncresolver.Resolver:
    """The configured name servers (``ip`` / ``ip:port`` / ``[v6]:port``), else the system's."""
    if cfg.dns_nameservers:
        r = dns.asyncresolver.Resolver(configure=False)
        servers: list[str | dns.nameserver.Nameserver] = []
        for item in cfg.dns_nameservers:
            host, port = _nameserver(item)
            servers.append(dns.nameserver.Do53Nameserver(host, port))
        r.nameservers = servers
    else:
        r = dns.asyncresolver.Resolver()
    life = float(max(cfg.dns_timeout, 1))
    r.lifetime = life
    r.timeout = min(2.0, life)  # per server try; the lifetime bounds the whole query
    r.cache = dns.resolver.Cache()
    return r


def _nameserver(item: str) -> tuple[str, int]:
    """A ``dns_nameservers`` entry: ``ip``, ``ip:port`` or ``[v6]:port``."""
    try:
        hp = split(item, 53)
        return str(ipaddress.ip_address(hp.host)), hp.port
    except ValueError:
        raise ConfigError(f"dns_nameservers: expected ip or ip:port, got {item!r}") from None


class _Lookup(NamedTuple):
    addresses: list[str]
    soft: str  # why an address lookup failed temporarily ("" when none did)
    nxdomain: bool  # the name does not exist at all


async def _addresses(resolver: dns.asyncresolver.Resolver, name: str) -> _Lookup:
    """A and AAAA of one host, IPv4 first; a failure of one type does not hide the other."""
    results = await asyncio.gather(*(_one_type(resolver, name, t) for t in ("A", "AAAA")))
    v4, v6 = results[0][0], results[1][0]
    soft = results[0][1] or results[1][1]
    nx = results[0][2] and results[1][2]
    return _Lookup(v4 + v6, soft, nx)


async def _one_type(resolver: dns.asyncresolver.Resolver, name: str,
                    rdtype: str) -> tuple[list[str], str, bool]:
    try:
        answer = await resolver.resolve(name, rdtype, search=False)
    except dns.resolver.NXDOMAIN:
        return [], "", True
    except dns.resolver.NoAnswer:
        return [], "", False
    except (dns.resolver.NoNameservers, dns.exception.Timeout) as e:
        return [], f"{type(e).__name__}", False
    except dns.exception.DNSException as e:
        return [], f"{type(e).__name__}", False
    return [r.address for r in answer], "", False


def _temp(domain: str, rdtype: str, why: str = "") -> DeliveryError:
    detail = f" ({why})" if why else ""
    return DeliveryError(f"Host or domain name not found. Name service error for name={domain} "
                         f"type={rdtype}: Host not found, try again{detail}", TEMP_STATUS)


def _to_name(domain: str) -> dns.name.Name:
    try:
        return dns.name.from_unicode(domain.rstrip(".") + ".")
    except (dns.exception.DNSException, UnicodeError, ValueError):
        raise DeliveryError(f"bad destination domain: {domain}", NXDOMAIN_STATUS) from None


def _literal(domain: str) -> str | None:
    """The address of a domain literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``), else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        raise DeliveryError(f"bad address literal: {domain}", NXDOMAIN_STATUS) from None


def order(records: list[tuple[int, str]]) -> list[tuple[int, str]] | None:
    """MX records as (preference, host), best first, equal preferences in random order;
    host names lower case without the final dot. None for a null MX (RFC 7505): the domain
    accepts no mail."""
    hosts = [(p, h.rstrip(".").lower()) for p, h in records]
    if len(hosts) == 1 and not hosts[0][1]:
        return None
    random.shuffle(hosts)  # equal preferences stay in random order after the sort
    hosts.sort(key=lambda r: r[0])
    return [(p, h) for p, h in hosts if h]


async def lookup(resolver: dns.asyncresolver.Resolver, domain: str, *, port: int, limit: int,
                 myhostname: str = "") -> list[Hop]:
    """The addresses to try for mail to ``domain``, best first, at most ``limit``.

    Raises DeliveryError: 5.1.2 NXDOMAIN, 5.1.10 null MX, 5.4.6 MX points back at us, 5.4.4 no
    MX host has an address and every lookup said so for certain; 4.4.3 for everything that
    may heal (SERVFAIL, REFUSED, timeouts: one misconfigured resolver must not bounce the queue).
    """
    limit = max(limit, 1)
    literal = _literal(domain)
    if literal is not None:
        return [Hop(literal, literal, port, 0)]
    if is_ip(domain):
        return [Hop(domain, domain, port, 0)]
    name = _to_name(domain)
    shown = name.to_text(omit_final_dot=True)
    try:
        answer = await resolver.resolve(name, "MX", search=False)
        records = list(answer)
    except dns.resolver.NXDOMAIN:
        raise DeliveryError(f"Host or domain name not found. Name service error for "
                            f"name={shown} type=MX: Host not found", NXDOMAIN_STATUS) from None
    except dns.resolver.NoAnswer:
        records = []
    except (dns.resolver.NoNameservers, dns.exception.Timeout) as e:
        raise _temp(shown, "MX", type(e).__name__) from None
    except dns.exception.DNSException as e:
        raise _temp(shown, "MX", type(e).__name__) from None
    if not records:
        # RFC 5321 5.1: no MX records, so the domain itself is the implicit MX.
        hosts = [(0, shown)]
    else:
        ordered = order([(r.preference, r.exchange.to_text()) for r in records])
        if ordered is None:
            raise DeliveryError(f"Domain {shown} does not accept mail (nullMX)", NULL_MX_STATUS)
        hosts = ordered
        me = myhostname.lower().rstrip(".")
        mine = [p for p, h in hosts if me and h == me]
        if mine:
            # Loop avoidance (Postfix smtp_addr.c): only MX hosts better than ourselves count.
            hosts = [(p, h) for p, h in hosts if p < mine[0]]
            if not hosts:
                raise DeliveryError(f"mail for {shown} loops back to myself", LOOP_STATUS)
    hops: list[Hop] = []
    soft = ""
    all_nx = True
    for pref, host in hosts:
        if len(hops) >= limit:
            break
        if is_ip(host):
            # An MX naming an IP address is a misconfiguration (RFC 5321 5.1); skip it.
            soft = soft or f"MX host {host} is an IP address"
            all_nx = False
            continue
        got = await _addresses(resolver, host)
        soft = soft or (got.soft and f"{host}: {got.soft}")
        all_nx = all_nx and got.nxdomain
        for addr in got.addresses:
            if len(hops) < limit:
                hops.append(Hop(host, addr, port, pref))
    if hops:
        return hops
    if records and not soft and all_nx:
        raise DeliveryError(f"Host or domain name not found. Name service error for "
                            f"name={hosts[0][1]} type=A: Host not found", NO_ADDRESS_STATUS)
    if not records and not soft:
        raise DeliveryError(f"Host or domain name not found. Name service error for "
                            f"name={shown} type=A: Host not found", NO_ADDRESS_STATUS)
    raise _temp(shown, "A", soft or "no MX host has an address")


async def next_hops(resolver: dns.asyncresolver.Resolver, hop: NextHop, *,
                    limit: int) -> list[Hop]:
    """Addresses of a relayhost. Every DNS failure is temporary here: a relayhost that does not
    resolve is a configuration or network problem, never the recipient's fault."""
    try:
        if hop.mx:
            return await lookup(resolver, hop.host, port=hop.port, limit=limit)
        if is_ip(hop.host):
            return [Hop(hop.host, hop.host, hop.port, 0)]
        got = await _addresses(resolver, hop.host)
        if got.addresses:
            return [Hop(hop.host, a, hop.port, 0) for a in got.addresses[:limit]]
        raise _temp(hop.host, "A", got.soft or "no address")
    except DeliveryError as e:
        if e.permanent:
            raise DeliveryError(f"relayhost {hop}: {e.reason}", "4.4.3") from None
        raise
