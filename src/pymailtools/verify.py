"""sendmail -bv and -bi: where each recipient would go; alias file checks. Delivers nothing."""

from typing import TextIO

from pymailtools import address, route
from pymailtools.config import Config
from pymailtools.delivery import DeliveryError
from pymailtools.errors import EX_NOHOST, EX_NOUSER, EX_OK


def verify(cfg: Config, args: list[str], out: TextIO) -> int:
    """Print one line per recipient; exit 67 if a local user is unknown, 68 for a bad host."""
    code = EX_OK
    for arg in args:
        for rcpt in address.parse_recipients(arg, cfg.myorigin):
            try:
                print(route.explain(cfg, rcpt), file=out)
            except DeliveryError as e:
                print(f"{rcpt}: undeliverable: {e.reason} ({e.status})", file=out)
                if e.status == "5.1.1":
                    code = code or EX_NOUSER
                elif e.status.startswith("5.1.2") or e.status.startswith("5.4.4"):
                    code = code or EX_NOHOST
                else:
                    code = code or EX_NOUSER
    return code


def check_aliases(cfg: Config, prog: str) -> int:
    """newaliases / -bi: parse every alias file and report problems (no database to build)."""
    import sys

    from pymailtools import aliases

    status = EX_OK
    for path in cfg.alias_maps:
        try:
            aliases.load(path)
        except Exception as e:
            print(f"{prog}: {path}: {e}", file=sys.stderr)
            status = 78
    return status
