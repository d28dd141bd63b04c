#!/bin/sh
# mmdebstrap customize hook for the workspace root image; $1 is the new root.
# The image is mounted read-only: every path guest-init mounts on must exist here.
set -eu
root="$1"
# The agent's home (the writable home disk is mounted here) and guest-init's mount points.
mkdir -p "$root/home/agent" "$root/run" "$root/tmp" "$root/mnt"
chmod 1777 "$root/tmp"
# Bound over by guest-init: the virtual DNS and the trust store with the workspace CA.
: > "$root/etc/resolv.conf"
chmod 0644 "$root/etc/resolv.conf"
echo workspace > "$root/etc/hostname"
# guest-init binds its own /etc/hosts (localhost, the workspace name) over this one.
printf '127.0.0.1\tlocalhost\n' > "$root/etc/hosts"
chmod 0644 "$root/etc/hosts"
# The agent's account (guest-init runs the agent as uid 1000 with HOME=/home/agent); no
# password, so no login but the one guest-init starts.
chroot "$root" groupadd --gid 1000 agent
chroot "$root" useradd --uid 1000 --gid 1000 --no-create-home --home-dir /home/agent \
  --shell /bin/bash agent
# No SSH host keys baked into a shared image: sshd's keys are made per workspace.
rm -f "$root"/etc/ssh/ssh_host_*
# Nothing to start at boot: guest-init is PID 1 and starts only the agent.
rm -f "$root"/etc/machine-id
: > "$root/etc/machine-id"
