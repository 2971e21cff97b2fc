#!/bin/sh
# Lab job (runs in dom0, in the suite before failover-xen.sh, which brings the lab's domu back):
# disk replication of a PV guest whose data disk uses script=block-remus.
#
#   disk_setup     the nbd module, /etc/xen/scripts/block-remus, a guest "domd" (the lab's
#                  busybox initrd with dom0's xen-blkfront and ext4 modules and an init that
#                  mounts /dev/xvdb, writes its counter to /mnt/counter and syncs every 100 ms,
#                  printing "domd counter N"), its ext4 data image; xl create runs block-remus
#   disk_refused   a guest "domr" with a plain writable disk: remus refuses it, exit 1, in one
#                  line naming the disk and script=block-remus; remus --no-disk would take it
#   disk_failover  remus-receiver --disk-root (the replica on the same dom0), remus -i 200 domd;
#                  after REMUS_LAB_DISK_MORE (3) checkpoints beyond the first the primary dies
#                  (freeze, xl destroy, SIGKILL); the receiver restores domd onto the replica;
#                  its counter goes on above the value read before the last acknowledged
#                  checkpoint but one (as failover-xen.sh); then domd is destroyed, the replica's
#                  journal replayed on a copy, and fsck -n must find that copy clean, with
#                  /counter >= that value.
. "$REMUS_LAB_SRC/tests/xenlab/dom0-lib.sh"
OUTD=$REMUS_LAB_OUT
LAB=/var/lib/remus-lab
DATA=$LAB/domd-data.img
REPLICA_ROOT=$LAB/replica
REPLICA=$REPLICA_ROOT$DATA
DOMD_CFG=$LAB/domd.cfg
DOMD_CONSOLE=/var/log/xen/console/guest-domd.log
# The failed-over guest was the standby domd--incoming when xenconsoled opened its log.
STANDBY_CONSOLE=/var/log/xen/console/guest-domd--incoming.log
EVENTS=$OUTD/disk-events.jsonl
STATS=$OUTD/disk-stats.jsonl
MORE=${REMUS_LAB_DISK_MORE:-3}

domd_counter() { sed -n 's/.*domd counter \([0-9]*\).*/\1/p' $DOMD_CONSOLE 2>/dev/null | tail -1; }

build_domd() {
    # The lab's domu initrd, plus dom0's own modules for a block device and ext4 (the guest
    # runs dom0's kernel), plus an init that keeps a counter on the data disk.
    d=$(mktemp -d)
    (cd "$d" && gzip -dc $LAB/domu-initrd.gz | cpio -id --quiet) || return 1
    mkdir -p "$d/modules" "$d/mnt"
    : > "$d/modules/order"
    # -a: every name is a module (without it modprobe takes the later names as parameters of
    # the first); crc32c_generic: ext4's metadata checksums (a soft dependency).
    for m in $(modprobe -a --show-depends xen-blkfront ext4 crc32c_generic | awk '$1 == "insmod" {print $2}'); do
        base=$(basename "$m")
        case $base in
            *.xz) xz -dc "$m" > "$d/modules/${base%.xz}"; base=${base%.xz} ;;
            *.zst) zstd -qdc "$m" > "$d/modules/${base%.zst}"; base=${base%.zst} ;;
            *) cp "$m" "$d/modules/$base" ;;
        esac
        grep -qx "$base" "$d/modules/order" || echo "$base" >> "$d/modules/order"
    done
    cat > "$d/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
while read -r m; do insmod "/modules/$m" || echo "domd: insmod $m failed"; done < /modules/order
grep -q ext4 /proc/filesystems || echo "domd: no ext4 in /proc/filesystems"
i=0
while [ ! -b /dev/xvdb ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mount -t ext4 /dev/xvdb /mnt || { echo "domd: cannot mount /dev/xvdb"; ls -l /dev/xvd* /modules; }
n=$(cat /mnt/counter 2>/dev/null || echo 0)
echo "domd: up"
while :; do
    n=$((n + 1))
    echo "$n" > /mnt/counter
    sync
    echo "domd counter $n"
    sleep 0.1
done
INIT
    chmod 755 "$d/init"
    (cd "$d" && find . | cpio -o -H newc --quiet | gzip -1) > $LAB/domd-initrd.gz || return 1
    rm -rf "$d"
    rm -f "$DATA"; truncate -s 64M "$DATA" && mkfs.ext4 -q -F "$DATA" || return 1
    cat > $DOMD_CFG <<CFG
name = "domd"
type = "pv"
kernel = "$LAB/domu-vmlinuz"
ramdisk = "$LAB/domd-initrd.gz"
extra = "console=hvc0 quiet"
memory = 128
vcpus = 1
on_crash = "preserve"
disk = ['format=raw,vdev=xvdb,access=rw,script=block-remus,target=$DATA']
CFG
}

section "disk replication: nbd, block-remus, the guest domd with a data disk"
xl destroy domu 2>/dev/null  # memory for domd
lab_install_remus
ok=0
# remus and remus-receiver share the key in /etc/remus/authkey (their default)
[ -f /etc/remus/authkey ] || python3 $LAB_BUILD/bin/remus-keygen || ok=1
modprobe nbd || ok=1
install -m 755 $LAB_BUILD/contrib/hotplug/block-remus /etc/xen/scripts/block-remus || ok=1
build_domd || ok=1
rm -rf $REPLICA_ROOT $DOMD_CONSOLE $STANDBY_CONSOLE
[ $ok = 0 ] && lab_xl_create domd $DOMD_CFG || ok=1
counting() { [ "$(domd_counter)" ] && [ "$(domd_counter)" -ge "$1" ]; }
if [ $ok = 0 ]; then poll_until 180 counting 20 || ok=1; fi
DOMD_ID=$(xl domid domd 2>/dev/null)
# Without its data disk mounted the counter would live in the guest's RAM: nothing to replicate.
grep -q "domd: cannot mount" $DOMD_CONSOLE && { echo "domd could not mount its data disk"; ok=1; }
check disk_setup $ok "nbd module, block-remus installed, domd counter $(domd_counter)," \
    "backend $(xenstore-read "/local/domain/0/backend/vbd/$DOMD_ID/51728/physical-device-path" 2>/dev/null)"
