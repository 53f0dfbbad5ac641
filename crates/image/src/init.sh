#!/bin/sh
# Skyvisor default guest: /init, PID 1 of the initramfs (a VM) or of the
# container (a container made from the debian-rootfs recipe).
#
# Sets the system up from the kernel command line (sv.name, sv.id, sv.ip, sv.gw,
# sv.dns, sv.domain, sv.probe), then runs skyvisor-guest in a loop, restarting it if it dies.
# This shell stays PID 1 for the life of the VM: it must never exit (the kernel
# would panic), and while it waits for the service it also reaps orphaned
# processes (busybox ash waits with waitpid(-1)). Poweroff and reboot are done by
# skyvisor-guest itself (sync, unmount /data, reboot(2)).
#
# In a container (SV_CONTAINER=1) the same words come in $SV_CMDLINE, and the
# runtime has already mounted /proc, /sys, /dev and tmpfs on /run and /tmp, set
# the hostname and configured the network namespace; the container may change
# none of that. There this script only writes resolv.conf, runs the service,
# and on SIGTERM (the runtime's stop signal) stops it, syncs and exits 0.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
umask 022
set -f # no globbing when splitting the command line

log() { echo "skyvisor-init: $*"; }

arg() {
    for w in $cmdline; do
        case "$w" in "$1="*) echo "${w#*=}"; return 0 ;; esac
    done
    return 1
}

if [ "$SV_CONTAINER" = 1 ]; then
    cmdline=$SV_CMDLINE
    name=$(arg sv.name)
    ip=$(arg sv.ip)
    dns=$(arg sv.dns)
    domain=$(arg sv.domain)
    [ -n "$dns" ] && echo "nameserver $dns" >/etc/resolv.conf
    [ -n "$dns" ] && [ -n "$domain" ] && echo "search $domain" >>/etc/resolv.conf
    [ -n "$dns" ] && echo "options timeout:2 attempts:2" >>/etc/resolv.conf
    # A plain directory of the writable layer: it lives as long as the container.
    mkdir -p /data
    # The kernel's boot id is the host's: each start of the container draws
    # its own, which the service reports as this boot's.
    SV_BOOT_ID=$(cat /proc/sys/kernel/random/uuid)
    export SV_BOOT_ID

    child=
    stop() {
        log "SIGTERM: stopping skyvisor-guest"
        [ -n "$child" ] && kill -TERM "$child" 2>/dev/null && wait "$child"
        sync
        exit 0
    }
    # A PID 1 without a handler ignores SIGTERM.
    trap stop TERM

    log "starting skyvisor-guest in a container name=${name:--} ip=${ip:--}"
    while :; do
        # In the background, so that `wait` returns (and the trap runs) as soon
        # as a signal arrives; ash runs traps only between commands.
        /usr/bin/skyvisor-guest serve &
        child=$!
        wait "$child"
        status=$?
        child=
        log "skyvisor-guest exited with status $status; restarting in 1s"
        sleep 1 &
        wait $!
    done
fi

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=620 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp

cmdline=$(cat /proc/cmdline)

# Accelerator probe: the host only wants to know that the guest boots.
if [ "$(arg sv.probe)" = 1 ]; then
    /usr/bin/skyvisor-guest probe
    # Only reached if the binary cannot run.
    printf '\nSKYVISOR-PROBE-OK\n'
    poweroff -f
fi

while read -r module; do
    [ -n "$module" ] || continue
    insmod "$module" || log "insmod $module failed"
done </etc/skyvisor/modules

# Device nodes appear as the drivers probe; give them a moment.
wait_for() {
    i=0
    while [ ! -e "$1" ] && [ $i -lt 20 ]; do
        usleep 100000
        i=$((i + 1))
    done
    [ -e "$1" ]
}

name=$(arg sv.name)
ip=$(arg sv.ip)
gw=$(arg sv.gw)
dns=$(arg sv.dns)
mtu=$(arg sv.mtu)

hostname "${name:-skyvisor-guest}" 2>/dev/null || hostname skyvisor-guest
domain=$(arg sv.domain)
[ -n "$dns" ] && echo "nameserver $dns" >/etc/resolv.conf
[ -n "$dns" ] && [ -n "$domain" ] && echo "search $domain" >>/etc/resolv.conf
[ -n "$dns" ] && echo "options timeout:2 attempts:2" >>/etc/resolv.conf

ip link set lo up
if wait_for /sys/class/net/eth0; then
    [ -n "$mtu" ] && { ip link set eth0 mtu "$mtu" || log "cannot set mtu $mtu on eth0"; }
    ip link set eth0 up
    if [ -n "$ip" ]; then
        ip addr add "$ip" dev eth0 || log "cannot set address $ip on eth0"
        if [ -n "$gw" ]; then
            ip route add default via "$gw" dev eth0 || log "cannot add default route via $gw"
        fi
        # Let neighbours and switches learn where this address lives now.
        arping -U -c 1 -I eth0 "${ip%/*}" >/dev/null 2>&1 &
    fi
else
    log "no eth0"
fi

mkdir -p /data
if [ -b /dev/vda ] || wait_for /dev/vda; then
    # Format only a blank disk: never overwrite data we merely failed to mount.
    if [ "$(dd if=/dev/vda bs=65536 count=1 2>/dev/null | tr -d '\000' | wc -c)" = 0 ]; then
        log "/dev/vda is blank: formatting it"
        mke2fs -F -L skyvisor-data /dev/vda >/dev/null || log "formatting /dev/vda failed"
    fi
    if mount -t ext4 -o noatime /dev/vda /data; then
        log "mounted /dev/vda on /data"
    else
        log "ERROR: cannot mount /dev/vda on /data; the disk endpoints will answer 503"
    fi
else
    log "no /dev/vda: /data is not persistent"
fi

log "starting skyvisor-guest name=${name:--} ip=${ip:--}"
while :; do
    /usr/bin/skyvisor-guest serve
    log "skyvisor-guest exited with status $?; restarting in 1s"
    sleep 1
done
