"""job name and metadata

Revision ID: newuser
Revises: keys
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'newuser'
down_revision: str | None = 'keys'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('name', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('metadata', sa.JSON(), nullable=True))
        batch_op.create_index('ix_jobs_owner_name', ['owner', 'name'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_owner_name')
        batch_op.drop_column('metadata')
        batch_op.drop_column('name')
