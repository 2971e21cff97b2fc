#!/bin/sh
# Lab job (runs in dom0): remus against the lab's running PV guest, then xl remus beside it.
#
#   remus_build           the project and its cffi binding build in dom0
#   xen_binding           the binding loads and can talk to Xen
#   domu_up               the PV guest runs and its console counter ticks
#   remus_unknown_domain  a name no domain has: one line on stderr, exit 1
#   remus_by_name         remus --blackhole -i 100 domu until its first checkpoint (the live copy
#                         of the whole guest), REMUS_LAB_RUN_S (30) s more, then SIGINT: exit 0,
#                         checkpoints reported, guest running (r/b), its counter advancing
#   remus_by_domid        the same with the numeric domain id
#   xl_remus_ratio        xl remus -F -n -b -i 100 domu measured the same way: checkpoint rates
#                         of both and their ratio (a measurement, not a timed assertion)
. "$REMUS_LAB_SRC/tests/xenlab/dom0-lib.sh"
RUN_S=${REMUS_LAB_RUN_S:-30}
FIRST_TIMEOUT=${REMUS_LAB_FIRST_TIMEOUT:-600}
OUTD=$REMUS_LAB_OUT

section "build remus and its Xen binding in dom0"
lab_install_remus
check remus_build $? "$(ls $LAB_BUILD/remus/xen/ 2>/dev/null | grep '^_xenlib.*\.so$')"
if ! python3 -c 'from remus.xen import lib; lib.load()' > $OUTD/binding.log 2>&1; then
    result xen_binding FAIL "$(tail -1 $OUTD/binding.log)"
    exit 1
fi
result xen_binding PASS "remus.xen.lib.load() works in dom0 as root"
python3 -c 'from remus.stream import compression as c; assert c.NATIVE and c.PageCompressor().native' \
    > $OUTD/codec.log 2>&1
check codec_c_helper $? "remus.stream._pages built in dom0 and the codec's default (no numpy here)"

section "the lab's PV guest"
lab_domu_up
check domu_up $? "domu id $(xl domid domu 2>/dev/null), counter $(domu_counter), state $(domu_state)"
DOMID=$(xl domid domu) || exit 1
xl list

section "an unknown domain"
remus --blackhole nosuchdomain > $OUTD/unknown.out 2> $OUTD/unknown.err
rc=$?
cat $OUTD/unknown.err
lines=$(grep -c . $OUTD/unknown.err)
[ $rc = 1 ] && [ "$lines" = 1 ] && [ ! -s $OUTD/unknown.out ]
check remus_unknown_domain $? "exit $rc, $lines line(s) on stderr: $(head -1 $OUTD/unknown.err)"

# Both tools first copy the whole guest while it runs (libxc's live precopy; slow under TCG),
# so each is measured over the same window: the RUN_S seconds after its first checkpoint.
# pauses FILE: the mean and largest suspend-to-resume pause after the first checkpoint
pauses() {
    python3 - "$1" <<'EOF'
import json, sys
p = [e["pause_ms"] for e in map(json.loads, open(sys.argv[1])) if e.get("event") == "checkpoint"][1:]
print(f"pause mean {sum(p) / len(p):.0f} ms, max {max(p):.0f} ms" if p else "no pause measured")
EOF
}

