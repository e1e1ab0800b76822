"""Alembic migrations; ``upgrade``/``downgrade`` run them programmatically (``modelpress migrate``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

ROOT = Path(__file__).resolve().parent


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config pointing at this package, for ``url`` or the configured database."""
    cfg = Config()
    cfg.set_main_option("script_location", str(ROOT))
    if url:
        cfg.set_main_option("sqlalchemy.url", url)
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Migrate the database to ``revision``."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    """Migrate the database down to ``revision``."""
    command.downgrade(alembic_config(url), revision)


def is_current(url: str | None = None) -> bool:
    """Whether the database (``url`` or the configured one) is already at the latest revision."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from models.db import get_engine, make_engine

    engine = make_engine(url) if url else get_engine()
    try:
        with engine.connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
    finally:
        if url:
            engine.dispose()
    return current == set(ScriptDirectory.from_config(alembic_config(url)).get_heads())


def ensure_current(url: str | None = None) -> bool:
    """Migrate the database to the latest revision when it is not there yet (a fresh home has no tables);
    True when it migrated. Server-side commands that touch the database before ``serve`` call this."""
    if is_current(url):
        return False
    upgrade(url)
    return True
