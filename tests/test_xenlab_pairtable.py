"""The lab campaigns' table of pairs (``tests/xenlab/pairtable.py``), on tables written here."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "xenlab"))
import pairtable  # noqa: E402  (a lab script, not a package)

HEAD = "pair\torder\tremus_unpaused\tremus_next_line\tloss_seen\txl_remus_unpaused\txl_remus_next_line\n"


def test_ratios_only_where_both_sides_measured_and_by_order(tmp_path: Path) -> None:
    table = tmp_path / "pairs.tsv"
    table.write_text(HEAD
                     + "1\tremus_first\t1.0\t2.0\t0.2\t0.5\t4.0\n"
                     + "2\txl_first\t3.0\t2.5\tnan\tnan\tnan\n"      # xl remus's standby failed: missing
                     + "3\tremus_first\t2.0\tnan\t0.4\t1.0\t1.0\n")
    said = pairtable.summary(str(table)).splitlines()
    assert said[0].split() == HEAD.split()
    assert len(said[1:4]) == 3 and said[2].split()[-1] == "nan"
    assert ("unpaused: remus median 2.00 s (3 runs), xl remus median 0.75 s (2 runs); "
            "ratio per pair 2.00 2.00, median 2.00") in said
    assert ("next line: remus median 2.25 s (2 runs), xl remus median 2.50 s (2 runs); "
            "ratio per pair 0.50, median 0.50") in said
    assert "unpaused, remus_first: ratio per pair 2.00 2.00, median 2.00" in said
    assert "unpaused, xl_first: ratio per pair none, median nan" in said
    assert "loss_seen: 0.20 to 0.40 s, median 0.30" in said


def test_one_order_gets_no_split_by_order(tmp_path: Path) -> None:
    table = tmp_path / "pairs.tsv"
    table.write_text(HEAD + "1\tremus_first\t1.5\t2.0\tnan\t1.0\t1.0\n")
    said = pairtable.summary(str(table))
    assert "ratio per pair 1.50, median 1.50" in said
    assert "remus_first:" not in said
    assert "loss_seen: none" in said
