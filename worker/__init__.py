"""The worker: Celery app, job runner, pipeline and optimization passes (torch imported lazily)."""
