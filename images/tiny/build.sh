#!/usr/bin/env bash
# Build the SkyGate "tiny" guest image from Debian packages only.
#
#   images/tiny/build.sh OUTDIR
#
# Writes OUTDIR/vmlinuz (Debian cloud kernel), OUTDIR/initrd.img (busybox +
# dropbear + the few virtio modules, cpio newc + gzip) and OUTDIR/image.json
# (a body for POST /api/v1/images, see images/README.md).
# Downloaded .debs are cached in OUTDIR/.cache/debs, so a rebuild needs no
# network as long as the package versions have not changed.
#
# Needs: apt-get/apt-cache with fresh package lists, dpkg, cpio, gzip, kmod
# (depmod/modprobe), jq, sha256sum (scripts/install-host-deps.sh installs them).
# Root is not required for the build itself (apt-get download works as any user).
set -euo pipefail

usage() { echo "usage: $0 OUTDIR" >&2; exit 2; }
die() { echo "build.sh: $*" >&2; exit 1; }

[[ $# -eq 1 ]] || usage
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

mkdir -p "$1"
OUTDIR=$(cd "$1" && pwd -P)
# The paths end up in file:// URLs and libvirt XML unescaped; refuse anything
# that would need escaping rather than emit a subtly broken URL.
[[ ${OUTDIR} =~ ^[A-Za-z0-9._/+-]+$ ]] ||
    die "OUTDIR must match [A-Za-z0-9._/+-]+ (got '${OUTDIR}')"

# Kernel command line recorded in image.json. quiet: printing the kernel log
# through the emulated UART costs measurable time under TCG.
CMDLINE=${TINY_CMDLINE:-console=ttyS0 quiet}

CACHE=${OUTDIR}/.cache/debs
mkdir -p "${CACHE}"

WORK=$(mktemp -d)
trap 'rm -rf "${WORK}"' EXIT

# --- resolve package names ---------------------------------------------------
# linux-image-cloud-amd64 is the meta package; it depends on the current
# versioned kernel package (e.g. linux-image-6.1.0-56-cloud-amd64).
KERNEL_PKG=${TINY_KERNEL_PKG:-$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-.*-cloud-amd64$/ { print $2; exit }')}
[[ -n ${KERNEL_PKG} ]] ||
    die "cannot resolve linux-image-cloud-amd64 via apt-cache (run 'apt-get update' first)"

# dropbear is dynamically linked; these are its libraries and theirs
# (dropbear-bin -> libc6 libcrypt1 libtomcrypt1 libtommath1 zlib1g;
# libtomcrypt1 -> libgmp10). The loader check below fails the build if this
# list ever stops covering a NEEDED entry.
PACKAGES=("${KERNEL_PKG}" busybox-static dropbear-bin
    libc6 libcrypt1 libtomcrypt1 libtommath1 libgmp10 zlib1g)

# --- download (cached) ---------------------------------------------------------
# `apt-get download --print-uris` names the exact file and its SHA256 for the
# candidate version, so the cache is reused only when it holds that very file.
APT_OPTS=()
# As root apt drops to the _apt user, which cannot write into arbitrary dirs.
[[ ${EUID} -eq 0 ]] && APT_OPTS=(-o APT::Sandbox::User=root)

DEBS=()
while read -r _url file _size hash; do
    deb=${CACHE}/${file}
    want=${hash#SHA256:}
    if [[ ! -f ${deb} ]] || [[ $(sha256sum <"${deb}" | cut -d' ' -f1) != "${want}" ]]; then
        rm -f "${deb}"
        (cd "${CACHE}" && apt-get "${APT_OPTS[@]}" -qq download "${file%%_*}=$(
            # file is name_version_arch.deb with ':' encoded as %3a
            v=${file#*_}; v=${v%_*.deb}; echo "${v//%3a/:}")") >"${WORK}/apt.log" 2>&1 ||
            { cat "${WORK}/apt.log" >&2; die "apt-get download ${file} failed"; }
        [[ $(sha256sum <"${deb}" | cut -d' ' -f1) == "${want}" ]] ||
            die "checksum mismatch for ${file}"
    fi
    DEBS+=("${deb}")
done < <(apt-get "${APT_OPTS[@]}" download --print-uris "${PACKAGES[@]}" 2>/dev/null |
    tr -d "'")
[[ ${#DEBS[@]} -eq ${#PACKAGES[@]} ]] ||
    die "apt-get download --print-uris resolved ${#DEBS[@]} of ${#PACKAGES[@]} packages"

# Drop cached .debs that are no longer referenced (older kernels etc.).
for deb in "${CACHE}"/*.deb; do
    keep=0
    for d in "${DEBS[@]}"; do [[ ${deb} == "${d}" ]] && keep=1; done
    [[ ${keep} -eq 1 ]] || rm -f "${deb}"
done

# --- unpack ----------------------------------------------------------------------
STAGE=${WORK}/stage
mkdir -p "${STAGE}"
for deb in "${DEBS[@]}"; do
    dpkg -x "${deb}" "${STAGE}"
done

KVER=$(basename "$(find "${STAGE}/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n 1)")
[[ -f ${STAGE}/boot/vmlinuz-${KVER} ]] || die "no kernel image for ${KVER} in ${KERNEL_PKG}"

# --- initramfs tree ------------------------------------------------------------------
ROOT=${WORK}/root
mkdir -p "${ROOT}"/{bin,dev,etc,lib/x86_64-linux-gnu,lib64,mnt,proc,root,run,sys,tmp,var/log}
chmod 1777 "${ROOT}/tmp"
chmod 700 "${ROOT}/root"
# One bin directory; the usual paths point at it so any PATH finds applets.
ln -s bin "${ROOT}/sbin"
mkdir -p "${ROOT}/usr"
ln -s ../bin "${ROOT}/usr/bin"
ln -s ../bin "${ROOT}/usr/sbin"
ln -s ../run "${ROOT}/var/run"

# busybox applets as symlinks (the static binary runs on the build host).
install -m 0755 "${STAGE}/bin/busybox" "${ROOT}/bin/busybox"
for applet in $("${ROOT}/bin/busybox" --list); do
    [[ ${applet} == busybox ]] || ln -sf busybox "${ROOT}/bin/${applet}"
done

install -m 0755 "${STAGE}/usr/sbin/dropbear" "${STAGE}/usr/bin/dropbearkey" "${ROOT}/bin/"

# Shared libraries: ask the staged dynamic loader what dropbear needs, and
# insist every library resolves inside the staging tree (never the host's).
LDSO=${STAGE}/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
for bin in dropbear dropbearkey; do
    "${LDSO}" --inhibit-cache --library-path "${STAGE}/lib/x86_64-linux-gnu:${STAGE}/usr/lib/x86_64-linux-gnu" \
        --list "${ROOT}/bin/${bin}" >"${WORK}/ldd.${bin}" ||
        die "cannot list the libraries of ${bin}"
done
while read -r name _arrow path _addr; do
    [[ ${_arrow:-} == "=>" ]] || continue
    # The loader itself is listed by path; it is copied separately below.
    [[ ${name} == */* ]] && continue
    [[ ${path} == "${STAGE}"/* ]] || die "library ${name} not found in the staged packages (${path})"
    cp -L "${path}" "${ROOT}/lib/x86_64-linux-gnu/${name}"
done < <(cat "${WORK}"/ldd.* | sort -u)
cp -L "${LDSO}" "${ROOT}/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
ln -s ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "${ROOT}/lib64/ld-linux-x86-64.so.2"

# Kernel modules: the dependency order comes from depmod's modules.dep, via
# `modprobe --show-depends`. Only what the boot path needs is copied:
#   virtio_pci (transport) virtio_net virtio_rng (entropy for host keys)
#   virtio_blk, virtio_scsi + sr_mod + isofs (NoCloud seed on a CD-ROM)
#   button + evdev (the ACPI power button as /dev/input/event*, for acpid)
# ata_piix (IDE CD-ROM on the i440fx machine) goes to a separate list that
# the init only loads when no seed turned up on virtio.
depmod -b "${STAGE}" "${KVER}"
MODROOT=${STAGE}/lib/modules/${KVER}
module_order() {
    local m
    for m in "$@"; do
        modprobe -d "${STAGE}" -S "${KVER}" --show-depends "${m}" |
            awk '$1 == "insmod" { print $2 }' | sed "s|^${MODROOT}/||"
    done | awk '!seen[$0]++'
}
module_order virtio_pci virtio_net virtio_rng virtio_blk virtio_scsi sr_mod isofs button evdev >"${WORK}/order"
module_order ata_piix sr_mod isofs | grep -vxF -f "${WORK}/order" >"${WORK}/order.ide" || true
OUTMOD=${ROOT}/lib/modules/${KVER}
mkdir -p "${OUTMOD}"
while read -r rel; do
    mkdir -p "${OUTMOD}/$(dirname "${rel}")"
    cp "${MODROOT}/${rel}" "${OUTMOD}/${rel}"
done < <(cat "${WORK}/order" "${WORK}/order.ide")
# scan=sync: SCSI targets (the seed CD-ROM) exist as soon as the virtio_scsi
# insmod returns, instead of the init having to poll for them.
sed 's|^\(kernel/drivers/scsi/scsi_mod\.ko\)$|\1 scan=sync|' "${WORK}/order" >"${OUTMOD}/skygate.order"
cp "${WORK}/order.ide" "${OUTMOD}/skygate-ide.order"
grep -q 'scsi_mod.ko scan=sync' "${OUTMOD}/skygate.order" || die "scsi_mod missing from module order"

# Minimal /etc: root with /bin/sh (dropbear checks /etc/shells), no password
# (key auth only), files-only NSS (glibc >= 2.34 has nss_files built in).
printf 'root:x:0:0:root:/root:/bin/sh\n' >"${ROOT}/etc/passwd"
printf 'root:*:1:0:99999:7:::\n' >"${ROOT}/etc/shadow"
chmod 600 "${ROOT}/etc/shadow"
printf 'root:x:0:\ntty:x:5:\n' >"${ROOT}/etc/group"
printf '/bin/sh\n' >"${ROOT}/etc/shells"
printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n' >"${ROOT}/etc/nsswitch.conf"
# busybox init after /init: no consoles to spawn, just reaping and shutdown.
cat >"${ROOT}/etc/inittab" <<'EOF'
::ctrlaltdel:/bin/reboot
::shutdown:/bin/umount -a -r
EOF
# ACPI power button (virsh shutdown, the agent's graceful StopMachine): busybox acpid's built-in
# tables map KEY_POWER to the action PWRF/00000080, run from /etc/acpi.
mkdir -p "${ROOT}/etc/acpi/PWRF"
printf '#!/bin/sh\nexec /bin/poweroff\n' >"${ROOT}/etc/acpi/PWRF/00000080"
chmod 0755 "${ROOT}/etc/acpi/PWRF/00000080"
install -m 0755 "${HERE}/init" "${ROOT}/init"
install -m 0755 "${HERE}/udhcpc.script" "${ROOT}/etc/udhcpc.script"

# Fixed timestamps and sorted entries: the same packages give the same bytes
# (and the same sha256 in image.json).
find "${ROOT}" -exec touch -h -d @0 {} +
(cd "${ROOT}" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) |
    gzip -9 -n >"${WORK}/initrd.img"

# --- outputs -----------------------------------------------------------------------------
# QEMU runs as libvirt-qemu: files world-readable, directories traversable.
install -m 0644 "${STAGE}/boot/vmlinuz-${KVER}" "${OUTDIR}/vmlinuz.tmp"
install -m 0644 "${WORK}/initrd.img" "${OUTDIR}/initrd.img.tmp"
mv -f "${OUTDIR}/vmlinuz.tmp" "${OUTDIR}/vmlinuz"
mv -f "${OUTDIR}/initrd.img.tmp" "${OUTDIR}/initrd.img"
chmod 0755 "${OUTDIR}"

KSUM=$(sha256sum <"${OUTDIR}/vmlinuz" | cut -d' ' -f1)
ISUM=$(sha256sum <"${OUTDIR}/initrd.img" | cut -d' ' -f1)
jq -n --arg dir "${OUTDIR}" --arg ksum "${KSUM}" --arg isum "${ISUM}" --arg cmdline "${CMDLINE}" '{
    name: "tiny",
    format: "kernel",
    source: ("file://" + $dir + "/"),
    sha256: null,
    boot: {
        kernel: ("file://" + $dir + "/vmlinuz"),
        kernel_sha256: $ksum,
        initrd: ("file://" + $dir + "/initrd.img"),
        initrd_sha256: $isum,
        cmdline: $cmdline
    }
}' >"${OUTDIR}/image.json.tmp"
chmod 0644 "${OUTDIR}/image.json.tmp"
mv -f "${OUTDIR}/image.json.tmp" "${OUTDIR}/image.json"

# Every ancestor must be traversable by libvirt-qemu, which we cannot fix
# without changing modes the caller chose; say so instead of failing at boot.
d=${OUTDIR}
while [[ ${d} != / ]]; do
    if [[ $(stat -c %A "${d}") != ?????????[xt] ]]; then
        echo "build.sh: warning: ${d} is not traversable by other users; libvirt-qemu will not be able to read the image" >&2
        break
    fi
    d=$(dirname "${d}")
done
