#!/bin/bash
# Build the Xen lab: everything run-job.sh needs to boot Xen 4.17 + a Debian dom0 + a PV guest
# under QEMU, from Debian 12's own packages.  Run as root on a Debian 12 (bookworm) x86_64 host.
#
#   bash tests/xenlab/build.sh              build what is missing or out of date
#   STAGES="domu image" bash tests/xenlab/build.sh   only these stages (still in order)
#   FORCE=1 bash tests/xenlab/build.sh      rebuild every stage
#
# Stages, in order (each records a stamp in $OUT/stamps; a stage whose inputs - its own
# definition, the files it reads and the stamps of the stages it depends on - are unchanged
# is skipped, so re-running is cheap and a change rebuilds only what depends on it):
#   host    host packages: qemu, debootstrap, busybox-static, and what building Xen needs
#   rootfs  debootstrapped bookworm dom0 root (bookworm, -updates, -security: dom0's Xen tools
#           come from -security), with the Xen tools, python3 and what the tests and the
#           project's cffi module need (libxen-dev, gcc, python3-dev)
#   xen     Debian's binary hypervisor (for its .config), dom0's kernel and initrd
#   xensrc  the hypervisor rebuilt from Debian's xen source package with CONFIG_SHADOW_PAGING=y
#           (Debian's binary lacks it, and without it a PV guest has no log-dirty mode, so
#           live save, xl remus and remus all fail with "Failed to enable logdirty: 95")
#   domu    a busybox initramfs PV guest that prints "domU counter N" on its console each second
#   image   the dom0 root filesystem image (ext4), with the lab's init and the guest's files
#
# Exit status: 0 built; 3 the lab cannot be built here for a reason outside the project (not
# root, a package or the source gone from the mirror, no network) - the reason is printed and
# left in $OUT/build-skip-reason; anything else is a failure of the build itself.
set -euo pipefail
. "$(dirname "$0")/common.sh"

SUITE=bookworm
IMG_SIZE=${IMG_SIZE:-3G}
HOST_PKGS="qemu-system-x86 qemu-utils debootstrap busybox-static cpio e2fsprogs gcc make libc6-dev
    bison flex python3 dpkg-dev"
DOM0_PKGS="linux-image-amd64 xen-utils-4.17 xen-utils-common xenstore-utils
    python3 python3-cffi python3-zstandard python3-netifaces python3-docopt python3-setuptools
    python3-dev gcc libc6-dev libxen-dev iproute2 tcpdump busybox kmod udev procps
    python3-pytest python3-cryptography"
ALL_STAGES="host rootfs xen xensrc domu image"
STAGES=${STAGES:-$ALL_STAGES}
declare -A DEPS=([host]="" [rootfs]="" [xen]="rootfs" [xensrc]="xen" [domu]="" [image]="rootfs xen domu")
ROOTFS=$OUT/rootfs
STAMPS=$OUT/stamps
export DEBIAN_FRONTEND=noninteractive LC_ALL=C

skip() {  # the lab cannot be built here: not the project's fault
    mkdir -p "$OUT"; echo "$*" > "$OUT/build-skip-reason"
    lab_log "cannot build the lab: $*"
    exit "$LAB_SKIP"
}

host_mirror() {  # the Debian mirror this host's apt already uses
    local uri
    uri=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | tr ' ' '\n' | grep -m1 '/debian/\?$' || true)
    [ -n "$uri" ] || uri=$(awk '$1 == "deb" && $2 ~ /\/debian\/?$/ {print $2; exit}' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
    echo "${uri%/}"
}

# ---------------------------------------------------------------------------------- stages

stage_host() {
    local missing=() p
    for p in $HOST_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} = 0 ] && return 0
    lab_log "installing host packages: ${missing[*]}"
    apt-get update -qq || skip "apt-get update failed on the host"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || skip "could not install host packages: ${missing[*]}"
}

in_root() { chroot "$ROOTFS" "$@"; }

mount_root() {
    mount -t proc proc "$ROOTFS/proc"
    mount -t sysfs sysfs "$ROOTFS/sys"
    mount --bind /dev "$ROOTFS/dev"
    mount --bind /dev/pts "$ROOTFS/dev/pts"
}

umount_root() {
    local m
    for m in dev/pts dev sys proc; do
        mountpoint -q "$ROOTFS/$m" && umount -l "$ROOTFS/$m"
    done
    return 0
}

