#!/usr/bin/env bash
# Load, fault and hostile-input tests of `sdxl serve` on loopback, against the test backend
# (a model stand-in that sleeps per step; see docs/reliability.md). Each script prints one
# PASS/FAIL line per check and writes its figures to target/load-results/NAME.json.
#   SOAK_SECONDS  length of the soak (default 600; CI runs a shorter one)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null; then
  SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk
fi
cargo build --release --locked -p sdxl-cli --features test-backend

status=0
for test in overload faults hostile; do
  python3 load_tests/$test.py || status=1
done
python3 load_tests/soak.py --seconds "${SOAK_SECONDS:-600}" || status=1
exit $status
