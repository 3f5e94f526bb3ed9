"""Subject, issuer and validity of a peer certificate, read from its DER bytes.

``ssl`` decodes a certificate only when it was verified, and smtpchat, like swaks, does not verify
by default; a few lines of DER reading avoid a dependency on ``cryptography``.
"""

import datetime
from typing import NamedTuple

# Attribute names as OpenSSL's one-line form prints them (swaks: DN="/CN=mx.example.test").
_OID_NAMES = {
    "2.5.4.3": "CN", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST", "2.5.4.10": "O",
    "2.5.4.11": "OU", "2.5.4.5": "serialNumber", "1.2.840.113549.1.9.1": "emailAddress",
}


class CertInfo(NamedTuple):
    subject: str
    issuer: str
    not_before: str
    not_after: str


class _DER:
    """A bounded reader of DER TLVs; any inconsistency raises ValueError."""

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data, self.pos = data, pos
        self.end = len(data) if end is None else end

    def more(self) -> bool:
        return self.pos < self.end

    def read(self) -> tuple[int, int, int]:
        """(tag, start of content, end of content) of the next TLV."""
        if self.pos + 2 > self.end:
            raise ValueError("truncated")
        tag, length = self.data[self.pos], self.data[self.pos + 1]
        pos = self.pos + 2
        if length & 0x80:
            n = length & 0x7F
            if n == 0 or n > 4 or pos + n > self.end:
                raise ValueError("bad length")
            length = int.from_bytes(self.data[pos : pos + n], "big")
            pos += n
        if pos + length > self.end:
            raise ValueError("truncated")
        self.pos = pos + length
        return tag, pos, pos + length

    def enter(self) -> "_DER":
        _, start, end = self.read()
        return _DER(self.data, start, end)


def _oid(raw: bytes) -> str:
    if not raw:
        raise ValueError("empty OID")
    parts = [raw[0] // 40, raw[0] % 40]
    value = 0
    for b in raw[1:]:
        value = value << 7 | b & 0x7F
        if not b & 0x80:
            parts.append(value)
            value = 0
    return ".".join(map(str, parts))


def _name(der: _DER) -> str:
    out = []
    name = der.enter()
    while name.more():
        rdn = name.enter()
        while rdn.more():
            atv = rdn.enter()
            _, s, e = atv.read()
            oid = _oid(atv.data[s:e])
            tag, s, e = atv.read()
            raw = atv.data[s:e]
            # BMPString is UTF-16; everything else printable here is ASCII or UTF-8.
            value = raw.decode("utf-16-be", "replace") if tag == 0x1E else raw.decode(
                "utf-8", "replace")
            out.append(f"/{_OID_NAMES.get(oid, oid)}={value}")
    return "".join(out)


def _time(der: _DER) -> str:
    tag, s, e = der.read()
    text = der.data[s:e].decode("ascii")
    if tag == 0x17:  # UTCTime: YYMMDDHHMMSSZ, years 1950-2049 (RFC 5280)
        year = int(text[:2])
        text = str(1900 + year if year >= 50 else 2000 + year) + text[2:]
    when = datetime.datetime.strptime(text.rstrip("Z"), "%Y%m%d%H%M%S")
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def parse(der_bytes: bytes) -> CertInfo:
    """Subject and issuer in OpenSSL's one-line form and the validity period, in UTC."""
    tbs = _DER(der_bytes).enter().enter()
    tag, _, _ = _DER(tbs.data, tbs.pos, tbs.end).read()
    if tag == 0xA0:  # explicit [0] version
        tbs.read()
    tbs.read()  # serial number
    tbs.read()  # signature algorithm
    issuer = _name(tbs)
    validity = tbs.enter()
    not_before, not_after = _time(validity), _time(validity)
    subject = _name(tbs)
    return CertInfo(subject, issuer, not_before, not_after)
