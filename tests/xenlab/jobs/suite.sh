#!/bin/sh
# Lab job (runs in dom0): every other job in this directory, in name order, in one boot.
# Each job's output is passed through as it runs (RESULT lines included) and kept in
# job-<name>.log; a job that exits non-zero without printing a FAIL line gets one.
# Exit status: 1 if anything failed.
. "$REMUS_LAB_SRC/tests/xenlab/dom0-lib.sh"
JOBS=$REMUS_LAB_SRC/tests/xenlab/jobs
SUITE_FAILS=0
for job in "$JOBS"/*.sh; do
    name=$(basename "$job" .sh)
    [ "$name" = suite ] && continue
    section "job $name"
    log=$REMUS_LAB_OUT/job-$name.log
    { sh "$job"; echo $? > "$log.rc"; } 2>&1 | tee "$log"
    rc=$(cat "$log.rc"); rm -f "$log.rc"
    fails=$(grep -c '^RESULT [^ ]* FAIL' "$log")
    if [ "$rc" != 0 ] && [ "$fails" = 0 ]; then
        result "job:$name" FAIL "exited $rc without a FAIL result (see job-$name.log)"
        fails=1
    fi
    SUITE_FAILS=$((SUITE_FAILS + fails))
    echo "job $name: exit $rc, $fails failed"
done
section "suite done"
[ "$SUITE_FAILS" = 0 ]
