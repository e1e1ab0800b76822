"""workers: each worker's advertisement (queues, memory, GPU, heartbeat)

Revision ID: workers
Revises: search
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'workers'
down_revision: str | None = 'search'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('workers',
    sa.Column('id', sa.String(length=255), nullable=False),
    sa.Column('hostname', sa.String(length=255), nullable=False),
    sa.Column('queues', sa.JSON(), nullable=False),
    sa.Column('memory_total', sa.BigInteger(), nullable=False),
    sa.Column('memory_free', sa.BigInteger(), nullable=False),
    sa.Column('gpu_name', sa.String(length=255), nullable=True),
    sa.Column('gpu_count', sa.Integer(), nullable=False),
    sa.Column('gpu_memory', sa.BigInteger(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_workers'))
    )
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_workers_heartbeat_at'), ['heartbeat_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_workers_heartbeat_at'))
    op.drop_table('workers')
