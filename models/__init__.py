"""The data model: tables, the job-spec schema, settings and the DB session (no heavy imports)."""