stage_rootfs() {
    if [ ! -x "$ROOTFS/usr/bin/apt-get" ]; then
        rm -rf "$ROOTFS"; mkdir -p "$OUT/debcache"
        debootstrap --variant=minbase --cache-dir="$OUT/debcache" "$SUITE" "$ROOTFS" "$MIRROR" \
            > "$OUT/debootstrap.log" 2>&1 \
            || { tail -5 "$OUT/debootstrap.log" >&2; rm -rf "$ROOTFS"; skip "debootstrap $SUITE from $MIRROR failed"; }
    fi
    cat > "$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb ${MIRROR%/debian}/debian-security $SUITE-security main
EOF
    # No daemons started by package scripts, no recommends, and a small initrd that only
    # knows how to mount a virtio ext4 root.
    printf '#!/bin/sh\nexit 101\n' > "$ROOTFS/usr/sbin/policy-rc.d"
    chmod 755 "$ROOTFS/usr/sbin/policy-rc.d"
    echo 'APT::Install-Recommends "false";' > "$ROOTFS/etc/apt/apt.conf.d/90no-recommends"
    mkdir -p "$ROOTFS/etc/initramfs-tools/conf.d"
    echo 'MODULES=list' > "$ROOTFS/etc/initramfs-tools/conf.d/remus-lab"
    printf '%s\n' virtio_pci virtio_blk ext4 crc32c_generic > "$ROOTFS/etc/initramfs-tools/modules"
    trap umount_root EXIT
    mount_root
    in_root apt-get update -qq || skip "apt-get update failed in the dom0 root"
    # shellcheck disable=SC2086
    in_root apt-get install -y -q $DOM0_PKGS > "$OUT/rootfs-apt.log" 2>&1 \
        || { tail -15 "$OUT/rootfs-apt.log" >&2; skip "could not install the dom0 packages (see $OUT/rootfs-apt.log)"; }
    in_root apt-get clean
    umount_root; trap - EXIT
    in_root dpkg-query -W -f '${Package} ${Version}\n' xen-utils-4.17 libxen-dev linux-image-amd64 python3
}

stage_xen() {
    local d=$OUT/xen-deb
    rm -rf "$d"; mkdir -p "$d"
    (cd "$d" && apt-get download -q xen-hypervisor-4.17-amd64 >/dev/null 2>&1) \
        || skip "could not download xen-hypervisor-4.17-amd64"
    dpkg-deb -x "$d"/xen-hypervisor-4.17-amd64_*.deb "$d/x"
    gunzip -c "$d"/x/boot/xen-4.17-amd64.gz > "$OUT/xen"
    cp "$d"/x/boot/xen-4.17-amd64.config "$OUT/xen.config"
    rm -rf "$d"
    cp "$(ls -1 "$ROOTFS"/boot/vmlinuz-* | sort -V | tail -1)" "$OUT/vmlinuz"
    cp "$(ls -1 "$ROOTFS"/boot/initrd.img-* | sort -V | tail -1)" "$OUT/initrd.img"
}

stage_xensrc() {
    # A private apt state with a deb-src entry, so the host's apt configuration is untouched.
    local apt=$OUT/apt-src d=$OUT/xensrc v got=
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
    echo "deb-src $MIRROR $SUITE main" > "$apt/sources.list"
    local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
                -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache")
    apt-get "${opts[@]}" update -qq || skip "apt-get update for the xen source package failed"
    rm -rf "$d"; mkdir -p "$d"
    for v in $(apt-cache "${opts[@]}" showsrc xen | sed -n 's/^Version: //p' | sort -Vru); do
        if (cd "$d" && apt-get "${opts[@]}" source -q --download-only "xen=$v" >/dev/null 2>&1); then
            got=$v; break
        fi
        rm -f "$d"/xen_*
    done
    [ -n "$got" ] || skip "the xen source package is not on $MIRROR"
    lab_log "rebuilding the hypervisor from xen $got with CONFIG_SHADOW_PAGING=y"
    (cd "$d" && dpkg-source -q -x --no-check xen_*.dsc src >/dev/null)
    cp "$OUT/xen.config" "$d/src/xen/.config"
    sed -i 's/^# CONFIG_SHADOW_PAGING is not set$/CONFIG_SHADOW_PAGING=y/' "$d/src/xen/.config"
    make -C "$d/src/xen" -s olddefconfig >/dev/null
    grep -q '^CONFIG_SHADOW_PAGING=y$' "$d/src/xen/.config"
    make -C "$d/src/xen" -j"$(nproc)" XEN_TARGET_ARCH=x86_64 > "$d/make.log" 2>&1 \
        || { tail -30 "$d/make.log" >&2; return 1; }
    cp "$d/src/xen/xen" "$OUT/xen-shadow"
    echo "$got" > "$OUT/xen-shadow.version"
    rm -rf "$d"
}

