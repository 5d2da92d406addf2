#!/usr/bin/env bash
# The clients people use against `sdxl serve` on the tiny model: the OpenAI, Cloudflare and
# webuiapi Python packages (pinned in requirements.txt, in a venv under target/) and the
# request sequences of Open WebUI, SillyTavern and LibreChat (docs/clients.md).
set -euo pipefail
cd "$(dirname "$0")/.."

bash clients_tests/venv.sh
cargo build --locked -p sdxl-cli
target/clients-venv/bin/python clients_tests/test_clients.py target/debug/sdxl
