#!/usr/bin/env bash
# Builds a Debian root with another release's QEMU (too new for this machine's glibc), cached, and a wrapper
# executable beside it that runs that QEMU on this host with the same pid, paths and devices:
#   qemu-root.sh trixie   CACHE   -> CACHE/trixie-KEY/qemu-system-x86_64    (Debian 13: QEMU 10.0.x)
#   qemu-root.sh unstable CACHE   -> CACHE/unstable-KEY/qemu-system-x86_64  (Debian unstable: QEMU 11.x)
# CACHE/SUITE is a symlink to the current build. KEY covers RECIPE, the suite and the mirror, so a changed recipe
# builds afresh (bump RECIPE when the build or the wrapper changes meaning). The mirror is the one this machine's own apt sources use for Debian (never written here).
set -euo pipefail
RECIPE=1
suite=${1:?usage: qemu-root.sh trixie|unstable CACHE}
cache=${2:?usage: qemu-root.sh trixie|unstable CACHE}

mirror=$(awk '/^URIs:/ {u=$2} /^Suites:/ && / bookworm( |$)/ {print u; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
if [ -z "$mirror" ]; then
    mirror=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
fi
[ -n "$mirror" ] || { echo "qemu-root: no Debian apt source on this machine to take the mirror from" >&2; exit 1; }
key=$(echo "$RECIPE $suite $mirror" | sha256sum | cut -c1-12)
dest="$cache/$suite-$key"
wrapper="$dest/qemu-system-x86_64"
mkdir -p "$cache"
exec 9>"$cache/.lock-$suite"
flock 9
if [ ! -x "$wrapper" ]; then
    rm -rf "$dest" "$dest.tmp"
    mkdir -p "$dest.tmp"
    # The snapshot's unstable Release file may have expired: apt must not refuse it for that.
    nocheck='Acquire::Check-Valid-Until "false";'
    hooks=()
    if [ "$suite" = unstable ]; then
        hooks=(--customize-hook="echo 'deb $mirror unstable main' > \"\$1/etc/apt/sources.list.d/unstable.list\""
               --customize-hook='chroot "$1" apt-get update -qq'
               --customize-hook='chroot "$1" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t unstable qemu-system-x86 qemu-utils >/dev/null')
    fi
    mmdebstrap -q --variant=apt --include=qemu-system-x86,qemu-utils --aptopt="$nocheck" "${hooks[@]}" \
        trixie "$dest.tmp/root" "deb $mirror trixie main"
    # The wrapper: a private mount namespace in which the host's own trees the VM uses (its files, sockets,
    # devices, state) are bound into the root, then chroot; exec all the way, so the pid is QEMU's, and
    # QEMU's argv[0] is this wrapper's path (what cprctl recorded). The marker line tells cprctl which
    # executable the wrapper runs (to see a package upgrade replace it).
    cat >"$dest.tmp/qemu-system-x86_64" <<EOF
#!/bin/bash
# cprctl-exe: $dest/root/usr/bin/qemu-system-x86_64
exec unshare --mount --propagation private /bin/bash -c '
root=\$1; self=\$2; shift 2
for d in /tmp /var/tmp /var/lib/cprctl /dev /proc /sys /run /root /home /srv /work /opt /mnt; do
    [ -d "\$d" ] && [ ! -L "\$d" ] || continue
    mkdir -p "\$root\$d" && mount --rbind "\$d" "\$root\$d"
done
exec chroot "\$root" /bin/bash -c "exec -a \"\\\$0\" /usr/bin/qemu-system-x86_64 \"\\\$@\"" "\$self" "\$@"
' bash "$dest/root" "\$0" "\$@"
EOF
    chmod 755 "$dest.tmp/qemu-system-x86_64"
    mv "$dest.tmp" "$dest"
fi
ln -sfn "$(basename "$dest")" "$cache/$suite.new" && mv -T "$cache/$suite.new" "$cache/$suite"
"$wrapper" --version | head -n1
