#!/bin/sh
# Stand-in base images for the container tests, built from Debian's own packages.
#
# No image registry is reachable where the tests run, so the base images the
# shipped Dockerfiles name are made here and tagged with those names; the
# Dockerfiles then build unchanged with `podman build --pull=never`:
#
#   debian:12-slim    debootstrap --variant=minbase bookworm (+ ca-certificates)
#   python:3.11-slim  debian:12-slim + Debian's python3 (3.11), venv and pip,
#                     python/pip linked into /usr/local/bin as in the real image
#
# An image whose tag already exists is kept (a real one pulled from a registry
# included), so this costs about a minute once per machine and nothing after.
# Usage: sh tests/containers/base-images.sh      (root; podman and debootstrap)
# Env:   DEBIAN_MIRROR  the mirror debootstrap and apt use (default: the host's
#        apt source for bookworm, else http://deb.debian.org/debian)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
podman=${PODMAN:-podman}
# Runtime flags this kind of machine needs (see tests/podman_helpers.py).
run_flags="--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --network host"

host_mirror() {
    # deb822 sources first (Debian 12's default), then the one-line format.
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri=$(awk '/^URIs:/ && !/security/ {print $2; exit}' "$f")
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        uri=$(awk '/^deb / && !/security/ {print $2; exit}' "$f")
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
    echo http://deb.debian.org/debian
}
mirror=${DEBIAN_MIRROR:-$(host_mirror)}

# Package indexes may be reached through a TLS path only the host's CA bundle
# trusts: the images get the host's bundle.
cabundle=/etc/ssl/certs/ca-certificates.crt

# One builder at a time per machine (two test runs may start together).
exec 9>/var/tmp/bccguard-base-images.lock
flock 9

if ! $podman image exists debian:12-slim; then
    work=$(mktemp -d /var/tmp/bccguard-debootstrap.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    debootstrap --variant=minbase --include=ca-certificates bookworm "$work/rootfs" "$mirror" \
        >"$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
    cp "$cabundle" "$work/rootfs/etc/ssl/certs/ca-certificates.crt"
    echo "deb $mirror bookworm main" > "$work/rootfs/etc/apt/sources.list"
    # What the real slim image drops, now and for packages installed later:
    # downloaded .debs, apt lists, docs, manuals, translations.
    printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
        'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
        'path-exclude /usr/share/locale/*' > "$work/rootfs/etc/dpkg/dpkg.cfg.d/slim"
    rm -rf "$work/rootfs/var/lib/apt/lists/"* "$work/rootfs/var/cache/apt/"*.bin \
           "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/usr/share/locale/"* \
           "$work/rootfs/usr/share/man/"* "$work/rootfs/usr/share/info/"*
    find "$work/rootfs/usr/share/doc" -type f ! -name copyright -delete
    tar -C "$work/rootfs" -c . | $podman import \
        --change 'CMD ["bash"]' --change 'LABEL org.bccguard.stand-in=debootstrap' \
        - localhost/debian:12-slim >/dev/null 2>&1
    rm -rf "$work"
    trap - EXIT
fi

if ! $podman image exists python:3.11-slim; then
    # shellcheck disable=SC2086
    $podman build --pull=never --layers=false $run_flags -t localhost/python:3.11-slim \
        -f "$here/python-slim.Containerfile" --volume "$cabundle:/host-ca.crt:ro" "$here" >/dev/null
fi
