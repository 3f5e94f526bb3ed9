"""DKIM signing of mail leaving over SMTP (dkim_domains, dkim_selector, dkim_private_key_file).

The signing domain is the domain of the From: header, as OpenDKIM's signing table does: it
is the identity receivers (and DMARC) check the signature against. A message whose From:
domain is not in ``dkim_domains`` goes out unsigned; one that should be signed and cannot be
(bad key, unreadable key, a message dkimpy rejects) is deferred with the reason, never sent
unsigned.

dkimpy does the canonicalisation and the cryptography. It is imported when a message is
signed, never by sendmail's submission path or by a queue run with signing off.
"""

import base64
import binascii

from pymailtools.address import domain_of, parse_list
from pymailtools.config import Config
from pymailtools.errors import ConfigError, DeliveryError
from pymailtools.fileio import read_private

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# The header fields signed when present: RFC 6376's "SHOULD be signed" list, which is
# OpenDKIM's default (Bcc, Received, Return-Path and the like are never signed).
SIGNED_HEADERS = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-type", "content-transfer-encoding", "content-id",
    "content-description", "resent-date", "resent-from", "resent-sender", "resent-to",
    "resent-cc", "resent-message-id", "in-reply-to", "references", "list-id", "list-help",
    "list-unsubscribe", "list-subscribe", "list-post", "list-owner", "list-archive",
)
# relaxed/relaxed rather than OpenDKIM's simple/simple: relays that refold a header or
# change trailing white space (common, and allowed) would break a simple signature.
CANONICALIZATION = (b"relaxed", b"relaxed")
MIN_RSA_BITS = 2048
KEY_SIZE_LIMIT = 65536
# DER prefix of an RFC 8410 PKCS#8 Ed25519 private key (openssl genpkey -algorithm ed25519):
# what follows is the 32-byte seed.
_ED25519_PKCS8 = bytes.fromhex("302e020100300506032b657004220420")
STATUS = "4.3.5"  # a local configuration problem: retried, never bounced at once


class SigningKey:
    """A private key read from dkim_private_key_file: algorithm and the form dkimpy signs with."""

    def __init__(self, algorithm: bytes, key: bytes) -> None:
        self.algorithm = algorithm  # b"rsa-sha256" or b"ed25519-sha256"
        self.key = key  # RSA: the PEM text; Ed25519: the base64 seed


def _dkim() -> "Any":  # dkimpy ships no type information
    # dkimpy (and dnspython behind it) only once a message is signed
    import dkim

    return dkim


def read_key(path: str) -> SigningKey:
    """The key in ``path``, checked: a regular file owned by root or by us, no group or
    other access, RSA of 2048 bits or more or Ed25519. Raises DeliveryError (one line)."""
    def bad(why: str) -> DeliveryError:
        return DeliveryError(f"DKIM signing key {path}: {why}", STATUS)

    try:
        text = read_private(path, KEY_SIZE_LIMIT)
    except OSError as e:
        raise bad(e.strerror or str(e)) from None
    except ValueError as e:
        raise bad(str(e)) from None
    try:
        return parse_key(text)
    except ValueError as e:
        raise bad(str(e)) from None


def parse_key(text: bytes) -> SigningKey:
    """An RSA key (PEM, PKCS#1 or PKCS#8) or an Ed25519 key (PEM PKCS#8, or the base64 seed
    dkimpy's dknewkey writes); ValueError saying what is wrong with it."""
    stripped = text.strip()
    if b"ENCRYPTED" in stripped[:64]:
        raise ValueError("encrypted keys are not supported (store it unencrypted, mode 0600)")
    if stripped.startswith(b"-----BEGIN"):
        lines = stripped.replace(b"\r\n", b"\n").split(b"\n")
        try:
            der = base64.b64decode(b"".join(x for x in lines if not x.startswith(b"-----")),
                                   validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not a PEM private key") from None
        if der.startswith(_ED25519_PKCS8) and len(der) == len(_ED25519_PKCS8) + 32:
            return SigningKey(b"ed25519-sha256",
                              base64.b64encode(der[len(_ED25519_PKCS8):]))
        crypto = _dkim().crypto
        try:
            # dkimpy's PEM reader wants the base64 between "--\n" and "\n--"
            rsa = crypto.parse_pem_private_key(b"\n".join(lines) + b"\n")
        except Exception:  # dkimpy raises its own ASN.1 errors for anything unparsable
            raise ValueError("neither an RSA nor an Ed25519 private key") from None
        bits = int(rsa["modulus"]).bit_length()
        if bits < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {bits} bits is too weak "
                             f"(at least {MIN_RSA_BITS} needed)")
        return SigningKey(b"rsa-sha256", b"\n".join(lines) + b"\n")
    try:
        seed = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        seed = b""
    if len(seed) != 32:
        raise ValueError("neither an RSA (PEM) nor an Ed25519 private key")
    return SigningKey(b"ed25519-sha256", stripped)


