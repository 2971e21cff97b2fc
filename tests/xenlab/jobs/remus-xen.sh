#!/bin/sh
# Lab job (runs in dom0): remus against the lab's running PV guest, then xl remus beside it.
#
#   remus_build           the project and its cffi binding build in dom0
#   xen_binding           the binding loads and can talk to Xen
#   domu_up               the PV guest runs and its console counter ticks
#   remus_unknown_domain  a name no domain has: one line on stderr, exit 1
#   remus_by_name         remus --blackhole -i 100 domu for REMUS_LAB_RUN_S (30) s, then SIGINT:
#                         exit 0, checkpoints reported, guest running (r/b), counter advancing
#   remus_by_domid        the same with the numeric domain id
#   xl_remus_ratio        xl remus -F -n -b -i 100 domu for as long: checkpoint rates of both
#                         and their ratio (a measurement, not a timed assertion)
. "$REMUS_LAB_SRC/tests/xenlab/dom0-lib.sh"
RUN_S=${REMUS_LAB_RUN_S:-30}
OUTD=$REMUS_LAB_OUT

section "build remus and its Xen binding in dom0"
lab_install_remus
check remus_build $? "$(ls $LAB_BUILD/remus/xen/ 2>/dev/null | grep '^_xenlib.*\.so$')"
if ! python3 -c 'from remus.xen import lib; lib.load()' > $OUTD/binding.log 2>&1; then
    result xen_binding FAIL "$(tail -1 $OUTD/binding.log)"
    exit 1
fi
result xen_binding PASS "remus.xen.lib.load() works in dom0 as root"

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

# rate FILE: "checkpoints seconds rate mean_pause_ms" from a --stats-json file
rate() {
    python3 - "$1" <<'EOF'
import json, sys
n, duration, pause = 0, 0.0, 0.0
try:
    for line in open(sys.argv[1]):
        event = json.loads(line)
        if event["event"] == "checkpoint":
            n += 1
        elif event["event"] == "summary":
            duration, pause = event["duration_s"], event["mean_pause_ms"]
except (OSError, ValueError, KeyError):
    pass
print(n, round(duration, 1), round(n / duration, 2) if duration else 0, round(pause, 1))
EOF
}

# protect NAME TARGET: remus on TARGET for RUN_S seconds, SIGINT, then check the guest.
protect() {
    name=$1 target=$2 stats=$OUTD/$1.stats.jsonl
    section "remus --blackhole -i 100 $target for ${RUN_S}s, then SIGINT"
    rm -f "$stats"
    timeout -k 30 --preserve-status -s INT "$RUN_S" \
        python3 $LAB_BUILD/bin/remus --blackhole -i 100 --stats-json "$stats" "$target" \
        > $OUTD/$name.log 2>&1
    rc=$?
    cat $OUTD/$name.log
    state=$(domu_state)
    c1=$(domu_counter); sleep 4; c2=$(domu_counter)
    set -- $(rate "$stats")
    n=$1 secs=$2 per_s=$3 pause=$4
    eval "${name}_rate=$per_s ${name}_n=$n ${name}_secs=$secs"
    ok=0
    [ "$rc" = 0 ] || ok=1
    [ "$n" -ge 10 ] || ok=1
    running_state "$state" || ok=1
    [ -n "$c1" ] && [ -n "$c2" ] && [ "$c2" -gt "$c1" ] || ok=1
    check "$name" $ok "exit $rc; $n checkpoints in ${secs}s ($per_s/s, mean pause ${pause} ms);" \
        "after SIGINT: state $state, counter $c1 -> $c2 four seconds later"
}

protect remus_by_name domu
protect remus_by_domid "$DOMID"

section "xl remus -F -n -b -i 100 domu for ${RUN_S}s (the peer, for comparison)"
watch_log=$OUTD/xl-remus-suspends.log
# Count the guest's suspends from xenstore: @releaseDomain fires once per suspend.
xenstore-watch @releaseDomain > $watch_log 2>&1 &
WATCH=$!
t0=$(uptime_s)
timeout -k 30 --preserve-status -s INT "$RUN_S" xl -vvv remus -F -n -b -i 100 domu blackhole \
    > $OUTD/xl-remus.log 2>&1
rc=$?
t1=$(uptime_s)
sleep 1; kill $WATCH 2>/dev/null
xl_secs=$(python3 -c "print(round($t1 - $t0, 1))")
xl_n=$(grep -c 'Checkpointed save' $OUTD/xl-remus.log)
xl_fires=$(($(grep -c . $watch_log) - 1))
grep -v -e '^xc: detail' -e 'libxl: debug' -e xencall $OUTD/xl-remus.log | tail -15
state=$(domu_state)
echo "xl remus exit $rc; 'Checkpointed save' lines: $xl_n; @releaseDomain fires: $xl_fires; state $state"
if [ "$xl_n" -gt 0 ]; then
    xl_rate=$(python3 -c "print(round($xl_n / $xl_secs, 2))")
    ratio=$(python3 -c "print(round($remus_by_name_rate / $xl_rate, 2))")
    result xl_remus_ratio PASS "remus $remus_by_name_n checkpoints in ${remus_by_name_secs}s" \
        "($remus_by_name_rate/s), xl remus $xl_n in ${xl_secs}s ($xl_rate/s): ratio remus/xl = $ratio;" \
        "guest after xl remus: $state"
else
    result xl_remus_ratio SKIP "xl remus made no checkpoint (exit $rc, see xl-remus.log);" \
        "remus alone: $remus_by_name_rate/s"
fi
exit $FAILS
