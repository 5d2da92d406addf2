#!/usr/bin/env bash
# Makes target/clients-venv with the pinned clients of requirements.txt (again when that
# file changes); the client tests and load_tests/sharing.py run in it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/clients-venv
if ! cmp -s clients_tests/requirements.txt "$venv/requirements.txt" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r clients_tests/requirements.txt
  cp clients_tests/requirements.txt "$venv/requirements.txt"
fi
