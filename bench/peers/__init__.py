"""Same-run peers of Taskbox: pgqueuer, Celery and procrastinate under the same workloads.

Two sides, two virtual environments. ``suite`` and ``cpu`` run in Taskbox's venv, inside
``python -m bench``: they create each peer's database and queue names, start the peer's
processes, sample CPU and compute the figures. ``kit`` and the ``*_peer`` modules run in
``.venv-peers`` (bench/peers/requirements.txt) as subprocesses, so the peers' dependencies
never meet Taskbox's locked ones; they import only the standard library, their peer and
each other, never ``taskbox``.
"""
