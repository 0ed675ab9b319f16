#!/bin/sh
# Debian packages for running docker/ with podman (tests/deploy/test_containers.py, `make containers`):
# podman, runc (crun refuses cgroups v1 "hybrid" mode), bridge networking (netavark needs
# iptables; aardvark-dns resolves compose service names) and mmdebstrap for the base image.
# Installs what is missing when run as root on Debian; otherwise says what to install.
set -eu
packages="podman runc iptables netavark aardvark-dns mmdebstrap"
missing=""
for p in $packages; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "podman-packages: missing:$missing (as root: apt-get install$missing)" >&2
    exit 0
fi
echo "podman-packages: installing$missing"
apt-get update -qq
# shellcheck disable=SC2086 # one word per package
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
