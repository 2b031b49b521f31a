#!/usr/bin/env bash
# Runs Gatehouse on its embedded default: the gateway in front of the built-in simulator backend,
# on loopback, with a development subscription key. Ctrl-C stops everything.
#
#   scripts/run.sh                 # gateway on 127.0.0.1:8080, simulator on 127.0.0.1:9100
#   GATEHOUSE_PORT=8181 scripts/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
port=${GATEHOUSE_PORT:-8080}
sim_port=${GATEHOUSE_SIMULATOR_PORT:-9100}
dev="$root/var/dev"
target="${CARGO_TARGET_DIR:-$root/target}/release"

die() { printf 'scripts/run.sh: %s\n' "$*" >&2; exit 1; }
command -v cargo >/dev/null || die "cargo is missing: install Rust with rustup first"

echo "== building (release)"
cargo build --release --locked -p gatehouse-gateway -p gatehouse-simulator

mkdir -p "$dev"
if [ ! -s "$dev/key" ]; then
  "$target/gatehouse-gateway" keygen | head -n 1 > "$dev/key"
  chmod 600 "$dev/key"
fi
if [ ! -s "$dev/admin-token" ]; then
  "$target/gatehouse-gateway" keygen | head -n 1 > "$dev/admin-token"
  chmod 600 "$dev/admin-token"
fi
key=$(cat "$dev/key")
hash=$(printf '%s' "$key" | "$target/gatehouse-gateway" hash-key)

cat > "$dev/gateway.yaml" <<YAML
# Written by scripts/run.sh: the embedded default. See examples/gateway.yaml for every option.
server:
  listen: 127.0.0.1:$port
  gateway_id: dev
  state_dir: $dev/state
  admin_token: file:$dev/admin-token
  audit:
    database: sqlite:$dev/audit.db
  log_format: text
  shutdown_drain_seconds: 5
snapshot:
  version: 1
  trusted_proxies: [127.0.0.1/32]
  subscriptions:
    - id: dev
      display_name: Development key (scripts/run.sh)
      product: dev
      primary_key_hash: "$hash"
  pools:
    - id: simulator
      deployments: [gpt-4o, gpt-4o-mini, text-embedding-3-small, whisper, tts, dall-e-3]
      serves_resources: true
      members:
        - id: simulator
          kind: azure_openai
          endpoint: http://127.0.0.1:$sim_port
YAML

"$target/gatehouse-simulator" --listen "127.0.0.1:$sim_port" --id simulator --chunk-delay-ms 40 &
sim_pid=$!
trap 'kill "$sim_pid" 2>/dev/null || true' EXIT

cat <<MSG

Gatehouse is starting on http://127.0.0.1:$port  (backend: the SIMULATOR on 127.0.0.1:$sim_port, not a model)
  key:           $key   (also in var/dev/key)
  audit records: var/dev/audit.db (SQLite: tables ApiManagementGatewayLogs, ApiManagementGatewayLlmLog)

Try it:
  curl -s http://127.0.0.1:$port/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21 \\
    -H "api-key: $key" -H 'content-type: application/json' \\
    -d '{"messages":[{"role":"user","content":"Hello"}]}'

MSG
"$target/gatehouse-gateway" serve --config "$dev/gateway.yaml"
