"""A real OAuth2 authorization server for tests, HTTPS on loopback (trustme): the device
authorization endpoint and the token endpoint of RFC 8628 with refresh-token rotation, its
answers scripted by the test."""

from __future__ import annotations

import json
import ssl
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import trustme

CLIENT_ID = "pmt-test-client"
DEVICE_CODE = "dev-code-4711"
USER_CODE = "WDJB-MJHT"


class OAuthServer:
    """``/device`` and ``/token`` on https://127.0.0.1:PORT.

    ``polls``: what the device-code polls answer in turn: an error code
    (``authorization_pending``, ``slow_down``, ``access_denied``, ``expired_token``) or
    ``"ok"`` (tokens). Each refresh answers a new access token and a rotated refresh token
    when the refresh token sent is the current one, else ``invalid_grant``."""

    def __init__(self, directory: Path, *, polls: list[str] | None = None,
                 interval: int = 0, expires_in: int = 600, client_secret: str = "") -> None:
        self.polls = list(polls or ["ok"])
        self.interval = interval
        self.expires_in = expires_in
        self.client_secret = client_secret
        self.requests: list[tuple[float, str, dict[str, str]]] = []  # (time, path, form)
        self.refresh_token = "refresh-1"
        self.issued = 0
        self.lock = threading.Lock()
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = directory / "oauth-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(ctx)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> OAuthServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def paths(self) -> list[str]:
        return [p for _, p, _ in self.requests]

    def _new_tokens(self) -> dict[str, object]:
        self.issued += 1
        self.refresh_token = f"refresh-{self.issued + 1}"
        return {"access_token": f"access-{self.issued}", "token_type": "Bearer",
                "expires_in": 3599, "refresh_token": self.refresh_token,
                "scope": "https://mail.example.test/"}

    def answer(self, path: str, form: dict[str, str]) -> tuple[int, dict[str, object]]:
        with self.lock:
            self.requests.append((time.monotonic(), path, form))
            if form.get("client_id") != CLIENT_ID:
                return 401, {"error": "invalid_client"}
            if path == "/device":
                return 200, {"device_code": DEVICE_CODE, "user_code": USER_CODE,
                             "verification_uri": f"{self.url}/activate",
                             "expires_in": self.expires_in, "interval": self.interval}
            if path != "/token":
                return 404, {"error": "not_found"}
            if self.client_secret and form.get("client_secret") != self.client_secret:
                return 401, {"error": "invalid_client"}
            grant = form.get("grant_type")
            if grant == "urn:ietf:params:oauth:grant-type:device_code":
                if form.get("device_code") != DEVICE_CODE:
                    return 400, {"error": "invalid_grant"}
                step = self.polls.pop(0) if len(self.polls) > 1 else self.polls[0]
                if step == "ok":
                    return 200, self._new_tokens()
                return 400, {"error": step, "error_description": f"the test says {step}"}
            if grant == "refresh_token":
                if form.get("refresh_token") != self.refresh_token:
                    return 400, {"error": "invalid_grant",
                                 "error_description": "token revoked or rotated"}
                return 200, self._new_tokens()
            return 400, {"error": "unsupported_grant_type"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                status, body = server.answer(self.path, form)
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler
