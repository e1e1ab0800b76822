"""HTTP routes, one module per resource; each parses the request, calls a service, returns a schema."""