# run_and_measure NAME PATTERN CMD...: start CMD (its output in $OUTD/NAME.log), wait for its first
# checkpoint (a PATTERN line in FILE=$measure_file), count them for RUN_S seconds, SIGINT it, wait.
# Sets rc, first_s (seconds to the first checkpoint), n (checkpoints in the window), secs.
run_and_measure() {
    name=$1 pattern=$2; shift 2
    # Background jobs of a non-interactive sh ignore SIGINT: give the command the default back.
    env --default-signal=INT "$@" > $OUTD/$name.log 2>&1 &
    pid=$!
    t_start=$(uptime_s) first_s=none n=0 secs=0
    i=0
    while [ $i -lt "$FIRST_TIMEOUT" ] && kill -0 $pid 2>/dev/null; do
        [ "$(count_lines "$measure_file" "$pattern")" -ge 1 ] && break
        sleep 1; i=$((i + 1))
    done
    if [ "$(count_lines "$measure_file" "$pattern")" -ge 1 ]; then
        t0=$(uptime_s); n0=$(count_lines "$measure_file" "$pattern")
        first_s=$(python3 -c "print(round($t0 - $t_start, 1))")
        sleep "$RUN_S"
        t1=$(uptime_s); n1=$(count_lines "$measure_file" "$pattern")
        n=$((n1 - n0)) secs=$(python3 -c "print(round($t1 - $t0, 1))")
    fi
    kill -INT $pid 2>/dev/null
    ( sleep 60; kill -KILL $pid 2>/dev/null ) &
    watchdog=$!
    wait $pid
    rc=$?
    kill $watchdog 2>/dev/null
}

# protect NAME TARGET: remus on TARGET, measured as above, then check the guest after SIGINT.
protect() {
    name=$1 target=$2
    measure_file=$OUTD/$name.stats.jsonl
    section "remus --blackhole -i 100 $target: first checkpoint, ${RUN_S}s more, then SIGINT"
    rm -f "$measure_file"
    run_and_measure "$name" '"event": "checkpoint"' \
        python3 $LAB_BUILD/bin/remus --blackhole -i 100 --stats-json "$measure_file" "$target"
    cat $OUTD/$name.log
    state=$(domu_state)
    guest_runs; runs=$?
    c1=$(domu_counter); sleep 4; c2=$(domu_counter)
    per_s=$(python3 -c "print(round($n / $secs, 2) if $secs else 0)")
    eval "${name}_rate=$per_s ${name}_n=$n ${name}_secs=$secs"
    ok=0
    [ "$rc" = 0 ] || ok=1
    [ "$n" -ge 5 ] || ok=1
    [ $runs = 0 ] || ok=1
    [ -n "$c1" ] && [ -n "$c2" ] && [ "$c2" -gt "$c1" ] || ok=1
    check "$name" $ok "exit $rc; first checkpoint after ${first_s}s, then $n in ${secs}s ($per_s/s," \
        "$(pauses "$measure_file"));" \
        "after SIGINT: state $state, counter $c1 -> $c2 four seconds later"
}

protect remus_by_name domu
protect remus_by_domid "$DOMID"

section "xl remus -F -n -b -i 100 domu, measured the same way (the peer, for comparison)"
measure_file=$OUTD/xl-remus.log
run_and_measure xl-remus 'Checkpointed save' xl -vvv remus -F -n -b -i 100 domu blackhole
grep -v -e '^xc: detail' -e 'libxl: debug' -e xencall $OUTD/xl-remus.log | tail -8
state=$(domu_state)
echo "xl remus exit $rc; first checkpoint after ${first_s}s, then $n in ${secs}s; guest state $state"
case $state in
    *s*)  # the peer's known flaw: a stop that lands while the guest is suspended leaves it so
        lab_resume "$DOMID" && state="$state (resumed by remus.xen)" ;;
esac
if [ "$n" -gt 0 ] && [ "${remus_by_name_n:-0}" -gt 0 ]; then
    xl_rate=$(python3 -c "print(round($n / $secs, 2))")
    ratio=$(python3 -c "print(round($remus_by_name_rate / $xl_rate, 2))")
    result xl_remus_ratio PASS "checkpoints/s over ${RUN_S}s after the first: remus $remus_by_name_rate" \
        "($remus_by_name_n), xl remus $xl_rate ($n): ratio remus/xl = $ratio; guest after xl remus: $state"
elif [ "${remus_by_name_n:-0}" -gt 0 ]; then
    result xl_remus_ratio SKIP "xl remus made no checkpoint (exit $rc, see xl-remus.log);" \
        "remus alone: $remus_by_name_rate/s"
else
    result xl_remus_ratio FAIL "remus made no checkpoint to compare"
fi
exit $FAILS
