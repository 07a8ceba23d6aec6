#!/usr/bin/env bash
# Installs what the cluster tests need: Debian's Slurm (22.05 on bookworm) and MUNGE.
# Idempotent: does nothing when the daemons are already installed. Needs root (CI runs as root).
# The packages' own services are kept from starting (policy-rc.d): the test fixture starts
# its own munged/slurmctld/slurmd with private config, sockets and pid files, and must not
# find system-wide daemons that it did not start.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }
if have slurmctld && have slurmd && have sbatch && have munged; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "slurm/ci/install.sh: needs root to apt-get install slurm-wlm munge" >&2
  exit 1
fi

policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  made_policy=1
fi
cleanup() { if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends slurm-wlm munge
have slurmctld && have slurmd && have sbatch && have munged
