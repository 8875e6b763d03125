#!/bin/bash
# First-boot bootstrap of BoxLite runner "{{name}}" (stage "{{stage}}"),
# run once by cloud-init. Any failure stops it with a message naming the step.
set -euo pipefail
step() { echo "boxlite-bootstrap: $*"; }
fail() { echo "boxlite-bootstrap: FAILED: $*" >&2; exit 1; }

step "1/5 cgroup v2 with the memory, cpu and pids controllers"
[ -f /sys/fs/cgroup/cgroup.controllers ] || fail "cgroup v2 (the unified hierarchy) is required"
for c in memory cpu pids; do
  grep -qw "$c" /sys/fs/cgroup/cgroup.controllers || fail "cgroup controller $c is not available"
done
# Boxes get delegated subtrees as transient scopes of boxlite.slice (Delegate=yes).
systemctl daemon-reload

step "2/5 AppArmor: user namespaces for /usr/bin/bwrap only"
sysctl --system >/dev/null
apparmor_parser -r -W /etc/apparmor.d/bwrap-userns-restrict || fail "loading the bwrap AppArmor profile"
restrict="$(sysctl -n kernel.apparmor_restrict_unprivileged_userns 2>/dev/null || echo 1)"
[ "$restrict" = 1 ] || fail "kernel.apparmor_restrict_unprivileged_userns must stay 1"

step "   what boxes are made of: network namespaces (ip), egress rules (nft), disks (loop, mkfs.ext4)"
for t in ip nft mkfs.ext4 e2fsck; do
  command -v "$t" >/dev/null || fail "$t is missing (packages iproute2, nftables, e2fsprogs)"
done
[ -e /dev/loop-control ] || modprobe loop || fail "loop devices are not available"

step "3/5 AWS CLI (artifact and token come from this stage's AWS account)"
command -v aws >/dev/null || snap install aws-cli --classic || fail "installing the AWS CLI"

step "4/5 boxlite-runner from {{artifact_url}}, checked against its SHA-256"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
case "{{artifact_url}}" in
  s3://*) aws s3 cp --only-show-errors --region "{{region}}" "{{artifact_url}}" "$tmp/runner.tar.gz" ;;
  *) curl -fsSL --retry 5 --retry-delay 3 -o "$tmp/runner.tar.gz" "{{artifact_url}}" ;;
esac || fail "downloading {{artifact_url}}"
echo "{{artifact_sha256}}  $tmp/runner.tar.gz" | sha256sum -c --status \
  || fail "checksum mismatch: {{artifact_url}} is not {{artifact_sha256}}"
mkdir "$tmp/unpacked"
tar -xzf "$tmp/runner.tar.gz" -C "$tmp/unpacked" --no-same-owner
[ -f "$tmp/unpacked/boxlite-runner" ] || fail "the artifact does not hold boxlite-runner"
install -D -m 0755 "$tmp/unpacked/boxlite-runner" /usr/local/bin/boxlite-runner

step "5/5 runner token and the systemd unit"
install -d -m 0700 /etc/boxlite /var/lib/boxlite
(umask 077; aws ssm get-parameter --region "{{region}}" --name "{{token_parameter}}" \
  --with-decryption --query Parameter.Value --output text > /etc/boxlite/runner-token) \
  || fail "reading the runner token from SSM {{token_parameter}}"
systemctl daemon-reload
systemctl enable --now boxlite-runner.socket boxlite-runner.service || fail "starting boxlite-runner"
step "done"
