"""Write a 6-topic question-classification CSV from the packaged chatterbot corpus.

The corpus a new user's first run is measured on (issue 17): no default was tuned on it before it was measured.
Each conversation's first two lines are the text, its topic file the label (4,200 rows; about 28% the largest class).

    python benchmarks/defaults/topics_csv.py topics.csv
"""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import yaml

TOPICS = ("tech_support", "trivia", "coding", "ai", "psychology", "emotion")


def chatterbot_topics(path: Path) -> Path:
    """Write the CSV (columns ``text``, ``label``) to ``path`` and return it."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("chatterbot_corpus is not installed (it comes with `make setup`)")
    root = Path(spec.submodule_search_locations[0]) / "data" / "english"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for topic in TOPICS:
            for conversation in yaml.safe_load((root / f"{topic}.yml").read_text(encoding="utf-8"))["conversations"]:
                writer.writerow([" ".join(str(line) for line in conversation[:2]), topic])
    return path


if __name__ == "__main__":
    print(chatterbot_topics(Path(sys.argv[1] if len(sys.argv) > 1 else "topics.csv")))
