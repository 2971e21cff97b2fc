#!/bin/sh
# First process of the lab's dom0 (installed as /sbin/remus-lab-init; kernel cmdline init=...).
#
# Brings up just enough of a system for Xen's tools (mounts, Xen and 9p modules, xenstored and
# xenconsoled through Debian's /etc/init.d/xen), mounts the two 9p shares QEMU exports
#   remus    the project checkout, read-only, at /mnt/remus
#   results  this run's results directory, at /mnt/results
# and, if /mnt/results/job.sh exists, runs it with cwd /mnt/remus and REMUS_LAB_SRC /
# REMUS_LAB_OUT set, under `timeout` (JOB_TIMEOUT from /mnt/results/job.env).  Its output goes to
# job.log and its exit status to job.rc; then the lab's own logs (guest consoles, dmesg, xl dmesg)
# are copied next to them and the machine powers off.  Without a job: a root shell on hvc0.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8

mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -o remount,rw /
mkdir -p /run/lock /var/log/xen/console
hostname remus-lab
ip link set lo up
uptime_s() { cut -d' ' -f1 /proc/uptime; }

modprobe -a xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xen-blkback xen-netback \
    9pnet_virtio 9p
mount -t xenfs xenfs /proc/xen

SRC=/mnt/remus
OUTD=/mnt/results
opts=trans=virtio,version=9p2000.L,msize=262144,cache=none
mount -t 9p -o "$opts,ro" remus $SRC
if ! mount -t 9p -o "$opts" results $OUTD; then
    OUTD=/root/results; mkdir -p $OUTD
fi
echo "dom0_userspace_s=$(uptime_s)" > $OUTD/dom0-times.txt

/etc/init.d/xen start > $OUTD/xen-start.log 2>&1
xl list > /dev/null 2>&1 && echo "dom0_xl_ready_s=$(uptime_s)" >> $OUTD/dom0-times.txt

if [ -f $OUTD/job.sh ]; then
    JOB_TIMEOUT=1200
    [ -f $OUTD/job.env ] && . $OUTD/job.env
    echo "remus-lab: running the job (timeout ${JOB_TIMEOUT}s)" > /dev/hvc0
    ( cd $SRC && REMUS_LAB_SRC=$SRC REMUS_LAB_OUT=$OUTD \
        timeout -k 10 "$JOB_TIMEOUT" sh $OUTD/job.sh ) > $OUTD/job.log 2>&1 < /dev/null
    echo $? > $OUTD/job.rc
    echo "dom0_job_done_s=$(uptime_s)" >> $OUTD/dom0-times.txt
    echo "remus-lab: job exited $(cat $OUTD/job.rc)" > /dev/hvc0
    mkdir -p $OUTD/lab-logs
    cp /var/log/xen/console/*.log /var/log/xen/*.log $OUTD/lab-logs/ 2>/dev/null
    dmesg > $OUTD/lab-logs/dom0-dmesg.txt 2>&1
    xl dmesg > $OUTD/lab-logs/xen-dmesg.txt 2>&1
    xl list > $OUTD/lab-logs/xl-list-at-end.txt 2>&1
    sync
    umount $OUTD $SRC 2>/dev/null
    busybox poweroff -f
fi
echo "remus-lab: no job: root shell on hvc0 (busybox poweroff -f to leave)"
while :; do
    setsid sh -c 'exec /bin/bash -l < /dev/hvc0 > /dev/hvc0 2>&1'
    sleep 1
done
