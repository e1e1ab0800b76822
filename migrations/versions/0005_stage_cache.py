"""cache: the stage cache's index (stage_cache)

Revision ID: cache
Revises: newuser
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'cache'
# 'gc' is the one head on this branch (merged before it); chained anew at merge.
down_revision: str | None = 'newuser'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('stage_cache',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('owner', sa.String(length=64), nullable=False),
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('blob_key', sa.String(length=128), nullable=True),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('entry', sa.JSON(), nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_stage_cache')),
    sa.UniqueConstraint('owner', 'key', name=op.f('uq_stage_cache_owner_key'))
    )
    with op.batch_alter_table('stage_cache', schema=None) as batch_op:
        batch_op.create_index('ix_stage_cache_last_used_at', ['last_used_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_stage_cache_blob_key'), ['blob_key'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('stage_cache', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_stage_cache_blob_key'))
        batch_op.drop_index('ix_stage_cache_last_used_at')
    op.drop_table('stage_cache')
