#!/usr/bin/env bash
# Load, fault, hostile-input and shared-server tests of `sdxl serve` on loopback, against the test backend
# (a model stand-in that sleeps per step; see docs/reliability.md). Each script prints one
# PASS/FAIL line per check and writes its figures to target/load-results/NAME.json.
#   SOAK_SECONDS  length of the soak (default 600; CI runs a shorter one)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null; then
  SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk
fi
# The debug build: its dependencies are optimised as in a release build (Cargo.toml), only
# this workspace's crates are not, and it shares them with the test build; SDXL_BIN points the
# scripts at it.
cargo build --locked -p sdxl-cli --features test-backend
export SDXL_BIN="${SDXL_BIN:-$PWD/target/debug/sdxl}"

status=0
for test in overload faults hostile connections; do
  python3 load_tests/$test.py || status=1
done
# the shared-server test drives the real OpenAI and Cloudflare SDKs, pinned, in the venv the
# client tests use (clients_tests/requirements.txt)
bash clients_tests/venv.sh
target/clients-venv/bin/python load_tests/sharing.py || status=1
python3 load_tests/soak.py --seconds "${SOAK_SECONDS:-600}" || status=1
exit $status
