#!/usr/bin/env bash
# Build espip's Debian package and check it (issue 32): what it holds (dpkg-deb -c), what
# lintian says (no errors), that it installs on this machine with a working man page,
# completions, user and configuration directory, that `systemd-analyze verify` accepts the
# installed unit, and that a purge removes the package, the user and its state. As root.
# Run by tests/run.sh after the other tests (the purge removes the espip user they share;
# the daemon recreates it when it needs it).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-deb >/dev/null 2>&1; then
  echo "== installing cargo-deb"
  cargo install cargo-deb --locked --quiet
fi
need=()
command -v lintian >/dev/null 2>&1 || need+=(lintian)
command -v man >/dev/null 2>&1 || need+=(man-db)
command -v adduser >/dev/null 2>&1 || need+=(adduser)
if [ "${#need[@]}" -gt 0 ]; then
  echo "== installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
fail() { echo "package check failed: $*" >&2; exit 1; }

echo "== cargo deb"
deb=$(cargo deb 2>/dev/null | tail -n1)
[ -f "$deb" ] || fail "cargo deb made no package (got: $deb)"
echo "$deb"

echo "== dpkg-deb -c"
list=$(dpkg-deb -c "$deb" | awk '{print $6}')
for want in ./usr/bin/espip ./lib/systemd/system/espip@.service \
  ./usr/share/man/man8/espip.8.gz ./usr/share/man/man8/espip-run.8.gz \
  ./usr/share/man/man8/espip-show.8.gz \
  ./usr/share/bash-completion/completions/espip ./usr/share/zsh/vendor-completions/_espip \
  ./usr/share/fish/vendor_completions.d/espip.fish ./usr/share/doc/espip/README.md \
  ./usr/share/doc/espip/docs/configuration.md ./usr/share/doc/espip/copyright \
  ./usr/share/doc/espip/examples/static-keys.toml ./usr/share/doc/espip/examples/ikev2-strongswan.toml \
  ./usr/share/doc/espip/examples/multipath.toml ./usr/share/doc/espip/examples/same-lan.toml; do
  grep -qxF "$want" <<<"$list" || fail "$want is not in the package"
done
dpkg-deb -f "$deb" Depends | grep -q iptables || fail "Depends lacks iptables"
dpkg-deb -f "$deb" Depends | grep -q libc6 || fail "Depends lacks the computed libc6"

echo "== lintian"
lintian --tag-display-limit 0 "$deb" | tee /tmp/espip-lintian.txt || true
if grep -q '^E:' /tmp/espip-lintian.txt; then
  fail "lintian reports errors (above)"
fi

echo "== install"
dpkg -i "$deb" >/dev/null
[ "$(command -v espip)" = /usr/bin/espip ] || fail "espip is not /usr/bin/espip"
espip --version | grep -Eq '^espip [0-9.]+ \(([0-9a-f]{12}|unknown)\)' || fail "espip --version: $(espip --version)"
getent passwd espip >/dev/null || fail "no espip user after install"
[ "$(stat -c %a:%U /etc/espip)" = 700:root ] || fail "/etc/espip is $(stat -c %a:%U /etc/espip)"
man -w espip | grep -q /usr/share/man/man8/espip.8.gz || fail "man espip finds no page"
man -w espip-show >/dev/null || fail "man espip-show finds no page"
grep -q 'complete' /usr/share/bash-completion/completions/espip || fail "bash completion"
if command -v systemd-analyze >/dev/null 2>&1; then
  systemd-analyze verify /lib/systemd/system/espip@.service 2>&1 | grep -v 'Failed to\|Unit is bound\|ignoring' | tee /tmp/espip-verify.txt || true
  if grep -qi 'error\|invalid\|unknown' /tmp/espip-verify.txt; then fail "systemd-analyze verify (above)"; fi
fi

echo "== purge"
dpkg --purge espip >/dev/null
[ ! -e /usr/bin/espip ] || fail "/usr/bin/espip left after purge"
[ ! -e /lib/systemd/system/espip@.service ] || fail "the unit left after purge"
! getent passwd espip >/dev/null || fail "the espip user left after purge"
[ ! -e /var/lib/espip ] || fail "/var/lib/espip left after purge"
echo "package: ok"
