"""Address rewriting as Postfix's cleanup does it at queue entry (canonical maps, masquerading,
virtual aliases), and smtp_generic_maps for mail leaving over SMTP.

Loaded only when one of those keys is set: sendmail's submission path imports it lazily.
"""

from __future__ import annotations

from collections.abc import Callable

from pymailtools import address, tables
from pymailtools.config import ADDRESS_CLASSES, Config
from pymailtools.errors import AddressError, ConfigError, DataError, DeliveryError

# Postfix's header_opts: the headers whose addresses are senders, and recipients.
SENDER_HEADERS = frozenset((
    "from", "sender", "reply-to", "return-receipt-to", "errors-to", "resent-from",
    "resent-sender", "resent-reply-to", "disposition-notification-to",
))
RECIPIENT_HEADERS = frozenset((
    "to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc", "apparently-to",
))
# the longest address handed to a table: a pattern table answers no longer key (a lookup
# error); a longer address is left as it is
MAX_LOOKUP = tables.MAX_PATTERN_KEY


class Mapper:
    """What every address mapping shares: Postfix's lookup order, extensions, results."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.delimiter = cfg.recipient_delimiter

    # -- one table -------------------------------------------------------------------------

    def _ours(self, domain: str) -> bool:
        """Postfix looks up the bare local part only for $myorigin and $mydestination."""
        d = domain.lower().rstrip(".")
        return d == self.cfg.myorigin.lower().rstrip(".") or self.cfg.is_local_domain(d)

    def _find(self, maps: tables.Tables, addr: str) -> list[str] | None:
        """The results of ``addr`` in ``maps`` (comma-separated values split), as Postfix's
        mail_addr_map: a result ``@domain`` keeps the local part, and an extension the table
        did not match is carried over (propagate_unmatched_extensions)."""
        if not addr or len(addr) > MAX_LOOKUP:
            return None
        domain = address.domain_of(addr)
        hit = tables.find_address_key(maps, addr, delimiter=self.delimiter,
                                      local=bool(domain) and self._ours(domain))
        if hit is None:
            return None
        found, key = hit
        local, at, domain = addr.rpartition("@") if "@" in addr else (addr, "", "")
        base, ext = tables.split_extension(local, self.delimiter)
        if ext is not None and key not in (f"{base}{at}{domain}", base):
            ext = None  # matched with its extension, or by @domain: nothing is carried over
        out = []
        for part in found.split(","):
            part = part.strip()
            if part.startswith("@"):
                part = address.local_part(addr) + part
            elif ext is not None and part:
                user, at2, dom = part.rpartition("@") if "@" in part else (part, "", "")
                if tables.split_extension(user, self.delimiter)[1] is None:
                    part = f"{user}{local[len(base)]}{ext}{at2}{dom}"
            if part:
                out.append(part)
        return out

    def _checked(self, result: str, addr: str, name: str) -> str:
        try:
            address.check_envelope(result, "address")
        except AddressError as e:
            raise ConfigError(f"{name}: the result for {addr} is not an address: {e}") from None
        return address.qualify(result, self.cfg.myorigin)

    def map11(self, maps: tables.Tables, addr: str, name: str) -> str:
        """One address through one table set (canonical, generic): the result, or ``addr``."""
        found = self._find(maps, addr)
        return self._checked(found[0], addr, name) if found else addr

    def _qualified(self, addr: str, func: Callable[[str], str]) -> str:
        """A header address is looked up as ``user@$myorigin`` when it has no domain (as
        cleanup qualifies it first); left as written when no table changes it."""
        full = address.qualify(addr, self.cfg.myorigin)
        new = func(full)
        return addr if new == full else new


class Rewriter(Mapper):
    """The queue-entry rewriting tables of one configuration, opened once (never
    smtp_generic_maps: a broken one must not stop submission)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        for key in ("canonical_classes", "masquerade_classes"):
            for item in getattr(cfg, key):
                if item not in ADDRESS_CLASSES:
                    raise ConfigError(f"{key}: expected some of {', '.join(ADDRESS_CLASSES)}, "
                                      f"got {item!r}")
        self.canonical = tables.open_tables(cfg.canonical_maps)
        self.sender_canonical = tables.open_tables(cfg.sender_canonical_maps)
        self.recipient_canonical = tables.open_tables(cfg.recipient_canonical_maps)
        self.canonical_classes = frozenset(cfg.canonical_classes)
        self.masquerade_domains = [d.lower().rstrip(".") for d in cfg.masquerade_domains]
        self.masquerade_exceptions = frozenset(x.lower() for x in cfg.masquerade_exceptions)
        self.masquerade_classes = frozenset(cfg.masquerade_classes)
        self.virtual = tables.open_tables(cfg.virtual_alias_maps)
        self.virtual_domains: list[str] = []
        self.virtual_domain_tables: list[tables.Tables] = []
        for item in cfg.virtual_alias_domains:
            if item == "$virtual_alias_maps":
                self.virtual_domain_tables.append(self.virtual)
            elif ":" in item:
                self.virtual_domain_tables.append(tables.open_tables(item))
            else:
                self.virtual_domains.append(item.lower().rstrip("."))

    # -- envelope --------------------------------------------------------------------------

    def masquerade(self, addr: str) -> str:
        """``user@host.example.com`` → ``user@example.com`` for masquerade_domains = example.com
        (the first entry that matches decides; ``!domain`` and an exact match stop it)."""
        local, at, domain = addr.rpartition("@")
        if not at or local.lower() in self.masquerade_exceptions:
            return addr
        d = domain.lower().rstrip(".")
        for masq in self.masquerade_domains:
            excluded = masq.startswith("!")
            masq = masq.lstrip("!")
            if not masq:
                continue
            if d == masq:
                return addr
            if d.endswith("." + masq):
                return addr if excluded else f"{local}@{masq}"
        return addr

    def _chain(self, addr: str, own: tables.Tables, own_name: str, cls: str,
               steps: list[str] | None = None) -> str:
        if cls in self.canonical_classes:
            for maps, name in ((own, own_name), (self.canonical, "canonical_maps")):
                new = self.map11(maps, addr, name)
                if steps is not None and new != addr:
                    steps.append(f"{name}: {addr} -> {new}")
                addr = new
        if cls in self.masquerade_classes and self.masquerade_domains:
            new = self.masquerade(addr)
            if steps is not None and new != addr:
                steps.append(f"masquerade_domains: {addr} -> {new}")
            addr = new
        return addr

    def check_envelope(self, addr: str) -> None:
        """Refuse an envelope address too long to look up (DataError): unlike a header
        address, it cannot be left unrewritten without routing the mail wrongly."""
        if len(addr) > MAX_LOOKUP:
            raise DataError(f"envelope address longer than {MAX_LOOKUP} characters: "
                            "too long for the address rewriting tables")

    def sender(self, addr: str, kind: str = "envelope") -> str:
        """An envelope (or header) sender: sender_canonical_maps, canonical_maps, masquerading."""
        return self._chain(addr, self.sender_canonical, "sender_canonical_maps",
                           f"{kind}_sender")

    def recipient(self, addr: str, kind: str = "envelope",
                  steps: list[str] | None = None) -> str:
        """An envelope (or header) recipient: recipient_canonical_maps, canonical_maps,
        masquerading (not of envelope recipients by default)."""
        return self._chain(addr, self.recipient_canonical, "recipient_canonical_maps",
                           f"{kind}_recipient", steps)

    def is_virtual_domain(self, domain: str) -> bool:
        d = domain.lower().rstrip(".")
        if not d:
            return False
        return d in self.virtual_domains or any(t.get(d) is not None
                                                for t in self.virtual_domain_tables)

    def virtual_alias(self, addr: str, steps: list[str] | None = None) -> list[str]:
        """The addresses ``addr`` becomes through virtual_alias_maps (itself when unmapped).

        Raises DeliveryError: 5.1.1 for an unmapped address in a virtual alias domain, 5.4.6
        for a loop (an address that comes back through its own expansion), 4.3.0 past
        virtual_alias_recursion_limit or virtual_alias_expansion_limit (as Postfix, the
        message is not accepted for now)."""
        out: list[str] = []
        seen: set[str] = set()
        self._expand(addr, (), out, seen, steps)
        return out

    def _expand(self, addr: str, chain: tuple[str, ...], out: list[str], seen: set[str],
                steps: list[str] | None) -> None:
        key = addr.lower()
        if len(chain) >= self.cfg.virtual_alias_recursion_limit:
            raise DeliveryError(f"unreasonable virtual_alias_maps map nesting for {chain[0]}",
                                "4.3.0")
        values = self._lookup(addr)
        if values is None:
            if self.is_virtual_domain(address.domain_of(addr)):
                raise DeliveryError(f"<{addr}>: User unknown in virtual alias table", "5.1.1")
            if key not in seen:
                seen.add(key)
                out.append(addr)
            return
        if steps is not None:
            steps.append(f"virtual_alias_maps: {addr} -> {', '.join(values)}")
        for v in values:
            vkey = v.lower()
            if vkey == key:  # listed in its own expansion: the address itself, as Postfix
                if vkey not in seen:
                    seen.add(vkey)
                    out.append(v)
                continue
            if vkey in chain:
                path = " -> ".join((*chain, key, vkey))
                raise DeliveryError(f"virtual alias loop: {path}", "5.4.6")
            self._expand(v, (*chain, key), out, seen, steps)
            if len(out) > self.cfg.virtual_alias_expansion_limit:
                raise DeliveryError("unreasonable virtual_alias_maps map expansion size for "
                                    f"{chain[0] if chain else addr}", "4.3.0")

    def _lookup(self, addr: str) -> list[str] | None:
        if not self.cfg.virtual_alias_maps:
            return None
        found = self._find(self.virtual, addr)
        if found is None:
            return None
        try:
            return [self._checked(v, addr, "virtual_alias_maps") for v in found] or None
        except ConfigError as e:
            raise DeliveryError(str(e), "4.3.5") from None

    # -- a whole submission ---------------------------------------------------------------

    def recipients(self, rcpts: list[str]) -> list[tuple[str, str, DeliveryError | None]]:
        """(address, original, refusal) per recipient after canonical mapping and virtual
        aliasing, duplicates dropped; a refusal (unknown in a virtual alias domain, a loop)
        keeps the original address so that it can be bounced. A temporary failure (a nesting
        or size limit) raises: the message is not accepted for now, as Postfix."""
        out: list[tuple[str, str, DeliveryError | None]] = []
        seen: set[str] = set()
        for orig in rcpts:
            try:
                found = self.virtual_alias(self.recipient(orig))
            except DeliveryError as e:
                if not e.permanent:
                    raise
                if orig.lower() not in seen:
                    seen.add(orig.lower())
                    out.append((orig, orig, e))
                continue
            for addr in found:
                if addr.lower() not in seen:
                    seen.add(addr.lower())
                    out.append((addr, orig, None))
        return out

    # -- headers ---------------------------------------------------------------------------

    def header(self, line: bytes) -> bytes:
        """One header (continuation lines included) with its addresses rewritten as
        canonical_classes and masquerade_classes say; any other header unchanged."""
        name, colon, value = line.partition(b":")
        key = name.strip().lower().decode("ascii", "replace")
        if not colon:
            return line
        if key in SENDER_HEADERS:
            func = self._header_sender
        elif key in RECIPIENT_HEADERS:
            func = self._header_recipient
        else:
            return line
        return name + b":" + rewrite_value(value, func)

    def _header_sender(self, addr: str) -> str:
        return self._qualified(addr, lambda a: self.sender(a, "header"))

    def _header_recipient(self, addr: str) -> str:
        return self._qualified(addr, lambda a: self.recipient(a, "header"))


