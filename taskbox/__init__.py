"""Taskbox for its users: the one import root a program needs to talk to a Taskbox.

``taskbox.client`` holds the typed HTTP client of the task API (``Client``,
``AsyncClient``). It depends on ``httpx`` and ``pydantic`` only, never on the server's
packages (``api``, ``db``, ...), so a program that only submits tasks installs no server.
"""
