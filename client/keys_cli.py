"""``modelpress keys``: make, list and revoke per-owner API keys, server-side, on the configured database.

Like ``modelpress migrate`` these commands run where the server runs (``MODELPRESS_DATABASE_URL``), with
no API call, so the first keys can be made before any key exists; like ``serve`` they first migrate the database
when it is behind (a fresh ``MODELPRESS_HOME`` has no tables yet). ``keys create`` prints the key alone on
standard output (``KEY=$(modelpress keys create --owner alice)``); everything else goes to standard error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from models.schemas import KeyCreate, KeyOut

if TYPE_CHECKING:
    import argparse

SCOPES = ("read", "write", "admin")
EXIT_OK, EXIT_USAGE = 0, 2


def _when(ts: Any) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S") if ts is not None else "-"


def _migrated(err: Console) -> None:
    """Bring the database to the latest schema first, as ``serve`` does: on a fresh ``MODELPRESS_HOME`` the key
    commands work before any ``serve`` or ``migrate`` (and say that they migrated)."""
    from migrations import ensure_current
    from models.settings import get_settings

    if ensure_current():
        err.print(f"migrated the database ({_where(get_settings().database_url)}) to the latest schema first",
                  markup=False)


def _where(url: str) -> str:
    """A database URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL: its scheme is enough
        return url.partition(":")[0]


def cmd_create(args: argparse.Namespace) -> int:
    """Make a key; print it alone on stdout, its id and scope on stderr."""
    from api.services import keys
    from models.db import session_scope

    err = Console(stderr=True, highlight=False)
    try:
        body = KeyCreate(owner=args.owner, scope=args.scope, name=args.name or "")
    except ValidationError as exc:
        for e in exc.errors():
            err.print(f"error: --{'.'.join(str(p) for p in e['loc'])}: {e['msg']}", markup=False)
        return EXIT_USAGE
    _migrated(err)
    with session_scope() as session:
        created = keys.create_key(session, body.owner, body.scope, body.name)
    sys.stdout.write(created.key + "\n")
    sys.stdout.flush()
    err.print(f"created {created.id} for owner {created.owner} (scope {created.scope}); "
              "the key is shown only this once", markup=False)
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    """List keys (never their secrets), newest first."""
    from api.services import keys
    from models.db import session_scope

    rows: list[KeyOut] = []
    _migrated(Console(stderr=True, highlight=False))
    with session_scope() as session:
        after = None
        while True:
            page = keys.list_keys(session, args.owner, after, 100, include_revoked=args.all)
            rows += page.data
            if page.next_cursor is None:
                break
            after = page.next_cursor
    if args.json:
        import json

        sys.stdout.write(json.dumps([r.model_dump(mode="json") for r in rows], indent=2) + "\n")
        return EXIT_OK
    table = Table(title="keys")
    for column in ("id", "owner", "scope", "name", "created", "last used", "revoked"):
        table.add_column(column, no_wrap=column == "id")
    for r in rows:  # cells are plain text: a key's name is never read as markup
        scope = f"{r.scope} (all owners)" if r.manages_keys_of == "*" else r.scope  # admin is global
        table.add_row(*(Text(cell) for cell in (r.id, r.owner, scope, r.name, _when(r.created_at),
                                               _when(r.last_used_at), _when(r.revoked_at))))
    Console(highlight=False, soft_wrap=True).print(table)
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace) -> int:
    """Revoke a key by id: it answers 401 from now on."""
    from api.errors import ProblemError
    from api.services import keys
    from models.db import session_scope

    err = Console(stderr=True, highlight=False)
    _migrated(err)
    try:
        with session_scope() as session:
            row = keys.revoke_key(session, args.id)
    except ProblemError as exc:  # an unknown id
        err.print(f"error: {exc.detail}", markup=False)
        return EXIT_USAGE
    err.print(f"revoked {row.id} (owner {row.owner}) at {_when(row.revoked_at)}", markup=False)
    return EXIT_OK


def add_commands(sub: Any, add: Callable[..., Any], as_json: Sequence[Any]) -> None:
    """Register ``keys create|list|revoke`` under the CLI's subparsers (``add`` makes one command)."""
    grp = sub.add_parser("keys", help="make, list and revoke API keys (server-side, on the database)")
    actions = grp.add_subparsers(dest="action", required=True)

    def run(func: Callable[[argparse.Namespace], int]) -> Callable[[Any], int]:
        return lambda ctx: func(ctx.args)

    s = add(actions, "create", run(cmd_create), "make a key for an owner; prints the key alone on stdout")
    s.add_argument("--owner", required=True)
    s.add_argument("--scope", choices=SCOPES, default="write")
    s.add_argument("--name", default="", help="what the key is for (e.g. laptop)")
    s = add(actions, "list", run(cmd_list), "list keys (never their secrets)", as_json)
    s.add_argument("--owner", default=None)
    s.add_argument("--all", action="store_true", help="include revoked keys")
    s = add(actions, "revoke", run(cmd_revoke), "revoke a key by id")
    s.add_argument("id")
