"""Alembic migrations of the catalog.

`HEAD` names the newest revision so that start-up can skip loading Alembic when the catalog is
already current; tests/registry/test_library.py checks it against Alembic's own view.
"""

HEAD = "0004"
