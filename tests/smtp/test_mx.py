"""MX lookup against a real DNS server (dnsmasq on a loopback port): order, limits, errors."""

import asyncio
import time

import pytest

from pymailtools.config import Config
from pymailtools.errors import ConfigError, DeliveryError
from pymailtools.smtp import mx
from pymailtools.smtp.nexthop import parse
from tests.support.dns import TestDNS


@pytest.fixture
def resolver(dns_server: TestDNS):  # type: ignore[no-untyped-def]
    return mx.make_resolver(Config({"dns_nameservers": [dns_server.nameserver],
                                    "dns_timeout": 2}))


def lookup(resolver, domain: str, limit: int = 5) -> list[mx.Hop]:  # type: ignore
    return asyncio.run(mx.lookup(resolver, domain, port=2525, limit=limit,
                                 myhostname="host.example.test"))


def error(resolver, domain: str) -> DeliveryError:  # type: ignore
    with pytest.raises(DeliveryError) as e:
        lookup(resolver, domain)
    return e.value


def test_sorted_by_preference_although_served_unsorted(resolver) -> None:  # type: ignore
    hops = lookup(resolver, "good.test")
    assert [(h.host, h.address, h.port, h.preference) for h in hops] == [
        ("mx1.good.test", "127.0.0.2", 2525, 10), ("mx2.good.test", "127.0.0.3", 2525, 20)]
    assert hops[0].relay == "mx1.good.test[127.0.0.2]:2525"


def test_equal_preferences_are_shuffled(resolver) -> None:  # type: ignore
    orders = {tuple(h.host for h in lookup(resolver, "eq.test")) for _ in range(40)}
    assert orders == {("a.eq.test", "b.eq.test"), ("b.eq.test", "a.eq.test")}


def test_address_limit(resolver) -> None:  # type: ignore
    hops = lookup(resolver, "many.test")
    assert len(hops) == 5 and len({h.host for h in hops}) == 5
    assert len(lookup(resolver, "many.test", limit=2)) == 2


def test_implicit_mx_and_cname(resolver) -> None:  # type: ignore
    assert [(h.host, h.address) for h in lookup(resolver, "aonly.test")] == \
        [("aonly.test", "127.0.0.4")]
    assert [h.address for h in lookup(resolver, "alias.test")] == ["127.0.0.2", "127.0.0.3"]


def test_ipv4_and_ipv6_addresses_of_one_host(resolver) -> None:  # type: ignore
    assert [h.address for h in lookup(resolver, "dual.test")] == ["127.0.0.8", "::1"]


@pytest.mark.parametrize("domain, status", [
    ("nullmx.test", "5.1.10"), ("nx.test", "5.1.2"), ("dangling.test", "5.4.4"),
    ("loop.test", "5.4.6"), ("servfail.test", "4.4.3"), ("badmx.test", "4.4.3"),
    ("timeout.test", "4.4.3"),
])
def test_error_classes(resolver, domain: str, status: str) -> None:  # type: ignore
    t = time.monotonic()
    e = error(resolver, domain)
    assert e.status == status
    assert time.monotonic() - t < 2 + 3  # bounded by dns_timeout, with margin


def test_domain_literal_needs_no_dns() -> None:
    dead = mx.make_resolver(Config({"dns_nameservers": ["127.0.0.1:9"], "dns_timeout": 1}))
    (hop,) = asyncio.run(mx.lookup(dead, "[127.0.0.9]", port=25, limit=5))
    assert (hop.host, hop.address) == ("127.0.0.9", "127.0.0.9")
    (hop6,) = asyncio.run(mx.lookup(dead, "[IPv6:::1]", port=25, limit=5))
    assert hop6.address == "::1"


def test_relayhost_without_mx_uses_the_host_itself(resolver) -> None:  # type: ignore
    hops = asyncio.run(mx.next_hops(resolver, parse("[smarthost.test]:587"), limit=5))
    assert [(h.host, h.address, h.port) for h in hops] == [("smarthost.test", "127.0.0.7", 587)]
    via_mx = asyncio.run(mx.next_hops(resolver, parse("relaymx.test:587"), limit=5))
    assert [(h.host, h.address) for h in via_mx] == [("smarthost.test", "127.0.0.7")]


def test_relayhost_nxdomain_is_temporary(resolver) -> None:  # type: ignore
    with pytest.raises(DeliveryError) as e:
        asyncio.run(mx.next_hops(resolver, parse("nosuch.nx.test"), limit=5))
    assert e.value.status == "4.4.3"


@pytest.mark.parametrize("item, server", [("127.0.0.1", ("127.0.0.1", 53)),
                                          ("127.0.0.1:5353", ("127.0.0.1", 5353)),
                                          ("[::1]:5353", ("::1", 5353)), ("::1", ("::1", 53))])
def test_nameserver_forms(item: str, server: tuple[str, int]) -> None:
    r = mx.make_resolver(Config({"dns_nameservers": [item]}))
    (ns,) = r.nameservers
    assert (ns.address, ns.port) == server  # type: ignore[union-attr]


def test_bad_nameserver_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        mx.make_resolver(Config({"dns_nameservers": ["dns.example:53"]}))