def unstuff(data: bytes) -> bytes:
    """The message in SMTP DATA content (CRLF, dot-stuffed, terminated) as it is meant."""
    if data.endswith(b".\r\n"):
        data = data[:-3]
    if data.startswith(b".."):
        data = data[1:]
    return data.replace(b"\r\n..", b"\r\n.")


def header_fields(message: bytes) -> list[tuple[str, bytes]]:
    """(lower-case name, unfolded value) of each header field of a CRLF message."""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[: end + 2]
    fields: list[tuple[str, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + line)
        elif b":" in line:
            raw, _, value = line.partition(b":")
            fields.append((raw.strip().decode("ascii", "replace").lower(), value))
    return fields


def author_domain(fields: list[tuple[str, bytes]]) -> str:
    """The domain of the first address of the first From: header ("" when there is none)."""
    for name, value in fields:
        if name == "from":
            for _, addr in parse_list(value.decode("utf-8", "replace")):
                if addr:
                    return domain_of(addr).rstrip(".")
            return ""
    return ""


class Signer:
    """DKIM signing for one queue run: the key is read (and checked) once, on first use."""

    def __init__(self, cfg: Config) -> None:
        self.domains = {d.lower().rstrip(".") for d in cfg.dkim_domains}
        self.selector = cfg.dkim_selector
        self.key_file = cfg.dkim_private_key_file
        if not self.selector or not self.key_file:
            raise ConfigError("dkim_domains is set: dkim_selector and dkim_private_key_file "
                              "are needed too")
        labels = self.selector.split(".")
        if not all(0 < len(x) <= 63 and x.replace("-", "").isalnum() and x.isascii()
                   for x in labels):
            raise ConfigError(f"dkim_selector: not a DNS name: {self.selector!r}")
        self._key: SigningKey | DeliveryError | None = None

    def key(self) -> SigningKey:
        if self._key is None:
            try:
                self._key = read_key(self.key_file)
            except DeliveryError as e:
                self._key = e
        if isinstance(self._key, DeliveryError):
            raise DeliveryError(self._key.reason, self._key.status)
        return self._key

    def sign(self, data: bytes) -> tuple[bytes, str]:
        """SMTP DATA content with a DKIM-Signature header in front, and the signing domain;
        ``(data, "")`` when the From: domain is not one of ``dkim_domains``. Raises
        DeliveryError (a deferral) when the message should be signed and cannot be."""
        message = unstuff(data)
        fields = header_fields(message)
        domain = author_domain(fields)
        if domain not in self.domains:
            return data, ""
        key = self.key()
        names = [n for n, _ in fields if n in SIGNED_HEADERS]
        dkim = _dkim()
        try:
            sig = dkim.sign(message, self.selector.encode(), domain.encode("idna"), key.key,
                            canonicalize=CANONICALIZATION, signature_algorithm=key.algorithm,
                            include_headers=[n.encode() for n in names], linesep=b"\r\n")
        except (dkim.DKIMException, UnicodeError, ValueError) as e:
            why = (str(e).splitlines() or [type(e).__name__])[0]
            raise DeliveryError(f"DKIM signing failed: {why}", STATUS) from None
        if not sig.endswith(b"\r\n"):
            sig += b"\r\n"
        # The signature's lines start with "DKIM-Signature:" or white space: never a dot to
        # stuff, so it goes in front of the stuffed content as it is.
        return sig + data, domain
