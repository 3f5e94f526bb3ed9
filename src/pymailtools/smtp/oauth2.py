"""OAuth2 tokens for SMTP and IMAP: the device-authorization flow (RFC 8628), the refresh flow,
and the 0600 file that keeps an account's refresh token.

Standard library only (urllib, json, ssl): the two flows are a handful of form POSTs, and a
token helper that the queue runs once per connection should start fast. Secrets (refresh and
access tokens, the client secret) never go into an error message, and the client secret only
ever comes from a command's output, never from a command line.
"""

from __future__ import annotations

import fcntl
import json
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from pymailtools.errors import (
    EX_CONFIG,
    EX_NOPERM,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    MailError,
    UsageError,
)
from pymailtools.fileio import read_private, replace_file
from pymailtools.smtp import secret

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
HTTP_TIMEOUT = 30  # seconds for one request to an endpoint
SECRET_COMMAND_TIMEOUT = 30
STORE_LIMIT = 1 << 20
EARLY = 60  # an access token this close to its expiry is refreshed first
DEFAULT_INTERVAL = 5  # RFC 8628: when the server names no polling interval
SLOW_DOWN = 5  # RFC 8628: seconds added to the interval on each slow_down


class OAuthError(MailError):
    """A flow failed: one line naming what the server or the network said (never a secret);
    exit 69 (server unusable), 75 (try again), 77 (the user or server refused), 78 (setup)."""

    exit_code = EX_UNAVAILABLE


@dataclass(frozen=True)
class Provider:
    """Where a provider's endpoints are and which scope mail needs there."""

    device_endpoint: str
    token_endpoint: str
    scope: str
    refresh_scope: bool  # send the scope with a refresh (Microsoft's v2 endpoint wants it)


GOOGLE = Provider("https://oauth2.googleapis.com/device/code",
                  "https://oauth2.googleapis.com/token", "https://mail.google.com/", False)
MICROSOFT_BASE = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/"
MICROSOFT_SCOPE = ("https://outlook.office.com/SMTP.Send "
                   "https://outlook.office.com/IMAP.AccessAsUser.All offline_access")
PROVIDERS = ("google", "microsoft", "custom")


def provider(name: str, *, tenant: str = "", device_endpoint: str = "",
             token_endpoint: str = "", scope: str = "") -> Provider:
    """A preset (google, microsoft with its tenant, default ``common``) with any endpoint or
    scope given replacing the preset's, or a custom provider (both endpoints and a scope)."""
    if name == "google":
        base = GOOGLE
    elif name == "microsoft":
        tenant = tenant or "common"
        if not tenant.replace("-", "").replace(".", "").isalnum():
            raise UsageError(f"--tenant: not a tenant name or id: {tenant!r}")
        prefix = MICROSOFT_BASE.format(tenant=tenant)
        base = Provider(prefix + "devicecode", prefix + "token", MICROSOFT_SCOPE, True)
    elif name == "custom":
        if not (device_endpoint and token_endpoint and scope):
            raise UsageError("--provider custom needs --device-endpoint, --token-endpoint "
                             "and --scope")
        base = Provider(device_endpoint, token_endpoint, scope, True)
    else:
        raise UsageError(f"--provider: expected one of {', '.join(PROVIDERS)}, got {name!r}")
    if tenant and name != "microsoft":
        raise UsageError("--tenant is for --provider microsoft")
    chosen = Provider(device_endpoint or base.device_endpoint,
                      token_endpoint or base.token_endpoint, scope or base.scope,
                      base.refresh_scope)
    for url in (chosen.device_endpoint, chosen.token_endpoint):
        check_endpoint(url)
    return chosen


