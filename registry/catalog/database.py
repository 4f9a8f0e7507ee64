"""Opening the catalog: SQLite in WAL mode, schema brought up to date by Alembic."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from berth import migrations
from berth.registry.errors import SchemaTooNew

if TYPE_CHECKING:
    from alembic.config import Config

CATALOG_FILE = "catalog.db"


def alembic_config(url: str) -> "Config":
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", url)
    return config


def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def open_engine(root: Path) -> Engine:
    root.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{root / CATALOG_FILE}"
    engine = create_engine(url, connect_args={"check_same_thread": False})
    event.listen(engine, "connect", _on_connect)
    return engine


def upgrade(engine: Engine) -> None:
    """Apply pending migrations; refuse a catalog written by a newer Berth (never downgrade)."""
    if _current_revisions(engine) == [migrations.HEAD]:
        return  # up to date: no need to load Alembic (a tenth of a second at every start)
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    config = alembic_config(str(engine.url))
    script = ScriptDirectory.from_config(config)
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_heads()
    known = {rev.revision for rev in script.walk_revisions()}
    unknown = [rev for rev in current if rev not in known]
    if unknown:
        raise SchemaTooNew(
            f"the catalog at {engine.url.database} has schema revision {', '.join(unknown)}, which this "
            "version of Berth does not know; it was written by a newer Berth. Upgrade Berth, or point "
            "BERTH_MODELS elsewhere. Nothing was changed."
        )
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def _current_revisions(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        exists = connection.execute(
            text("SELECT name FROM sqlite_master WHERE type='table' AND name='alembic_version'")).first()
        if not exists:
            return []
        return [row[0] for row in connection.execute(text("SELECT version_num FROM alembic_version"))]


class ChangeCounter:
    """A number that changes whenever the catalog is committed to, by this process or another.

    It is SQLite's `data_version` read on a connection of its own that never writes (the pragma
    counts commits made on *other* connections): one cheap call, so readers can keep what they
    derived from the catalog until it changes, without asking who wrote."""

    def __init__(self, root: Path) -> None:
        self._conn = sqlite3.connect(root / CATALOG_FILE, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()

    def value(self) -> int:
        with self._lock:
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
