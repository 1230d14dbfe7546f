"""A report cell of the converge sweep run again with one setting changed (a diagnosis, not a cell of the sweep).

    PYTHONPATH=src python benchmarks/results/converge/diagnostics/run_variant.py SUMMARY_JSON OUT_DIR KEY=VALUE...

SUMMARY_JSON: a finished run's summary.json (its recorded config is the cell's); each KEY=VALUE sets one config key
(section.key, the value parsed as JSON), e.g. federation.scaffold=false.
"""

from __future__ import annotations

import json
import sys

from fedcustom.config import build_config
from fedcustom.launch import run


def main(summary: str, out: str, *changes: str) -> None:
    values = json.load(open(summary))["config"]
    for change in changes:
        key, _, raw = change.partition("=")
        section, name = key.split(".", 1)
        values[section][name] = json.loads(raw)
    values["output"].update(dir=out, quiet=True)
    run(build_config({k: v for k, v in values.items() if isinstance(v, dict)}))


if __name__ == "__main__":
    main(*sys.argv[1:])
