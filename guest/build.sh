#!/bin/bash
# Build the cprctl test guest (kernel + initramfs) offline from Debian packages.
#
# Usage: guest/build.sh [OUTDIR]      (default: $HOME/.cache/cprctl-guest)
# Run as root. Produces in OUTDIR:
#   vmlinuz      Debian cloud kernel (linux-image-*-cloud-amd64, not installed)
#   initrd.img   gzip'd newc cpio: busybox, qemu-ga (+libs), memfill, virtio modules
#   stamp        hash of all inputs; a re-run with the same inputs is a no-op
#   info.txt     kernel package/version and module load order (informational)
#   deb/         the downloaded kernel .deb, reused by later rebuilds
# The guest is assembled in a temp folder next to OUTDIR and swapped in at the
# end, so an interrupted build never leaves a half-built guest behind.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=$(realpath -m "${1:-$HOME/.cache/cprctl-guest}")
PARENT=$(dirname "$OUT")
NAME=$(basename "$OUT")

KERNEL_META=linux-image-cloud-amd64
# Modules the guest needs; dependencies are added and ordered automatically.
WANT_MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev
              virtio_pci virtio_console virtio_blk"
BUSYBOX=/bin/busybox

log() { echo "guest/build.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (device nodes, apt)"
for tool in apt-cache apt-get dpkg-deb cpio gzip gcc objcopy ldd flock sha256sum; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
done
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing (apt-get install busybox-static)"
QEMU_GA=$(command -v qemu-ga || true)
[ -n "$QEMU_GA" ] || QEMU_GA=/usr/sbin/qemu-ga
[ -x "$QEMU_GA" ] || die "qemu-ga missing (apt-get install qemu-guest-agent)"

mkdir -p "$PARENT"
# Serialise concurrent builds of the same OUTDIR.
exec 9>"$PARENT/.$NAME.lock"
flock 9
# Leftovers of a killed build (SIGKILL skips the EXIT trap).
rm -rf "$PARENT/.$NAME.tmp."*

# ---------------------------------------------------------------------------
# Resolve the real kernel package behind the metapackage's candidate version,
# e.g. "Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)".
# (One apt-cache call: this host has no apt pkgcache, each call costs ~0.5 s.)
resolve_kernel() {
    apt-cache show --no-all-versions "$KERNEL_META" 2>/dev/null |
        sed -n 's/^Depends: .*\(linux-image-[0-9][^ ,]*\)\( (= \([^)]*\))\)\{0,1\}.*/\1 \3/p' |
        head -n1
}
read -r KPKG KPKG_VER < <(resolve_kernel || true) || true
if [ -z "${KPKG:-}" ]; then
    log "cannot resolve $KERNEL_META; running apt-get update"
    apt-get update -qq
    read -r KPKG KPKG_VER < <(resolve_kernel || true) || true
    [ -n "${KPKG:-}" ] || die "cannot resolve $KERNEL_META to a kernel package"
fi
if [ -z "${KPKG_VER:-}" ]; then   # dependency without an exact version
    KPKG_VER=$(apt-cache show --no-all-versions "$KPKG" | sed -n 's/^Version: //p' | head -n1)
    [ -n "$KPKG_VER" ] || die "no version for $KPKG"
fi

# The shared libraries qemu-ga needs (ldd paths, incl. the dynamic loader).
ga_libs() {
    ldd "$QEMU_GA" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u
}
GA_LIBS=$(ga_libs)

# ---------------------------------------------------------------------------
# Stamp: hash of our sources, the kernel package and every host binary copied.
STAMP=$(
    {
        echo "kernel $KPKG $KPKG_VER"
        echo "modules $WANT_MODULES"
        gcc --version | head -n1
        cd "$SRC" && sha256sum build.sh init systemctl memfill.c
        # shellcheck disable=SC2086
        sha256sum "$BUSYBOX" "$QEMU_GA" $GA_LIBS
    } | sha256sum | cut -d' ' -f1
)
if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$STAMP" ] &&
    [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.img" ]; then
    log "up to date: $OUT ($KPKG $KPKG_VER)"
    exit 0
fi
log "building guest in $OUT ($KPKG $KPKG_VER)"

TMP=$(mktemp -d "$PARENT/.$NAME.tmp.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
NEW=$TMP/out          # becomes OUTDIR
WORK=$TMP/work        # scratch (extracted kernel package etc.)
ROOT=$TMP/root        # initramfs tree
mkdir -p "$NEW/deb" "$WORK" "$ROOT"

# ---------------------------------------------------------------------------
# Kernel package: reuse the cached .deb when it matches, else apt-get download.
DEB=
for f in "$OUT"/deb/"${KPKG}"_*.deb; do
    [ -f "$f" ] || continue
    if [ "$(dpkg-deb -f "$f" Package Version | tr '\n' ' ')" = "Package: $KPKG Version: $KPKG_VER " ]; then
        cp "$f" "$NEW/deb/" && DEB=$NEW/deb/$(basename "$f")
    fi
done
if [ -z "$DEB" ]; then
    # apt-get download writes into the current directory; as root it warns
    # about not being able to sandbox as _apt, which is harmless.
    dl() { (cd "$NEW/deb" && apt-get download -q "$KPKG=$KPKG_VER" 2>&1 |
        { grep -v '^W: Download is performed unsandboxed' >&2 || true; }); }
    if ! dl; then
        log "download failed; running apt-get update and retrying"
        apt-get update -qq
        dl || die "cannot download $KPKG=$KPKG_VER"
    fi
    DEB=$(ls "$NEW"/deb/"${KPKG}"_*.deb)
fi
dpkg-deb -x "$DEB" "$WORK/kernel"

KVMLINUZ=$(ls "$WORK"/kernel/boot/vmlinuz-*)
KVER=${KVMLINUZ##*/vmlinuz-}
KMOD=$WORK/kernel/lib/modules/$KVER
[ -d "$KMOD" ] || die "no modules directory for $KVER in $DEB"
cp "$KVMLINUZ" "$NEW/vmlinuz"

# ---------------------------------------------------------------------------
# Modules: map name -> file, skip built-ins, order by "depends=" from .modinfo
# (no kmod needed), decompress .ko.xz/.ko.zst/.ko.gz for busybox insmod.
declare -A MODFILE=() BUILTIN=() SEEN=()
while IFS= read -r f; do
    m=${f##*/}; m=${m%%.ko*}; MODFILE[${m//-/_}]=$f
done < <(find "$KMOD/kernel" -name '*.ko*')
if [ -f "$KMOD/modules.builtin" ]; then
    while IFS= read -r f; do
        m=${f##*/}; m=${m%%.ko*}; BUILTIN[${m//-/_}]=1
    done <"$KMOD/modules.builtin"
fi

# Write an uncompressed copy of a module file to $2.
unpack_ko() {
    case "$1" in
    *.ko) cp "$1" "$2" ;;
    *.ko.xz) xz -dc "$1" >"$2" ;;
    *.ko.zst) zstd -q -dc "$1" >"$2" ;;
    *.ko.gz) gzip -dc "$1" >"$2" ;;
    *) die "unknown module format: $1" ;;
    esac
}

ORDER=()
mkdir -p "$ROOT/lib/modules/guest"
add_module() {   # depth-first: dependencies first
    local m=${1//-/_} dep deps
    [ -z "${SEEN[$m]:-}" ] || return 0
    SEEN[$m]=1
    if [ -n "${BUILTIN[$m]:-}" ]; then
        log "module $m is built in"
        return 0
    fi
    [ -n "${MODFILE[$m]:-}" ] || die "module $m not found in $KPKG"
    unpack_ko "${MODFILE[$m]}" "$ROOT/lib/modules/guest/$m.ko"
    objcopy -O binary --only-section=.modinfo "$ROOT/lib/modules/guest/$m.ko" "$WORK/modinfo"
    deps=$(tr '\0' '\n' <"$WORK/modinfo" | sed -n 's/^depends=//p' | tr ',' ' ')
    for dep in $deps; do
        add_module "$dep"
    done
    ORDER+=("$m")
}
for m in $WANT_MODULES; do
    add_module "$m"
done
printf '%s\n' "${ORDER[@]}" >"$ROOT/lib/modules/guest/load-order"
log "module load order: ${ORDER[*]}"

# ---------------------------------------------------------------------------
# initramfs tree.
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,etc,root,var}
ln -s ../run "$ROOT/var/run"
mknod -m 600 "$ROOT/dev/console" c 5 1   # needed before devtmpfs is mounted
mknod -m 666 "$ROOT/dev/null" c 1 3

# busybox + applet symlinks (created now, no --install at boot).
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list-full); do
    [ -e "$ROOT/$applet" ] || [ -L "$ROOT/$applet" ] || ln -s /bin/busybox "$ROOT/$applet"
