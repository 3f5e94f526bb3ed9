"""Which delivery transport and next hop a recipient gets: transport_maps, then the address
class defaults (local for our domains; SMTP to sender_dependent_relayhost_maps, relayhost or
the recipient domain for the others), as Postfix's trivial-rewrite resolves them."""

from typing import NamedTuple

from pymailtools.config import Config
from pymailtools.errors import ConfigError, MailError
from pymailtools.local import route as local_route

TYPE_CHECKING = False
if TYPE_CHECKING:
    # smtp.nexthop (socket, ipaddress) only once an SMTP route is made: a queue run with
    # local recipients alone does without it
    from pymailtools.smtp.nexthop import NextHop
    from pymailtools.tables import Tables

LOCAL, SMTP, ERROR, RETRY, DISCARD = "local", "smtp", "error", "retry", "discard"
# transport names as master.cf would have them -> what we do for them
KNOWN = {"local": LOCAL, "smtp": SMTP, "relay": SMTP, "error": ERROR, "retry": RETRY,
         "discard": DISCARD}
NULL_SENDER_KEY = "<>"  # Postfix's empty_address_relayhost_maps_lookup_key
DUNNO = "DUNNO"  # a sender_dependent_relayhost_maps result that means "no override"


class Route(NamedTuple):
    """Where one recipient goes. ``hop`` (smtp only): the next hop, None for the recipient
    domain's MX hosts. ``text``: the reason of error/retry (maybe with an RFC 3463 code
    first), the note logged for discard."""

    transport: str
    hop: "NextHop | None" = None
    text: str = ""

    def status(self) -> tuple[str, str]:
        """error/retry: the RFC 3463 code and the text, as error(8) splits its next hop."""
        default = "4.0.0" if self.transport == RETRY else "5.0.0"
        word, _, rest = self.text.partition(" ")
        parts = word.split(".")
        if len(parts) == 3 and parts[0] in ("4", "5") and all(
                p.isascii() and p.isdigit() and len(p) <= 3 for p in parts):
            return word, rest.strip() or f"delivery via {self.transport} transport"
        return default, self.text or f"delivery via {self.transport} transport"


def _maps(cfg: Config, key: str) -> "Tables | None":
    value = getattr(cfg, key, None)
    if not value:
        return None
    # the lookup tables module only when a map is configured
    from pymailtools.tables import open_tables

    try:
        return open_tables(value)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None


class Router:
    """The routing decision of a queue run: one place, tables opened once per run.

    A table that cannot be opened defers every recipient (any of them might have been routed
    by it), a malformed relayhost those it would have carried; ``errors`` says why, once."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.errors: list[str] = []
        self.relayhost: NextHop | None = None
        self.relayhost_error = ""
        if cfg.relayhost:
            from pymailtools.smtp import nexthop  # see TYPE_CHECKING above

            try:
                self.relayhost = nexthop.parse(cfg.relayhost, cfg.smtp_port)
            except ConfigError as e:
                self.relayhost_error = str(e)
                self.errors.append(str(e))
        self.transport_maps: Tables | None = None
        self.relayhost_maps: Tables | None = None
        self.broken = ""
        try:
            self.transport_maps = _maps(cfg, "transport_maps")
            self.relayhost_maps = _maps(cfg, "sender_dependent_relayhost_maps")
        except MailError as e:
            self.broken = str(e)
            self.errors.append(str(e))
        self.delimiter = str(getattr(cfg, "recipient_delimiter", "") or "")

    def route(self, address: str, sender: str) -> Route:
        """The route of ``address`` for mail from ``sender``. A table that fails now (gone,
        unreadable) defers the recipient with the reason: never a guess."""
        try:
            return self._route(address, sender)
        except (MailError, OSError) as e:
            return Route(RETRY, text=f"4.3.0 routing table lookup failed: {e}")

    def _route(self, address: str, sender: str) -> Route:
        if self.broken:
            return Route(RETRY, text=f"4.3.5 configuration error: {self.broken}")
        local = local_route.is_local(self.cfg, address)
        found = self._transport(address) if self.transport_maps is not None else None
        if found is None:
            return self._default(local, address, sender)
        name, sep, hop_text = found.strip().partition(":")
        name, hop_text = name.strip().lower(), hop_text.strip()
        if not sep:
            hop_text = ""
        if not name:
            # a null transport keeps the default one; a next hop changes where SMTP goes
            default = self._default(local, address, sender)
            if default.transport != SMTP or not hop_text:
                return default
            return self._smtp(hop_text, "transport_maps")
        kind = KNOWN.get(name)
        if kind is None:
            return Route(RETRY, text=f"4.3.0 mail transport unavailable: {name!r} "
                                     "(transport_maps) is not one we have")
        if kind == SMTP:
            # a transport without a next hop means the recipient domain (not relayhost)
            return self._smtp(hop_text, "transport_maps") if hop_text else Route(SMTP)
        if kind == LOCAL:
            return Route(LOCAL)
        return Route(kind, text=hop_text)

    def _transport(self, address: str) -> str | None:
        """transport(5)'s search: user+ext@domain, user@domain, domain, .parent domains, *."""
        maps = self.transport_maps
        assert maps is not None
        # the lookup tables module only when transport_maps is set
        from pymailtools.tables import find_domain, split_extension

        local_part, at, domain = address.rpartition("@")
        if at:
            hit = maps.get(address)  # pattern tables see only the full address
            if hit is not None:
                return hit
            bare, ext = split_extension(local_part, self.delimiter)
            if ext is not None:
                hit = maps.get(f"{bare}@{domain}", fixed_only=True)
                if hit is not None:
                    return hit
            hit = find_domain(maps, domain)
            if hit is not None:
                return hit
        return maps.get("*", fixed_only=True)

    def _default(self, local: bool, address: str, sender: str) -> Route:
        if local:
            return Route(LOCAL)
        if self.relayhost_maps is not None:
            found = self._sender_relayhost(sender)
            if found:
                return self._smtp(found, "sender_dependent_relayhost_maps")
        if self.relayhost_error:
            return Route(RETRY, text=f"4.3.5 configuration error: {self.relayhost_error}")
        return Route(SMTP, self.relayhost)

    def _sender_relayhost(self, sender: str) -> str | None:
        """sender_dependent_relayhost_maps: the sender address, then @domain; DUNNO stops."""
        maps = self.relayhost_maps
        assert maps is not None
        # the lookup tables module only when sender_dependent_relayhost_maps is set
        from pymailtools.tables import find_address

        hit = maps.get(NULL_SENDER_KEY) if not sender else \
            find_address(maps, sender, delimiter=self.delimiter)
        if hit is None or hit.strip().upper() == DUNNO:
            return None
        return hit.strip()

    def _smtp(self, text: str, key: str) -> Route:
        from pymailtools.smtp import nexthop  # see TYPE_CHECKING above

        try:
            return Route(SMTP, nexthop.parse(text, self.cfg.smtp_port, key=key))
        except ConfigError as e:
            return Route(RETRY, text=f"4.3.5 {e}")