stage_domu() {
    local d=$OUT/domu/initramfs a
    rm -rf "$OUT/domu"; mkdir -p "$d"/{bin,dev,proc,sys,tmp}
    cp /bin/busybox "$d/bin/busybox"
    for a in sh mount cat cut sleep; do ln -s busybox "$d/bin/$a"; done
    cat > "$d/init" <<'EOF'
#!/bin/sh
# The lab's PV guest: count seconds on the console (hvc0) forever.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "domU: up"
n=0
while :; do
    n=$((n + 1))
    echo "domU counter $n uptime $(cut -d' ' -f1 /proc/uptime)"
    sleep 1
done
EOF
    chmod 755 "$d/init"
    (cd "$d" && find . | cpio -o -H newc --quiet | gzip -9) > "$OUT/domu/initrd.gz"
    rm -rf "$d"
    cat > "$OUT/domu/domu.cfg" <<'EOF'
name = "domu"
type = "pv"
kernel = "/var/lib/remus-lab/domu-vmlinuz"
ramdisk = "/var/lib/remus-lab/domu-initrd.gz"
extra = "console=hvc0 quiet"
memory = 128
vcpus = 1
on_crash = "preserve"
EOF
}

stage_image() {
    echo remus-lab > "$ROOTFS/etc/hostname"
    sed -i 's/^root:[^:]*:/root::/' "$ROOTFS/etc/shadow"   # a throw-away lab: no root password
    echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' > "$ROOTFS/etc/fstab"
    install -m 755 "$XENLAB_DIR/dom0-init.sh" "$ROOTFS/sbin/remus-lab-init"
    mkdir -p "$ROOTFS/var/lib/remus-lab" "$ROOTFS/mnt/remus" "$ROOTFS/mnt/results"
    cp "$OUT/domu/initrd.gz" "$ROOTFS/var/lib/remus-lab/domu-initrd.gz"
    cp "$OUT/domu/domu.cfg" "$ROOTFS/var/lib/remus-lab/domu.cfg"
    cp "$OUT/vmlinuz" "$ROOTFS/var/lib/remus-lab/domu-vmlinuz"
    # Guests' consoles logged to /var/log/xen/console/guest-<name>.log (the tests read them).
    sed -i '/^# remus-lab$/,$d' "$ROOTFS/etc/default/xen"
    printf '# remus-lab\nXENCONSOLED_ARGS="--log=guest --log-dir=/var/log/xen/console --timestamp=guest"\n' \
        >> "$ROOTFS/etc/default/xen"
    rm -f "$OUT/rootfs.img"
    mkfs.ext4 -q -F -L remus-lab -d "$ROOTFS" "$OUT/rootfs.img" "$IMG_SIZE"
}

# ---------------------------------------------------------------------------------- driver

stage_inputs() {  # everything whose change must rebuild stage $1
    local s=$1 d
    declare -f "stage_$s"
    case $s in
        rootfs) echo "$DOM0_PKGS $MIRROR" ;;
        image) declare -f in_root; cat "$XENLAB_DIR/dom0-init.sh" ;;
    esac
    for d in ${DEPS[$s]}; do cat "$STAMPS/$d" 2>/dev/null || echo "no-$d"; done
}

[ "$(id -u)" = 0 ] || skip "building the lab needs root (debootstrap, chroot, mount)"
[ "$(uname -m)" = x86_64 ] || skip "the lab needs an x86_64 host"
[ -r /etc/debian_version ] && command -v apt-get >/dev/null || skip "the lab is built from Debian packages: this host has no apt"
mkdir -p "$OUT" "$STAMPS"
rm -f "$OUT/build-skip-reason"
exec 9>"$LAB_LOCK"
flock -x 9    # one build at a time, and never while a lab boots from these images
MIRROR=${MIRROR:-$(host_mirror)}
[ -n "$MIRROR" ] || skip "no Debian mirror in this host's apt sources (set MIRROR)"

t_all=$(date +%s)
for s in $ALL_STAGES; do
    case " $STAGES " in *" $s "*) ;; *) continue ;; esac
    key=$(stage_inputs "$s" | sha256sum | cut -d' ' -f1)
    # The host stage always runs: it only checks (and installs what is missing).
    if [ -z "${FORCE:-}" ] && [ "$s" != host ] && [ "$(cat "$STAMPS/$s" 2>/dev/null)" = "$key" ]; then
        lab_log "stage $s: up to date"
        continue
    fi
    rm -f "$STAMPS/$s"
    t0=$(date +%s)
    lab_log "stage $s"
    "stage_$s"
    echo "$key" > "$STAMPS/$s"
    lab_log "stage $s done in $(( $(date +%s) - t0 )) s"
done
lab_log "lab ready in $OUT ($(( $(date +%s) - t_all )) s)"
