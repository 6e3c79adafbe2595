"""`python -m ragtune.controlplane migrate`: brings the control-plane schema to the newest revision
(the Kubernetes init container runs this; safe to run from many pods at once)."""

from __future__ import annotations

import argparse
import logging
import sys

from ragtune.controlplane.database import Database, DatabaseUnavailable
from ragtune.settings import ServiceSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ragtune.controlplane")
    sub = parser.add_subparsers(dest="command", required=True)
    migrate = sub.add_parser("migrate", help="upgrade the schema in RAGTUNE_DATABASE_URL to the newest revision")
    migrate.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the database (default 120)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        database = Database.from_settings(ServiceSettings())
        revision = database.migrate(wait_s=args.wait)
    except (ValueError, DatabaseUnavailable) as error:
        print(f"migrate: {error}", file=sys.stderr)
        return 2
    print(f"control-plane schema at revision {revision} ({database.display_url})")
    database.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
