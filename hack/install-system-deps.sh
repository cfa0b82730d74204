#!/usr/bin/env bash
# Debian packages the process-backed nodes of the local cluster need (network namespaces,
# veth and bridges: iproute2; unshare/nsenter/mount: util-linux and mount; KubeRay's exec
# probes call wget; ps/pkill: procps). Installs only what is missing, so a warm machine
# spends no time here. Without root it only reports: the kwok-only cluster still works.
set -euo pipefail
declare -A pkg_of=([ip]=iproute2 [unshare]=util-linux [nsenter]=util-linux [mount]=mount
                   [wget]=wget [pkill]=procps [bash]=bash)
missing=()
for cmd in "${!pkg_of[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${pkg_of[$cmd]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages (need root to install): ${missing[*]}" >&2
  exit 0
fi
echo "installing Debian packages: ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
