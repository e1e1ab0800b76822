"""search trials: jobs.parent_id

Revision ID: search
Revises: cache
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'search'
down_revision: str | None = 'cache'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('parent_id', sa.String(length=40), nullable=True))
        batch_op.create_foreign_key(batch_op.f('fk_jobs_parent_id_jobs'), 'jobs', ['parent_id'], ['id'])
        batch_op.create_index(batch_op.f('ix_jobs_parent_id'), ['parent_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_parent_id'))
        batch_op.drop_constraint(batch_op.f('fk_jobs_parent_id_jobs'), type_='foreignkey')
        batch_op.drop_column('parent_id')
