"""The REST API: accepts tasks and reports on them. It talks to Postgres only."""
