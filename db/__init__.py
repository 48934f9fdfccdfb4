"""Taskbox data layer: table definitions, the task state machine, queries and the pool.

Every SQL statement on the hot path is written once here and called from the api,
relay and consumer packages, which never talk to each other directly.
"""