class GenericMaps(Mapper):
    """smtp_generic_maps of one configuration, opened once (and only they: a broken
    canonical or virtual table must not stop remote delivery)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.generic = tables.open_tables(cfg.smtp_generic_maps)

    def smtp_generic(self, addr: str) -> str:
        """smtp_generic_maps: the address as it should leave over SMTP."""
        return self.map11(self.generic, addr, "smtp_generic_maps")

    def generic_header(self, line: bytes) -> bytes:
        """One header with smtp_generic_maps applied to its addresses (address headers only)."""
        name, colon, value = line.partition(b":")
        key = name.strip().lower().decode("ascii", "replace")
        if not colon or (key not in SENDER_HEADERS and key not in RECIPIENT_HEADERS):
            return line
        return name + b":" + rewrite_value(value, self._generic_header_address)

    def _generic_header_address(self, addr: str) -> str:
        return self._qualified(addr, self.smtp_generic)


def rewrite_value(value: bytes, func: Callable[[str], str]) -> bytes:
    """A header value's addresses through ``func``; the bytes unchanged when no address is."""
    text = value.decode("utf-8", "surrogateescape")
    new = address.rewrite_list(text, func)
    return value if new == text else new.encode("utf-8", "surrogateescape")


_cache: dict[int, tuple[Config, Rewriter]] = {}


def for_config(cfg: Config) -> Rewriter:
    """The Rewriter of ``cfg``, made once per configuration (tables are opened once)."""
    hit = _cache.get(id(cfg))
    if hit is not None and hit[0] is cfg:
        return hit[1]
    rw = Rewriter(cfg)
    _cache.clear()
    _cache[id(cfg)] = (cfg, rw)
    return rw
