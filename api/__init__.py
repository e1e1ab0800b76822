"""The modelpress HTTP API (FastAPI): thin routes, services, problem+json errors. Never imports torch."""
