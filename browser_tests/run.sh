#!/usr/bin/env bash
# End-to-end test of the playground page: starts `sdxl serve` with the tiny test model on a
# free port and drives the page in headless Chromium (browser_tests/playground.mjs).
# Screenshots go to target/browser-artifacts.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's Chromium and Node.js, when missing
packages=()
[ -x /usr/bin/chromium ] || [ -n "${CHROMIUM:-}" ] || packages+=(chromium)
command -v npm >/dev/null || packages+=(nodejs npm)
if [ ${#packages[@]} -gt 0 ]; then
  SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${packages[@]}"
fi
(cd browser_tests && npm ci --no-audit --no-fund)
cargo build --locked -p sdxl-cli

artifacts=target/browser-artifacts
mkdir -p "$artifacts"
log="$artifacts/server.log"
token=test-token
target/debug/sdxl serve --model crates/sdxl-models/tests/fixtures/tiny-sdxl --port 0 \
  --api-key "$token" --default-steps 8 2>"$log" &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT

# --port 0: the start-up line names the port the server got
url=
for _ in $(seq 600); do
  url=$(grep -o 'sdxl listening on http://[0-9.:]*' "$log" | head -n1 | sed 's/^sdxl listening on //') || true
  [ -n "$url" ] && break
  if ! kill -0 "$server" 2>/dev/null; then
    echo "the server exited during start-up:" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 0.2
done
if [ -z "$url" ]; then
  echo "the server did not report its address within 120 s:" >&2
  cat "$log" >&2
  exit 1
fi
for _ in $(seq 300); do
  curl -fsS -o /dev/null "$url/ready" 2>/dev/null && break
  sleep 0.2
done
curl -fsS -o /dev/null "$url/ready"
echo "server ready at $url (log: $log)"

status=0
SDXL_URL="$url" SDXL_TOKEN="$token" ARTIFACTS="$artifacts" node browser_tests/playground.mjs || status=$?
[ "$status" -eq 0 ] || { echo "--- server log (last 40 lines) ---"; tail -n 40 "$log"; }
echo "screenshots: $(pwd)/$artifacts (playground.png, inpaint.png, auth-error.png)"
exit "$status"
