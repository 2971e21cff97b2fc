"""Lab helper (dom0): the table of a failover campaign's pairs, and its medians and ratios.

    python3 pairtable.py TSV

TSV has a header line and a row per pair: ``pair``, ``order`` (which side ran first), then
seconds, "nan" where a pair did not measure one.  Every column ``remus_X`` that has an
``xl_remus_X`` beside it is compared: both medians and remus/xl per pair (only where both
were measured; a pair whose `xl remus` part did not complete counts as missing, not as a win),
then the unpaused ratio by which side ran first when the orders differ.  Every other column
gets its range and median.  Prints only; never judges a ratio.
"""

from __future__ import annotations

import statistics
import sys


def summary(path: str) -> str:
    rows = [line.rstrip("\n").split("\t") for line in open(path, encoding="utf-8")]
    head, rows = rows[0], rows[1:]
    said = ["  ".join(f"{h:>18}" for h in head)]
    said += ["  ".join(f"{c:>18}" for c in row) for row in rows]

    def column(name: str) -> list[float]:
        k = head.index(name)
        return [float(r[k]) for r in rows if r[k] != "nan"]

    def med(name: str) -> tuple[float, int]:
        values = column(name)
        return (statistics.median(values), len(values)) if values else (float("nan"), 0)

    def ratios(ours: str, theirs: str, order: str | None = None) -> str:
        k, j, o = head.index(ours), head.index(theirs), head.index("order")
        values = [float(r[k]) / float(r[j]) for r in rows
                  if order in (None, r[o]) and "nan" not in (r[k], r[j]) and float(r[j]) > 0]
        return (f"ratio per pair {' '.join(f'{v:.2f}' for v in values) or 'none'}, "
                f"median {statistics.median(values) if values else float('nan'):.2f}")

    compared = [name[len("remus_"):] for name in head
                if name.startswith("remus_") and "xl_remus_" + name[len("remus_"):] in head]
    for what in compared:
        (m_ours, n_ours), (m_theirs, n_theirs) = med("remus_" + what), med("xl_remus_" + what)
        said.append(f"{what.replace('_', ' ')}: remus median {m_ours:.2f} s ({n_ours} runs), xl remus "
                    f"median {m_theirs:.2f} s ({n_theirs} runs); {ratios('remus_' + what, 'xl_remus_' + what)}")
    orders = sorted({r[head.index("order")] for r in rows})
    if len(orders) > 1 and "unpaused" in compared:
        for order in orders:
            said.append(f"unpaused, {order}: {ratios('remus_unpaused', 'xl_remus_unpaused', order)}")
    done = {"pair", "order"} | {side + what for what in compared for side in ("remus_", "xl_remus_")}
    for name in head:
        if name not in done:
            values = column(name)
            said.append(f"{name}: " + (f"{min(values):.2f} to {max(values):.2f} s, median "
                                       f"{statistics.median(values):.2f}" if values else "none"))
    return "\n".join(said)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(summary(sys.argv[1]))
