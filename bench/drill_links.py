"""
What ``generate_drill_links=false`` saves: the bytes of a Look's ``json_detail`` result with Looker's default
drill links in every cell, and without them, as the Looker stand-in sends them over HTTP.

The provider asks for results without drill links (per-cell URLs it never reads). ``make bench`` measures both
bodies for Look 1 (10 rows) and a generated Look (``--drill-rows``, default 10,000 rows: the bytes grow
linearly with the rows) and reports them in a section of ``bench/RESULTS.md``. Byte counts are exact and do
not depend on the machine.

By hand, against a stand-in of its own (a few seconds)::

    .venv/bin/python bench/drill_links.py [--rows 10000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import requests

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(1, str(BENCH_DIR.parent / "tests"))  # the stand-ins (tests/standins)

from report_format import num, table  # noqa: E402

#: Rows of the generated Look measured by default.
DEFAULT_ROWS = 10_000
#: The stand-in's generated Looks: Look ``GENERATED_LOOK_BASE + N`` has N rows.
GENERATED_LOOK_BASE = 1_000_000
CLIENT_ID, CLIENT_SECRET = "looker-demo-id", "looker-demo-secret"


def _body_bytes(session: requests.Session, url: str, links: bool) -> int:
    """Bytes of a run's body (streamed, not kept), with or without drill links."""
    params = {
        "limit": "-1",
        "apply_formatting": "false",
        "apply_vis": "false",
        "cache": "true",
        "generate_drill_links": "true" if links else "false",
    }
    with session.get(url, params=params, stream=True, timeout=600) as response:
        response.raise_for_status()
        return sum(len(chunk) for chunk in response.iter_content(1 << 16))


def measure(base_url: str, rows: int = DEFAULT_ROWS) -> list[dict[str, Any]]:
    """
    The ``json_detail`` bodies of Look 1 and of a generated Look of ``rows`` rows, with and without drill
    links.

    :param base_url: the Looker stand-in's URL.
    :param rows: rows of the generated Look.
    :return: per Look: ``look_id``, ``rows``, ``with_links`` and ``without_links`` (bytes).
    """
    with requests.Session() as session:
        credentials = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
        login = session.post(f"{base_url}/api/4.0/login", data=credentials, timeout=30)
        login.raise_for_status()
        session.headers["Authorization"] = f"token {login.json()['access_token']}"
        figures = []
        for look_id, count in (("1", 10), (str(GENERATED_LOOK_BASE + rows), rows)):
            url = f"{base_url}/api/4.0/looks/{look_id}/run/json_detail"
            figures.append(
                {
                    "look_id": look_id,
                    "rows": count,
                    "with_links": _body_bytes(session, url, links=True),
                    "without_links": _body_bytes(session, url, links=False),
                }
            )
        session.delete(f"{base_url}/api/4.0/logout", timeout=30)
    return figures


def lines(figures: list[dict[str, Any]]) -> list[str]:
    """The report's section on drill links (nothing when they were not measured)."""
    if not figures:
        return []
    header = ["Look", "rows", "with drill links (Looker's default)", "generate_drill_links=false", "saved"]
    rows = [
        [
            figure["look_id"],
            f"{figure['rows']:,}",
            f"{figure['with_links']:,} B",
            f"{figure['without_links']:,} B",
            f"{1 - figure['without_links'] / figure['with_links']:.0%} "
            f"({num((figure['with_links'] - figure['without_links']) / figure['rows'])} B per row)",
        ]
        for figure in figures
    ]
    return [
        "## Drill links: `generate_drill_links=false`",
        "",
        *table(header, rows),
        "",
        "The `json_detail` body of a run as the Looker stand-in sends it over HTTP, with the drill links "
        "Looker puts in every cell by default, and with `generate_drill_links=false`, which the provider "
        "sends on every run and query task (it never reads the links). Exact byte counts.",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    """Measure against a Looker stand-in of its own and print the section."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="rows of the generated Look (10000)")
    args = parser.parse_args(argv)
    from standins.looker_standin import LookerStandIn

    with LookerStandIn() as looker:
        print("\n".join(lines(measure(looker.base_url, args.rows))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
