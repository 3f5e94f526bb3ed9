"""The listener's policy, parsed from the configuration: who may relay (mynetworks, SASL
users), for which domains anyone may (relay_domains), the TLS certificate, and the cached
verdicts on local recipients."""

from __future__ import annotations

import ipaddress
import ssl
import time

from pymailtools.config import Config
from pymailtools.errors import AddressError, ConfigError, DeliveryError
from pymailtools.local import route
from pymailtools.queue.store import Queue
from pymailtools.smtpd import passwd as smtpd_passwd

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pymailtools.tables import Tables

VERDICT_SECONDS = 2.0  # how long a local recipient's lookup (user, aliases, .forward) is reused
VERDICT_ENTRIES = 10000  # cached verdicts (and client trust) at most; then start afresh


class Settings:
    """What the listener needs from the configuration, parsed once (and again on SIGHUP)."""

    def __init__(self, cfg: Config, *, stdio: bool = False) -> None:
        self.cfg = cfg
        self.stdio = stdio
        try:
            self.networks = [ipaddress.ip_network(n, strict=False) for n in cfg.mynetworks]
        except ValueError as e:
            raise ConfigError(f"mynetworks: {e}") from None
        self.tls: ssl.SSLContext | None = None
        if not stdio and (cfg.smtpd_tls_cert_file or cfg.smtpd_tls_key_file):
            self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.tls.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                self.tls.load_cert_chain(cfg.smtpd_tls_cert_file,
                                         cfg.smtpd_tls_key_file or None)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"smtpd_tls_cert_file/smtpd_tls_key_file: {e}") from None
        self.users: dict[str, str] = {}
        if not stdio and cfg.smtpd_sasl_password_file:
            try:
                self.users = smtpd_passwd.load(cfg.smtpd_sasl_password_file)
            except smtpd_passwd.PasswordFileError as e:
                raise ConfigError(f"smtpd_sasl_password_file: {e}") from None
        if cfg.rewrites:
            # Opened now: a missing or broken table stops the listener at start-up (exit 78)
            # instead of turning every message away later.
            from pymailtools import rewrite

            rewrite.for_config(cfg)
        self.relay_names, self.relay_tables = _relay_domains(cfg.relay_domains)
        self.bare_newline = "normalize" if stdio else cfg.smtpd_forbid_bare_newline
        # -bd: the queue its starter set up; -bs: submit() sets it up, as for sendmail -bm
        self.queue: Queue | None = None if stdio else Queue(cfg.queue_directory)
        # local recipient -> (when looked up, the error it gave or None): see local_verdict
        self.verdicts: dict[str, tuple[float, Exception | None]] = {}
        self.trust: dict[str | None, bool] = {}

    def local_verdict(self, rcpt: str) -> Exception | None:
        """The error route.resolve gives for a local recipient (None: deliverable), looked up
        at most once per VERDICT_SECONDS: a burst of mail for one user costs one passwd,
        aliases and .forward lookup, as Postfix's cached local_recipient_maps do."""
        now = time.monotonic()
        hit = self.verdicts.get(rcpt)
        if hit is not None and now - hit[0] < VERDICT_SECONDS:
            return hit[1]
        error: Exception | None = None
        try:
            route.resolve(self.cfg, rcpt)
        except (DeliveryError, AddressError) as e:
            error = e.with_traceback(None)  # kept: without the frames it would keep alive
        if len(self.verdicts) >= VERDICT_ENTRIES:
            self.verdicts.clear()
        self.verdicts[rcpt] = (now, error)
        return error

    def relay_domain(self, domain: str) -> bool:
        """Whether mail for ``domain`` is relayed from any client (relay_domains). A name
        matches itself and its subdomains, ``.name`` only the subdomains (Postfix's
        parent_domain_matches_subdomains, the default for relay_domains); tables are searched
        for the domain and then each parent. Raises ConfigError or OSError when a table fails."""
        d = domain.lower().rstrip(".")
        if not d:
            return False
        parents = [d[i + 1 :] for i, c in enumerate(d) if c == "."]
        if d in self.relay_names or any(
                p in self.relay_names or "." + p in self.relay_names for p in parents):
            return True
        return self.relay_tables is not None and any(
            self.relay_tables.get(name) is not None for name in (d, *parents))

    def trusted_ip(self, ip: str | None) -> bool:
        known = self.trust.get(ip)
        if known is None:
            if len(self.trust) >= VERDICT_ENTRIES:
                self.trust.clear()
            known = self.trust[ip] = self._trusted_ip(ip)
        return known

    def _trusted_ip(self, ip: str | None) -> bool:
        if ip is None:
            return self.stdio
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)


def _relay_domains(items: list[str]) -> tuple[frozenset[str], Tables | None]:
    """relay_domains' names (and those of ``/file`` entries) and its ``type:name`` tables."""
    names: list[str] = []
    specs: list[str] = []
    for item in items:
        if item.startswith("/"):
            try:
                with open(item, encoding="utf-8", errors="replace") as f:
                    text = f.read(1 << 20)
            except OSError as e:
                raise ConfigError(f"relay_domains: cannot read {item}: {e.strerror}") from None
            for line in text.splitlines():
                names += line.partition("#")[0].replace(",", " ").split()
        elif ":" in item:
            specs.append(item)
        else:
            names.append(item)
    tables = None
    if specs:
        # the lookup tables module only when relay_domains names tables
        from pymailtools.tables import open_tables

        try:
            tables = open_tables(specs)
        except ConfigError as e:
            raise ConfigError(f"relay_domains: {e}") from None
    return frozenset(n.lower().rstrip(".") for n in names if n.strip(".")), tables