def check_endpoint(url: str) -> None:
    """Tokens travel only over HTTPS."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise UsageError(f"endpoint must be an https:// URL: {url}")


# --- the store -----------------------------------------------------------------------------

@dataclass
class Account:
    """What the store file of one account holds."""

    provider: str
    client_id: str
    device_endpoint: str
    token_endpoint: str
    scope: str
    refresh_scope: bool
    refresh_token: str = field(default="", repr=False)  # secrets: never in a printed form
    access_token: str = field(default="", repr=False)
    expires_at: float = 0.0
    client_secret_command: str = ""
    ca_file: str = ""


def check_account_name(name: str) -> str:
    if not name or name.startswith(".") or not all(
            c.isalnum() or c in "._@+-" for c in name) or not name.isascii():
        raise UsageError(f"--account: use letters, digits and . _ @ + - only: {name!r}")
    return name


def store_path(account: str, store: str = "") -> str:
    """``--store`` as given, else $XDG_CONFIG_HOME/pymailtools/oauth2/ACCOUNT.json."""
    if store:
        return store
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"),
                                                             ".config")
    return os.path.join(base, "pymailtools", "oauth2", check_account_name(account) + ".json")


def load(path: str) -> Account:
    """The account stored in ``path`` (a private file: see fileio.read_private)."""
    try:
        text = read_private(path, STORE_LIMIT)
    except FileNotFoundError:
        raise OAuthError(f"{path}: no stored authorization; run pymailtools-oauth2 authorize "
                         "first", EX_CONFIG) from None
    except OSError as e:
        raise OAuthError(f"{path}: {e.strerror or e}", EX_CONFIG) from None
    except ValueError as e:
        raise OAuthError(f"{path}: {e}", EX_NOPERM) from None
    try:
        data = json.loads(text)
        known = {k: data[k] for k in Account.__dataclass_fields__ if k in data}
        return Account(**known)
    except (ValueError, TypeError) as e:
        raise OAuthError(f"{path}: not a token store: {e}", EX_CONFIG) from None


def save(path: str, account: Account) -> None:
    """Write the store atomically, mode 0600, in a directory created 0700."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        replace_file(path, json.dumps(asdict(account), indent=1).encode() + b"\n")
    except OSError as e:
        raise OAuthError(f"cannot write {e.filename or path}: {e.strerror or e}",
                         EX_CONFIG) from None


class _Lock:
    """An exclusive lock beside the store: two token commands at once refresh only once
    (a provider that rotates refresh tokens would refuse the second one's old token)."""

    def __init__(self, path: str) -> None:
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            self.fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise OAuthError(f"cannot lock {e.filename or path}: {e.strerror or e}",
                             EX_CONFIG) from None

    def __enter__(self) -> _Lock:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


# --- HTTP ----------------------------------------------------------------------------------

def _context(ca_file: str) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as e:
        raise OAuthError(f"cannot load the CA file {ca_file}: "
                         f"{getattr(e, 'strerror', None) or e}", EX_CONFIG) from None


def post(url: str, form: dict[str, str], ca_file: str = "") -> tuple[int, dict[str, Any]]:
    """POST a form; (HTTP status, the JSON object answered). OAuthError when the server
    cannot be reached or does not answer JSON."""
    body = urllib.parse.urlencode(form).encode()
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"})
    host = urllib.parse.urlsplit(url).netloc
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT,
                                    context=_context(ca_file)) as resp:
            status, raw = resp.status, resp.read(STORE_LIMIT)
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read(STORE_LIMIT)
        e.close()
    except urllib.error.URLError as e:
        reason = e.reason
        why = getattr(reason, "strerror", None) or getattr(reason, "reason", None) or reason
        raise OAuthError(f"cannot reach {host}: {why}") from None
    except TimeoutError:
        raise OAuthError(f"{host} did not answer within {HTTP_TIMEOUT}s", EX_TEMPFAIL) from None
    except OSError as e:
        raise OAuthError(f"cannot reach {host}: {e.strerror or e}") from None
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise OAuthError(f"{host} answered HTTP {status} without a JSON object")
    return status, data


def _server_error(data: dict[str, Any]) -> tuple[str, str]:
    """(error code, "code: description") of an OAuth error answer."""
    code = str(data.get("error") or "")
    desc = str(data.get("error_description") or "").splitlines()
    text = code + (f": {desc[0]}" if desc and desc[0] else "")
    return code, text


def client_secret(command: str) -> str:
    """The first line a command prints (`pass show oauth/client`), run without a shell."""
    if not command:
        return ""
    try:
        return secret.password(command, SECRET_COMMAND_TIMEOUT, "client secret command")
    except secret.SecretTimeout as e:
        raise OAuthError(str(e), EX_TEMPFAIL) from None
    except secret.SecretError as e:
        raise OAuthError(str(e), EX_CONFIG) from None


def _credentials(account: Account) -> dict[str, str]:
    form = {"client_id": account.client_id}
    value = client_secret(account.client_secret_command)
    if value:
        form["client_secret"] = value
    return form


def _take_tokens(account: Account, data: dict[str, Any], now: float) -> None:
    token = data.get("access_token")
    if not isinstance(token, str) or not token:
        raise OAuthError("the token endpoint answered without an access_token")
    account.access_token = token
    try:
        lifetime = float(data.get("expires_in", 3600))
    except (TypeError, ValueError):
        lifetime = 3600.0
    account.expires_at = now + lifetime
    rotated = data.get("refresh_token")
    if isinstance(rotated, str) and rotated:
        account.refresh_token = rotated


