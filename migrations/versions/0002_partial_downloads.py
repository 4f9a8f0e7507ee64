"""Partial downloads: per-chunk progress and hashes of blobs being pulled (registry/pull.py).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "partial_downloads",
        sa.Column("digest", sa.String(71), primary_key=True),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("chunk_size", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "partial_chunks",
        sa.Column("digest", sa.String(71), sa.ForeignKey("partial_downloads.digest", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("idx", sa.Integer, primary_key=True),
        sa.Column("completed", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("partial_chunks")
    op.drop_table("partial_downloads")
