"""pymailtools-oauth2: get an OAuth2 refresh token once (device flow), print access tokens."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NoReturn

from pymailtools.cli.common import run_main
from pymailtools.errors import EX_OK, UsageError
from pymailtools.smtp import oauth2

PROG = "pymailtools-oauth2"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)  # one line, exit 64 (argparse would exit 2)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="OAuth2 tokens for SMTP and IMAP: authorize an account "
                "once with the device flow, then print fresh access tokens.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    a = sub.add_parser("authorize", help="sign in (device flow) and store the refresh token")
    a.add_argument("--account", required=True, metavar="NAME")
    a.add_argument("--provider", required=True, choices=oauth2.PROVIDERS)
    a.add_argument("--client-id", required=True, metavar="ID")
    a.add_argument("--client-secret-command", default="", metavar="COMMAND",
                   help="a command printing the client secret (never give it on a command "
                   "line)")
    a.add_argument("--device-endpoint", default="", metavar="URL")
    a.add_argument("--token-endpoint", default="", metavar="URL")
    a.add_argument("--scope", default="", metavar="SCOPES")
    a.add_argument("--tenant", default="", metavar="TENANT")
    a.add_argument("--store", default="", metavar="FILE")
    a.add_argument("--ca-file", default="", metavar="FILE")
    t = sub.add_parser("token", help="print a valid access token, refreshed when needed")
    t.add_argument("--account", required=True, metavar="NAME")
    t.add_argument("--store", default="", metavar="FILE")
    t.add_argument("--json", action="store_true",
                   help='print {"access_token": ..., "expires_in": ...}')
    return p


def authorize(args: argparse.Namespace) -> int:
    path = oauth2.store_path(args.account, args.store)
    prov = oauth2.provider(args.provider, tenant=args.tenant,
                           device_endpoint=args.device_endpoint,
                           token_endpoint=args.token_endpoint, scope=args.scope)
    ca_file = os.path.abspath(args.ca_file) if args.ca_file else ""
    account = oauth2.Account(args.provider, args.client_id, prov.device_endpoint,
                             prov.token_endpoint, prov.scope, prov.refresh_scope,
                             client_secret_command=args.client_secret_command, ca_file=ca_file)
    device = oauth2.request_device_code(account)
    if device.verification_uri_complete:
        print(f"To sign in, open {device.verification_uri_complete}")
        print(f"(or open {device.verification_uri} and enter the code {device.user_code})")
    else:
        print(f"To sign in, open {device.verification_uri} and enter the code "
              f"{device.user_code}")
    print("Waiting for the sign-in to be approved...", flush=True)
    oauth2.poll(account, device)
    oauth2.save(path, account)
    print(f"Authorized; refresh token stored in {path}")
    return EX_OK


def token(args: argparse.Namespace) -> int:
    path = oauth2.store_path(args.account, args.store)
    value, expires_in = oauth2.access_token(path)
    if args.json:
        print(json.dumps({"access_token": value, "expires_in": expires_in}))
    else:
        print(value)
    return EX_OK


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = parser().parse_args(sys.argv[1:] if argv is None else argv)
        return authorize(args) if args.command == "authorize" else token(args)

    return run_main(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