[ $ok = 0 ] || { tail -20 $DOMD_CONSOLE; cat /run/remus/disk/*.log 2>/dev/null; exit 1; }

section "a writable disk that is not replicated is refused"
truncate -s 16M $LAB/domr.img
modprobe loop  # xl's own block script puts a plain file on a loop device
sed -e 's/^name = .*/name = "domr"/' -e 's/,script=block-remus//' -e "s#$DATA#$LAB/domr.img#" \
    $DOMD_CFG > $LAB/domr.cfg
lab_xl_create domr $LAB/domr.cfg -p
out=$(remus -i 200 domr 127.0.0.1 2>&1); rc=$?
xl destroy domr
lines=$(printf '%s\n' "$out" | grep -c '')
printf '%s\n' "$out"
ok=0
[ $rc = 1 ] && [ "$lines" = 1 ] || ok=1
printf '%s' "$out" | grep -q "writable disk xvdb ($LAB/domr.img) is not replicated: give it script=block-remus" || ok=1
check disk_refused $ok "exit $rc, $lines line(s): $out"

section "remus-receiver --disk-root $REPLICA_ROOT, remus -i 200 domd 127.0.0.1"
rm -f "$EVENTS" "$STATS"
python3 $LAB_BUILD/bin/remus-receiver --once --listen 127.0.0.1 --heartbeat-timeout 60000 \
    --disk-root $REPLICA_ROOT --events-json "$EVENTS" > $OUTD/disk-receiver.log 2>&1 &
RECEIVER=$!
sleep 2
env --default-signal=INT python3 $LAB_BUILD/bin/remus -i 200 --ack-timeout 60000 --stats-json "$STATS" \
    domd 127.0.0.1 > $OUTD/disk-remus.log 2>&1 &
REMUS=$!
OLD_DOMID=$(xl domid domd)
fail_and_stop() {
    result disk_failover FAIL "$*"
    kill -KILL $REMUS $RECEIVER 2>/dev/null
    echo "--- remus:"; cat $OUTD/disk-remus.log
    echo "--- receiver:"; cat $OUTD/disk-receiver.log
    exit 1
}
reach() { [ "$(commits)" -ge "$1" ] || gone $REMUS || gone $RECEIVER; }
poll_until 900 reach 1
[ "$(commits)" -ge 1 ] && ! gone $REMUS || fail_and_stop "no first checkpoint"
mark=$(domd_counter)
n0=$(commits)
poll_until 300 reach $((n0 + MORE))
[ "$(commits)" -ge $((n0 + MORE)) ] && ! gone $REMUS || fail_and_stop "no $MORE more checkpoints"
kill -STOP $REMUS
xl destroy domd
lines_before=$(grep -c '' $DOMD_CONSOLE)
standby_before=$(grep -c '' $STANDBY_CONSOLE 2>/dev/null || echo 0)
t_kill=$(uptime_s)
kill -KILL $REMUS
poll_until 900 gone $RECEIVER
gone $RECEIVER || fail_and_stop "the receiver did not finish"
wait $RECEIVER; rrc=$?
cat $OUTD/disk-receiver.log
new_lines() {
    { tail -n +$((lines_before + 1)) $DOMD_CONSOLE; tail -n +$((standby_before + 1)) $STANDBY_CONSOLE 2>/dev/null; } |
        sed -n 's/.*domd counter \([0-9]*\).*/\1/p'
}
has_new() { [ "$(new_lines | grep -c '')" -ge "$1" ]; }
poll_until 180 has_new 10
after=$(new_lines | head -1)
failover_s=$(since "$t_kill")
newid=$(xl domid domd 2>/dev/null)
sleep 2
xl destroy domd  # block-remus remove: its server flushes the replica and goes
sleep 2
cp --sparse=always "$REPLICA" $OUTD/replica-copy.img
e2fsck -E journal_only -y $OUTD/replica-copy.img > $OUTD/disk-journal.log 2>&1
fsck.ext4 -fn $OUTD/replica-copy.img > $OUTD/disk-fsck.log 2>&1; fsck_rc=$?
on_disk=$(debugfs -R 'cat /counter' $OUTD/replica-copy.img 2>/dev/null | tr -dc 0-9)
rm -f $OUTD/replica-copy.img
ok=0
[ "$rrc" = 0 ] || ok=1
[ -n "$newid" ] && [ "$newid" != "$OLD_DOMID" ] || ok=1
[ -n "$after" ] && [ "$after" -gt "${mark:-0}" ] || ok=1
[ "$fsck_rc" = 0 ] || ok=1
[ -n "$on_disk" ] && [ "$on_disk" -ge "${mark:-0}" ] || ok=1
check disk_failover $ok "receiver exit $rrc; domd restored as $newid (was $OLD_DOMID) on $REPLICA," \
    "printing again ${failover_s}s after the SIGKILL from counter $after (mark $mark);" \
    "fsck -n exit $fsck_rc; /counter on the replica $on_disk"
[ "$fsck_rc" = 0 ] || cat $OUTD/disk-fsck.log
exit $FAILS