# --- the flows -----------------------------------------------------------------------------

@dataclass
class DeviceCode:
    """What the device endpoint answered: what to show the user and what to poll with."""

    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str
    expires_in: float
    interval: float


def request_device_code(account: Account) -> DeviceCode:
    """Step one of RFC 8628: a device code and the user code to enter at the verification URL."""
    form = {"client_id": account.client_id, "scope": account.scope}
    status, data = post(account.device_endpoint, form, account.ca_file)
    if status != 200:
        _, text = _server_error(data)
        raise OAuthError(f"device authorization refused: {text or f'HTTP {status}'}")
    # Google names it verification_url, as an older draft did
    uri = data.get("verification_uri") or data.get("verification_url")
    code, user = data.get("device_code"), data.get("user_code")
    if not (isinstance(uri, str) and isinstance(code, str) and isinstance(user, str)):
        raise OAuthError("device authorization answer lacks device_code, user_code or "
                         "verification_uri")
    try:
        expires = float(data.get("expires_in", 900))
        interval = float(data.get("interval", DEFAULT_INTERVAL))
    except (TypeError, ValueError):
        raise OAuthError("device authorization answer has a bad expires_in or interval") \
            from None
    complete = data.get("verification_uri_complete")
    return DeviceCode(code, user, uri, complete if isinstance(complete, str) else "",
                      expires, max(interval, 0.0))


def poll(account: Account, device: DeviceCode) -> None:
    """Step two: poll the token endpoint until the user has approved (the tokens go into
    ``account``), honouring interval and slow_down; OAuthError when the user refused
    (77), the code expired (75) or the server failed (69)."""
    interval = device.interval
    deadline = time.monotonic() + device.expires_in
    form = {**_credentials(account), "grant_type": DEVICE_GRANT,
            "device_code": device.device_code}
    while True:
        if time.monotonic() + interval > deadline:
            raise OAuthError("the device code expired before the sign-in was approved; "
                             "run authorize again", EX_TEMPFAIL)
        time.sleep(interval)
        status, data = post(account.token_endpoint, form, account.ca_file)
        if status == 200 and "access_token" in data:
            _take_tokens(account, data, time.time())
            if not account.refresh_token:
                raise OAuthError("the server gave no refresh token (does the scope ask for "
                                 "offline access?)")
            return
        code, text = _server_error(data)
        if code == "authorization_pending":
            continue
        if code == "slow_down":
            interval += SLOW_DOWN
            continue
        if code in ("access_denied", "authorization_declined"):
            raise OAuthError(f"sign-in refused ({text})", EX_NOPERM)
        if code in ("expired_token", "code_expired"):
            raise OAuthError(f"the device code expired ({text}); run authorize again",
                             EX_TEMPFAIL)
        raise OAuthError(f"token endpoint refused: {text or f'HTTP {status}'}")


def refresh(account: Account) -> None:
    """New access token from the refresh token (a rotated refresh token is kept)."""
    if not account.refresh_token:
        raise OAuthError("no refresh token stored; run pymailtools-oauth2 authorize",
                         EX_CONFIG)
    form = {**_credentials(account), "grant_type": "refresh_token",
            "refresh_token": account.refresh_token}
    if account.refresh_scope:
        form["scope"] = account.scope
    status, data = post(account.token_endpoint, form, account.ca_file)
    if status == 200 and "access_token" in data:
        _take_tokens(account, data, time.time())
        return
    code, text = _server_error(data)
    if code == "invalid_grant":
        raise OAuthError(f"the refresh token was refused ({text}); run pymailtools-oauth2 "
                         "authorize again", EX_NOPERM)
    if status >= 500 or status == 429:
        raise OAuthError(f"token endpoint failed: {text or f'HTTP {status}'}", EX_TEMPFAIL)
    raise OAuthError(f"token endpoint refused: {text or f'HTTP {status}'}")


def access_token(path: str) -> tuple[str, int]:
    """A valid access token of the account stored at ``path`` and the seconds it stays
    valid, refreshed (and the store rewritten) when it is about to expire."""
    with _Lock(path):
        account = load(path)
        now = time.time()
        if not account.access_token or account.expires_at - EARLY <= now:
            refresh(account)
            save(path, account)
            now = time.time()
        return account.access_token, max(int(account.expires_at - now), 0)

