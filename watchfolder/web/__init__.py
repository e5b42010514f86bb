"""The HTTP face: the REST API, the seed-compatible routes, metrics and the dashboard, served by waitress."""
