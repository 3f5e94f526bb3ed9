"""SMTP AUTH password file: scrypt-hashed entries, checking a password, and making an entry.

File format (``smtpd_sasl_password_file``): one ``user:hash`` per line, ``#`` comments and
blank lines ignored, where hash is ``$scrypt$N$r$p$SALT$KEY`` (SALT and KEY in base64).
Make an entry with ``python -m pymailtools.smtpd.passwd USER >> FILE`` (the password is asked
for on the terminal, or read from the first line of standard input).
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import os
import sys

from pymailtools.errors import ConfigError

SCHEME = "scrypt"
N, R, P = 1 << 14, 8, 1  # ~16 MiB and tens of ms per check: costly to brute-force offline
KEY_LENGTH = 32
MAX_FILE = 1 << 20


class PasswordFileError(ConfigError):
    """smtpd_sasl_password_file cannot be read or has a malformed line (78)."""


def hash_password(password: str, *, n: int = N, r: int = R, p: int = P) -> str:
    salt = os.urandom(16)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=KEY_LENGTH)
    b64 = base64.b64encode
    return f"${SCHEME}${n}${r}${p}${b64(salt).decode()}${b64(key).decode()}"


def _parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    parts = stored.split("$")
    if len(parts) != 7 or parts[0] or parts[1] != SCHEME:
        raise ValueError("not a $scrypt$ hash")
    n, r, p = int(parts[2]), int(parts[3]), int(parts[4])
    if not (1 < n <= 1 << 20 and n & (n - 1) == 0 and 0 < r <= 32 and 0 < p <= 16):
        raise ValueError("scrypt parameters out of range")
    return n, r, p, base64.b64decode(parts[5], validate=True), base64.b64decode(parts[6],
                                                                              validate=True)


# Checked when the user is unknown, so that a wrong name costs as much time as a wrong password.
# A fixed entry with the default parameters (its key matches no password's: the check never
# succeeds anyway): hashing one at import cost every listener and `sendmail -bs` ~50 ms.
_DUMMY = (f"${SCHEME}${N}${R}${P}${base64.b64encode(bytes(16)).decode()}"
          f"${base64.b64encode(bytes(KEY_LENGTH)).decode()}")


def check(stored: str | None, password: bytes) -> bool:
    """True when ``password`` matches ``stored`` (None: unknown user, always False)."""
    try:
        n, r, p, salt, key = _parse_hash(stored if stored is not None else _DUMMY)
        got = hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=len(key),
                             maxmem=256 * n * r * p + (1 << 20))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(got, key) and stored is not None


def valid_user(name: str) -> bool:
    return 0 < len(name) <= 255 and name.isprintable() and not any(c in name for c in ": \t")


def load(path: str) -> dict[str, str]:
    """user -> stored hash. Raises PasswordFileError naming the line (never its content)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as e:
        raise PasswordFileError(f"cannot read {path}: {e.strerror}") from None
    if len(data) > MAX_FILE:
        raise PasswordFileError(f"{path} is larger than {MAX_FILE} bytes")
    users: dict[str, str] = {}
    for number, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, stored = line.partition(":")
        try:
            if not colon or not valid_user(user):
                raise ValueError("bad user name")
            _parse_hash(stored)
        except ValueError as e:
            raise PasswordFileError(f"{path}, line {number}: {e}") from None
        users[user] = stored
    return users


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not valid_user(args[0]):
        print("usage: python -m pymailtools.smtpd.passwd USER >> PASSWORD_FILE", file=sys.stderr)
        return 64
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args[0]}: ")
        if getpass.getpass("again: ") != password:
            print("smtpd_passwd: passwords differ", file=sys.stderr)
            return 65
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("smtpd_passwd: empty password", file=sys.stderr)
        return 65
    print(f"{args[0]}:{hash_password(password)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
