"""DNS servers for tests: dnsmasq on a free loopback port serving the *.test zone, and a tiny
one answering from a dict (for smtpchat's --mx)."""

from __future__ import annotations

import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset

from tests.support.net import TIMEOUT, free_port

# The zone the remote-delivery tests use. MX hosts live on 127.0.0.2-9; tests bind their SMTP
# servers there on one free port and point smtp_port at it.
ZONE = """\
# two MX hosts, listed worst first: dnspython returns them unsorted
mx-host=good.test,mx2.good.test,20
mx-host=good.test,mx1.good.test,10
host-record=mx1.good.test,127.0.0.2
host-record=mx2.good.test,127.0.0.3
# no MX, an A record: implicit MX
host-record=aonly.test,127.0.0.4
# CNAME to a domain with MX records
cname=alias.test,good.test
# null MX (RFC 7505): preference 0, exchange "."
dns-rr=nullmx.test,15,000000
# MX host without any address
mx-host=dangling.test,nowhere.dangling.test,10
# truncated MX RDATA
dns-rr=badmx.test,15,00
# STARTTLS / certificate tests
mx-host=tls.test,mx.tls.test,10
host-record=mx.tls.test,127.0.0.5
# fault server
mx-host=fault.test,mx.fault.test,10
host-record=mx.fault.test,127.0.0.6
# one MX host with an IPv4 address nobody listens on and an IPv6 one
mx-host=dual.test,mx.dual.test,10
host-record=mx.dual.test,127.0.0.8,::1
# equal preferences
mx-host=eq.test,a.eq.test,10
mx-host=eq.test,b.eq.test,10
host-record=a.eq.test,127.0.0.2
host-record=b.eq.test,127.0.0.3
# more MX hosts than smtp_mx_address_limit
mx-host=many.test,m1.many.test,10
mx-host=many.test,m2.many.test,10
mx-host=many.test,m3.many.test,10
mx-host=many.test,m4.many.test,10
mx-host=many.test,m5.many.test,10
mx-host=many.test,m6.many.test,10
mx-host=many.test,m7.many.test,10
host-record=m1.many.test,127.0.1.1
host-record=m2.many.test,127.0.1.2
host-record=m3.many.test,127.0.1.3
host-record=m4.many.test,127.0.1.4
host-record=m5.many.test,127.0.1.5
host-record=m6.many.test,127.0.1.6
host-record=m7.many.test,127.0.1.7
# MX pointing back at the test configuration's own myhostname
mx-host=loop.test,host.example.test,10
host-record=host.example.test,127.0.0.9
# the senders' domain: bounces go there
mx-host=sender.test,mx.sender.test,10
host-record=mx.sender.test,127.0.0.10
# the relayhost name of the relayhost tests
host-record=smarthost.test,127.0.0.7
mx-host=relaymx.test,smarthost.test,10
"""

_BASE = """\
port={port}
listen-address=127.0.0.1
bind-interfaces
no-resolv
no-hosts
no-daemon
user=root
"""


class Dnsmasq:
    """One dnsmasq process; ``port`` answers on 127.0.0.1."""

    def __init__(self, binary: str, conf: str, workdir: Path, name: str) -> None:
        self.port = free_port(udp=True)
        path = workdir / f"{name}.conf"
        path.write_text(_BASE.format(port=self.port) + conf)
        self.log = open(workdir / f"{name}.log", "wb")
        self.proc = subprocess.Popen([binary, f"--conf-file={path}"], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self._wait()

    def _wait(self) -> None:
        deadline = time.monotonic() + 20
        q = dns.message.make_query("probe.invalid.", "A")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dnsmasq exited with {self.proc.returncode}")
            try:
                dns.query.udp(q, "127.0.0.1", port=self.port, timeout=0.5)
                return
            except (OSError, dns.exception.Timeout):
                time.sleep(0.05)
        raise RuntimeError("dnsmasq did not answer")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class TestDNS:
    """The main server (``port``) plus the validating pair that makes servfail.test SERVFAIL."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(self, binary: str, extra: str = "") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pmt-dns-"))
        self.procs: list[Dnsmasq] = []
        try:
            # dnsmasq has no "answer SERVFAIL" switch: a validating instance in front of an
            # unsigned one marks every answer bogus and says SERVFAIL, deterministically.
            unsigned = self._start(binary, "local=/test/\n"
                                   "mx-host=servfail.test,mx.servfail.test,10\n", "unsigned")
            validating = self._start(binary, "dnssec\ntrust-anchor=.,20326,8,2,"
                                     "E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237"
                                     "C7F8EC8D\n"
                                     f"server=127.0.0.1#{unsigned.port}\n", "validating")
            main = self._start(binary, "local=/test/\n" + ZONE + extra
                               + f"server=/servfail.test/127.0.0.1#{validating.port}\n"
                               "server=/timeout.test/127.0.0.1#1\n", "main")
        except BaseException:
            self.stop()
            raise
        self.port = main.port

    def _start(self, binary: str, conf: str, name: str) -> Dnsmasq:
        d = Dnsmasq(binary, conf, self.dir, name)
        self.procs.append(d)
        return d

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        for p in self.procs:
            p.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_dns(extra: str = "") -> Iterator[TestDNS]:
    """Generator for a fixture: skips (or fails in CI) without dnsmasq."""
    from tests.conftest import need_tool

    binary = need_tool("dnsmasq", "dnsmasq-base")
    server = TestDNS(binary, extra)
    try:
        yield server
    finally:
        server.stop()


# --- a tiny DNS server answering from a dict (smtpchat --mx) -----------------------------------

class DNSServer:
    """Answers MX and A queries from a dict over UDP on 127.0.0.1 (dnspython does the wire)."""

    def __init__(self, mx: dict[str, list[tuple[int, str]]], a: dict[str, list[str]]) -> None:
        self.mx, self.a = mx, a
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.running = True

    def _serve(self) -> None:
        while self.running:
            ready, _, _ = select.select([self.sock], [], [], 0.2)
            if not ready:
                continue
            data, peer = self.sock.recvfrom(4096)
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            q = query.question[0]
            name = q.name.to_text(omit_final_dot=True).lower()
            if q.rdtype == dns.rdatatype.MX and name in self.mx:
                response.answer.append(dns.rrset.from_text_list(
                    q.name, 60, "IN", "MX", [f"{p} {h}." for p, h in self.mx[name]]))
            elif q.rdtype == dns.rdatatype.A and name in self.a:
                response.answer.append(dns.rrset.from_text_list(q.name, 60, "IN", "A",
                                                                self.a[name]))
            elif name not in self.mx and name not in self.a:
                response.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(response.to_wire(), peer)

    def __enter__(self) -> DNSServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join(TIMEOUT)
        self.sock.close()
