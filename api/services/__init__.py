"""The API's logic behind the routes: uploads, catalog, jobs, events, artifacts, passes, health, metrics."""
