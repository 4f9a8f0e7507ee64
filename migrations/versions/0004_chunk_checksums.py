"""Partial downloads: a chunk's check is a named checksum ("crc32:<8hex>"), no longer a bare sha256.

A chunk's check only has to catch bytes that changed on disk between two runs of a pull; the blob's
own sha256 (computed once, in order) is what proves the bytes. Rows written before this revision
keep their value, prefixed "sha256:", and are still checked as sha256.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("partial_chunks") as batch:
        batch.alter_column("sha256", new_column_name="checksum", type_=sa.String(80), existing_nullable=True)
    op.execute("UPDATE partial_chunks SET checksum = 'sha256:' || checksum WHERE checksum IS NOT NULL")


def downgrade() -> None:
    # Only sha256 checks can go back; a crc32 check is dropped, so that chunk is re-read and re-fetched.
    op.execute("UPDATE partial_chunks SET checksum = CASE WHEN checksum LIKE 'sha256:%' "
               "THEN substr(checksum, 8) ELSE NULL END")
    with op.batch_alter_table("partial_chunks") as batch:
        batch.alter_column("checksum", new_column_name="sha256", type_=sa.String(64), existing_nullable=True)
