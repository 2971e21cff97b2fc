#!/bin/sh
# Lab campaign (runs in dom0; not in the suite): the failover of jobs/failover-xen.sh and the same
# failover by `xl remus`, REMUS_LAB_PAIRS times (default 4) in one boot, then a table of every
# pair and the medians.  One pair's ratio is noise-prone in the emulated dom0 (xl's own
# completion alone varies by half a second); this gives several, measured the same way.
#
#   bash tests/xenlab/run-job.sh tests/xenlab/campaigns/failover-pairs.sh -t 3600
#
# Each pair is one run of failover-xen.sh with FAILOVER_PARTS="failover peer" (its log kept as
# pair-N.log, its primary's smaps summary as pair-N-primary-smaps.txt).  A pair whose `xl remus`
# part did not complete counts as missing, not as a win.  Prints RESULT failover_pairs PASS when
# every remus failover passed (the ratios are measurements, not assertions).
# REMUS_LAB_ORDER=alternate: even pairs run `xl remus` first (REMUS_LAB_XL_FIRST=1), so that each
# side runs first on a fresh guest as often as the other; the table's "order" column says which.
. "$REMUS_LAB_SRC/tests/xenlab/dom0-lib.sh"
PAIRS=${REMUS_LAB_PAIRS:-4}
OUTD=$REMUS_LAB_OUT
TABLE=$OUTD/failover-pairs.tsv
printf 'pair\torder\tremus_unpaused\tremus_next_line\tprimary_exit\tloss_seen\txl_completion\txl_remus_unpaused\txl_remus_next_line\txl_primary_exit\n' > $TABLE
failed=0
i=1
while [ $i -le "$PAIRS" ]; do
    section "pair $i of $PAIRS"
    xl_first=0
    [ "${REMUS_LAB_ORDER:-}" = alternate ] && [ $((i % 2)) = 0 ] && xl_first=1
    FAILOVER_PARTS="failover peer" REMUS_LAB_XL_FIRST=$xl_first \
        sh "$REMUS_LAB_SRC/tests/xenlab/jobs/failover-xen.sh" 2>&1 |
        tee $OUTD/pair-$i.log
    cp $OUTD/failover-primary-smaps.txt $OUTD/pair-$i-primary-smaps.txt 2>/dev/null
    grep -q '^RESULT failover_xen PASS' $OUTD/pair-$i.log || failed=$((failed + 1))
    python3 - "$i" $OUTD/pair-$i.log $xl_first >> $TABLE <<'EOF'
import re, sys
pair, text = sys.argv[1], open(sys.argv[2]).read()
order = "xl_first" if sys.argv[3] == "1" else "remus_first"
def find(pattern, line):
    m = re.search(pattern, line or "")
    return m.group(1) if m else "nan"
ours = next((l for l in text.splitlines() if l.startswith("RESULT failover_xen ")), "")
peer = next((l for l in text.splitlines() if l.startswith("RESULT xl_remus_failover PASS")), "")
print("\t".join([pair, order,
    find(r"SIGKILL to unpaused \(xl's exit\) ([\d.na]+)s", ours),
    find(r"to the guest's next line ([\d.na]+)s", ours),
    find(r"exited ([\d.na]+)s after the SIGKILL", ours),
    find(r"loss seen ([\d.na-]+)s", ours),
    find(r", xl ([\d.na]+)s", ours),
    find(r"SIGKILL to unpaused \(xl's exit\) ([\d.na]+)s", peer),
    find(r"to the guest's next line ([\d.na]+)s", peer),
    find(r"the killed primary exited after ([\d.na]+)s", peer)]))
EOF
    i=$((i + 1))
done

section "failover pairs: remus against xl remus, SIGKILL to the standby's unpause and to the guest's next line"
python3 "$REMUS_LAB_SRC/tests/xenlab/pairtable.py" $TABLE
check failover_pairs $failed "$PAIRS pairs, $failed remus failover(s) failed; table in failover-pairs.tsv"
exit $FAILS