done
rm -f "$ROOT/linuxrc"

# qemu-ga at its host path (plus /usr/bin/qemu-ga) and its libraries.
install -D -m 755 "$QEMU_GA" "$ROOT$QEMU_GA"
[ -e "$ROOT/usr/bin/qemu-ga" ] || ln -s "$QEMU_GA" "$ROOT/usr/bin/qemu-ga"
for lib in $GA_LIBS; do
    mkdir -p "$ROOT$(dirname "$lib")"
    cp -L "$lib" "$ROOT$lib"
done

# systemctl stand-in for guest-suspend-ram.
install -m 755 "$SRC/systemctl" "$ROOT/usr/bin/systemctl"
ln -s /usr/bin/systemctl "$ROOT/bin/systemctl"

# memfill, static.
gcc -O2 -Wall -static -o "$ROOT/usr/bin/memfill" "$SRC/memfill.c"
strip "$ROOT/usr/bin/memfill" 2>/dev/null || true

install -m 755 "$SRC/init" "$ROOT/init"
echo 'root:x:0:0:root:/root:/bin/sh' >"$ROOT/etc/passwd"
echo 'root:x:0:' >"$ROOT/etc/group"

# Fixed mtimes + sorted names: same inputs give a byte-identical initrd.
find "$ROOT" -exec touch -h -d @0 {} +
(cd "$ROOT" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --quiet --null -o -H newc --owner=0:0 --reproducible) |
    gzip -9n >"$NEW/initrd.img"

cat >"$NEW/info.txt" <<EOF
kernel_package=$KPKG
kernel_package_version=$KPKG_VER
kernel_release=$KVER
module_load_order=${ORDER[*]}
qemu_ga=$QEMU_GA
EOF
echo "$STAMP" >"$NEW/stamp"

# ---------------------------------------------------------------------------
# Swap the finished guest into place.
if [ -e "$OUT" ]; then
    mv "$OUT" "$TMP/old"
fi
mv "$NEW" "$OUT"
log "done: $OUT/vmlinuz ($(du -h "$OUT/vmlinuz" | cut -f1)), $OUT/initrd.img ($(du -h "$OUT/initrd.img" | cut -f1))"
