#!/bin/bash
# Boot the lab (built by build.sh) under QEMU and run one job in its dom0.
#
#   bash tests/xenlab/run-job.sh DOM0_SCRIPT [-t TIMEOUT_S]
#
# DOM0_SCRIPT (e.g. tests/xenlab/jobs/suite.sh) runs in dom0 under sh, with cwd the project
# checkout (read-only, /mnt/remus) and REMUS_LAB_SRC / REMUS_LAB_OUT (this run's results
# directory, writable) in its environment, with the caller's REMUS_LAB_* and *_PARTS variables
# (plain values only).  Its output streams here as it runs and ends up in
# RESULTS_DIR/job.log next to the lab's own logs (RESULTS_DIR/lab-logs: guest consoles, dom0
# dmesg, xl dmesg; RESULTS_DIR/serial.log: Xen's and dom0's consoles).  The last line printed
# is "results: RESULTS_DIR"; the exit status is the job's (124: it timed out; 125: the lab did
# not come up or not build, see serial.log).
#
# QEMU runs with TCG (these hosts' KVM cannot run Xen), 2 vCPUs, 2 GiB (dom0 gets 1 GiB), a
# throw-away qcow2 overlay over the image, and no network.  Several runs may share one lab.
# run-two-hosts.sh boots two at once, each with XENLAB_SMP vCPUs (dom0 gets as many) and a
# virtio NIC on XENLAB_LINK (a QEMU socket netdev's options, e.g. connect=127.0.0.1:PORT: the
# two QEMUs' private link over the host's loopback), its MAC address XENLAB_MAC.
set -euo pipefail
. "$(dirname "$0")/common.sh"

job_args 1200 "$@"
for f in xen-shadow vmlinuz initrd.img rootfs.img; do
    [ -f "$OUT/$f" ] || { lab_log "$OUT/$f missing: run tests/xenlab/build.sh first"; exit 125; }
done
command -v qemu-system-x86_64 >/dev/null || { lab_log "qemu-system-x86_64 missing: run build.sh"; exit 125; }

mkdir -p "$RESULTS"
RUN=$(mktemp -d "$RESULTS/$(date +%Y%m%d-%H%M%S)-$(basename "$JOB" .sh)-XXXX")
ln -sfn "$RUN" "$RESULTS/latest"
cp "$JOB" "$RUN/job.sh"
# dom0 stops the job a minute before QEMU's own deadline, so its logs still get copied back.
JOB_TIMEOUT=$(( TIMEOUT_S > 180 ? TIMEOUT_S - 60 : TIMEOUT_S * 2 / 3 ))
echo "JOB_TIMEOUT=$JOB_TIMEOUT" > "$RUN/job.env"
# The job's knobs (REMUS_LAB_PAIRS, REMUS_LAB_FAILOVER_MORE, FAILOVER_PARTS, ...) reach dom0 too,
# when their values are plain words.
for name in $(compgen -e | grep -E '^(REMUS_LAB_[A-Z_]+|[A-Z]+_PARTS)$' | grep -v -x -e REMUS_LAB_SRC -e REMUS_LAB_OUT); do
    value=${!name}
    [[ $value =~ ^[A-Za-z0-9_.,:/\ -]*$ ]] || { lab_log "$name not passed to dom0: not a plain value"; continue; }
    echo "export $name='$value'" >> "$RUN/job.env"
done
qemu-img create -q -f qcow2 -b "$OUT/rootfs.img" -F raw "$RUN/overlay.qcow2"

SMP=${XENLAB_SMP:-2}
NIC=(-nic none)
[ -z "${XENLAB_LINK:-}" ] || NIC=(-netdev "socket,id=link,$XENLAB_LINK" -device "virtio-net-pci,netdev=link,mac=${XENLAB_MAC:-52:54:00:00:00:01}")
XEN_ARGS="dom0_mem=1024M,max:1024M dom0_max_vcpus=$SMP console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all"
DOM0_ARGS="root=/dev/vda rw console=hvc0 init=/sbin/remus-lab-init noresume quiet"
QEMU=(qemu-system-x86_64
    -accel tcg,thread=multi -cpu Haswell-noTSX,-pcid,-invpcid,-tsc-deadline,-x2apic
    -machine q35 -smp "$SMP" -m 2048
    -kernel "$OUT/xen-shadow" -append "$XEN_ARGS"
    -initrd "$OUT/vmlinuz $DOM0_ARGS,$OUT/initrd.img"
    -drive "file=$RUN/overlay.qcow2,format=qcow2,if=virtio,cache=unsafe"
    -virtfs "local,path=$CHECKOUT,mount_tag=remus,security_model=none,readonly=on,id=remus"
    -virtfs "local,path=$RUN,mount_tag=results,security_model=none,id=results"
    "${NIC[@]}" -display none -no-reboot -monitor none -serial "file:$RUN/serial.log")

exec 9>"$LAB_LOCK"
flock -s 9    # build.sh must not replace the images under a running lab
lab_log "booting the lab: job $JOB, timeout ${TIMEOUT_S}s, results in $RUN"
t0=$(date +%s)
touch "$RUN/job.log"
tail -n +1 -F "$RUN/job.log" 2>/dev/null 9>&- &   # not the lock: an orphaned tail must not hold it
TAIL=$!
set +e
timeout -k 10 "$TIMEOUT_S" "${QEMU[@]}" < /dev/null
qrc=$?
set -e
sleep 0.5; kill "$TAIL" 2>/dev/null; wait "$TAIL" 2>/dev/null || true
rm -f "$RUN/overlay.qcow2"
{ echo "qemu_rc=$qrc"; echo "host_wall_s=$(( $(date +%s) - t0 ))"; } >> "$RUN/dom0-times.txt"
if [ -f "$RUN/job.rc" ]; then
    rc=$(cat "$RUN/job.rc")
else
    lab_log "the job did not finish (qemu exit $qrc); last lines of the serial console:"
    tail -n 40 "$RUN/serial.log" >&2 || true
    rc=125
    [ "$qrc" = 124 ] && rc=124
fi
lab_log "lab run done in $(( $(date +%s) - t0 )) s, job exit status $rc"
echo "results: $RUN"
exit "$rc"
