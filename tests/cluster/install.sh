#!/usr/bin/env bash
# Install what the cluster tests need (Slurm, munge, shellcheck) on Debian/Ubuntu.
# Idempotent: returns at once when everything is already installed.
# Called by .ci/run; safe to run by hand (needs root, or sudo).
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge shellcheck)

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install.sh: ${packages[*]} already installed"
    exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo=(sudo)
    else
        echo "install.sh: need root (or sudo) to install: ${missing[*]}" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when the install fails without it (fresh images ship none).
if ! "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"; then
    "${sudo[@]}" apt-get update
    "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
fi

# The Debian packages try to start the system services; the test fixture runs its own
# daemons on other ports, so stop any the package scripts may have started.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    "${sudo[@]}" systemctl stop slurmctld slurmd munge >/dev/null 2>&1 || true
fi
echo "install.sh: installed ${missing[*]}"
