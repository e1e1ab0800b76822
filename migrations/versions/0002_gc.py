"""gc: blob claims and orphans (safe sweeps), jobs.delete_requested (DELETE of an active job), jobs.resends

Revision ID: gc
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'gc'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('blob_claims',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('key', sa.String(length=128), nullable=False),
    sa.Column('purpose', sa.String(length=8), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_blob_claims'))
    )
    with op.batch_alter_table('blob_claims', schema=None) as batch_op:
        batch_op.create_index('ix_blob_claims_key', ['key'], unique=False)
    op.create_table('blob_orphans',
    sa.Column('key', sa.String(length=128), nullable=False),
    sa.Column('since', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_blob_orphans'))
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('delete_requested', sa.Boolean(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('resends', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('resends')
        batch_op.drop_column('delete_requested')
    op.drop_table('blob_orphans')
    with op.batch_alter_table('blob_claims', schema=None) as batch_op:
        batch_op.drop_index('ix_blob_claims_key')
    op.drop_table('blob_claims')
