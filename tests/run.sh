#!/usr/bin/env bash
# Run every espip test on a Debian machine, as root:
#   formatting, clippy, unit and vector tests, and the namespace tests (real TUN, raw sockets,
#   tcpdump captures, scapy and tshark as independent ESP implementations).
# Installs the Debian packages the tests use; stops with a message naming anything else missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "tests/run.sh: run as root (sudo): the namespace tests create namespaces, TUN devices and raw sockets" >&2
  exit 1
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "tests/run.sh: cargo is missing; install Rust with rustup (https://rustup.rs), then rerun" >&2
  exit 1
fi

# Debian packages: program -> package.
need=()
need_sw=()
for pair in ip:iproute2 ping:iputils-ping tcpdump:tcpdump tshark:tshark sysctl:procps iptables:iptables conntrack:conntrack curl:curl; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
/usr/bin/python3 -c 'import scapy.layers.ipsec' >/dev/null 2>&1 || need+=(python3-scapy)
command -v ethtool >/dev/null 2>&1 || need+=(ethtool)
# strongSwan 5.9.8 as the IKEv2 peer (kernel-libipsec: userspace ESP; openssl/gcm for AES-GCM and
# P-256; curve25519 and chapoly from the extra plugins).
[ -x /usr/lib/ipsec/charon ] || need_sw+=(strongswan-charon)
command -v swanctl >/dev/null 2>&1 || need_sw+=(strongswan-swanctl)
[ -e /usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so ] || need_sw+=(libcharon-extra-plugins)
[ -e /usr/lib/ipsec/plugins/libstrongswan-openssl.so ] || need_sw+=(libstrongswan-standard-plugins)
[ -e /usr/lib/ipsec/plugins/libstrongswan-curve25519.so ] || need_sw+=(libstrongswan-extra-plugins)
/usr/bin/python3 -c 'import prometheus_client.parser' >/dev/null 2>&1 || need+=(python3-prometheus-client)
if [ "${#need_sw[@]}" -gt 0 ]; then
  echo "== installing ${need_sw[*]} (without recommends: no system charon service)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_sw[@]}" >/dev/null
fi
if [ "${#need[@]}" -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "tests/run.sh: missing Debian packages and no apt-get: ${need[*]}" >&2
    exit 1
  fi
  echo "== installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Namespaces left by an earlier run that was killed.
for ns in $(ip netns list | awk '{print $1}' | grep '^espip-' || true); do
  pid=$(echo "$ns" | grep -oE -- '-[0-9]+-' | tr -d '-' | head -n1)
  if [ -n "$pid" ] && [ ! -d "/proc/$pid" ]; then ip netns del "$ns" || true; fi
done

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace --all-targets --no-fail-fast 2>&1 | tee /tmp/espip-test.log
if grep -q '^test result: FAILED' /tmp/espip-test.log; then exit 1; fi

# Fuzzing: each target for FUZZ_SECONDS (default 60) from the seed corpus; new inputs go to a
# scratch directory, a crash fails the run and leaves its input in tests/fuzz/artifacts/.
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
if [ "$FUZZ_SECONDS" -gt 0 ]; then
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
  fi
  scratch=$(mktemp -d /tmp/espip-fuzz-XXXXXX)
  for t in inbound_esp inbound_ipip outbound nat config offload ike; do
    echo "== fuzz $t (${FUZZ_SECONDS} s)"
    mkdir -p "$scratch/$t"
    RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" --fuzz-dir tests/fuzz "$scratch/$t" "tests/fuzz/corpus/$t" \
      -- -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 2>&1 | tee "$scratch/$t.log" | grep -E '^(Done|#[0-9]+.*DONE)|stat::number_of_executed_units|panicked|ERROR' || true
    if grep -qE 'ERROR: libFuzzer|panicked' "$scratch/$t.log"; then
      echo "fuzz target $t found a crash: see $scratch/$t.log and tests/fuzz/artifacts/$t/" >&2
      exit 1
    fi
    # A target that did not build (or stopped early) never prints libFuzzer's final line.
    if ! grep -qE '^Done [0-9]+ runs' "$scratch/$t.log"; then
      echo "fuzz target $t did not run to its end (a build error?): see $scratch/$t.log" >&2
      tail -20 "$scratch/$t.log" >&2
      exit 1
    fi
  done
  rm -rf "$scratch"
fi

# The Debian package: built, checked by lintian, installed and purged (last: the purge
# removes the espip user the namespace tests share).
echo "== package"
bash tests/package.sh

left=$(ip netns list | awk '{print $1}' | grep '^espip-' || true)
if [ -n "$left" ]; then
  echo "tests left namespaces behind: $left" >&2
  exit 1
fi
echo "== all tests passed"
