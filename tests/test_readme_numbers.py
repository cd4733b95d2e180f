"""Numbers in the README come from the tables: every interval "[a, b]" and every "x of y seeds" that README.md
quotes appears, as written, in a committed results/*.md (the tables built from the run records)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

INTERVAL = re.compile(r"\[[-+−]?\d+(?:\.\d+)?%?, [-+−]?\d+(?:\.\d+)?%?\]")
SEEDS = re.compile(r"\b\d+ of \d+ seeds\b")


def quotes(text: str) -> list[str]:
    """The intervals and seed counts ``text`` quotes, a quote broken across lines joined again."""
    text = re.sub(r"\s+", " ", text)
    return INTERVAL.findall(text) + SEEDS.findall(text)


def committed_tables() -> str:
    """The results/*.md that git tracks (a table written but never added does not count)."""
    names = subprocess.run(["git", "ls-files", "results/*.md"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    assert names, "git lists no results/*.md"
    return "\n".join((ROOT / name).read_text() for name in names)


def test_the_quote_patterns_find_intervals_and_seed_counts():
    text = "bs +5.33 [+0.33, +11.00] (3 of 3 seeds), loss [-2.64,\n-0.50]; 84.0% [12%, 30%]; not [1] nor [a, b]"
    assert quotes(text) == ["[+0.33, +11.00]", "[-2.64, -0.50]", "[12%, 30%]", "3 of 3 seeds"]


def test_every_interval_and_seed_count_the_readme_quotes_is_in_a_committed_table():
    tables = committed_tables()
    missing = [q for q in dict.fromkeys(quotes((ROOT / "README.md").read_text())) if q not in tables]
    assert not missing, f"README.md quotes {len(missing)} numbers no committed results/*.md holds: {missing}"
