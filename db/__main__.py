"""``python -m db migrate``: create the database if needed and apply migrations."""

from __future__ import annotations

import argparse
import logging
import sys

from db.migrations import migrate
from db.settings import DatabaseSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m db", description=__doc__)
    parser.add_argument("command", choices=["migrate"], help="what to do")
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = DatabaseSettings()
    try:
        migrate(settings)
    except OSError as exc:
        print(f"cannot reach Postgres at DATABASE_URL: {exc}", file=sys.stderr)
        return 2
    print("database is at the latest migration")
    return 0


if __name__ == "__main__":
    sys.exit(main())
