"""The first catalog: blobs, manifests, layers, tags.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("digest", sa.String(71), primary_key=True),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("model_info", sa.Text, nullable=True),
    )
    op.create_table(
        "manifests",
        sa.Column("digest", sa.String(71), primary_key=True),
        sa.Column("media_type", sa.String(255), nullable=False),
        sa.Column("raw", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "layers",
        sa.Column("manifest_digest", sa.String(71), sa.ForeignKey("manifests.digest", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("blob_digest", sa.String(71), sa.ForeignKey("blobs.digest"), nullable=False),
        sa.Column("media_type", sa.String(255), nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
    )
    op.create_index("ix_layers_blob_digest", "layers", ["blob_digest"])
    op.create_table(
        "tags",
        sa.Column("name_key", sa.String(600), primary_key=True),
        sa.Column("host", sa.String(350), nullable=False),
        sa.Column("namespace", sa.String(80), nullable=False),
        sa.Column("model", sa.String(80), nullable=False),
        sa.Column("tag", sa.String(80), nullable=False),
        sa.Column("manifest_digest", sa.String(71), sa.ForeignKey("manifests.digest"), nullable=False),
        sa.Column("modified_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_tags_manifest_digest", "tags", ["manifest_digest"])


def downgrade() -> None:
    op.drop_table("tags")
    op.drop_table("layers")
    op.drop_table("manifests")
    op.drop_table("blobs")
