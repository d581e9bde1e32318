#!/usr/bin/env bash
# Launch the current slot of a hero-rollouts schedule on a running Ray cluster (cron example).
#
# The slot id hero-<name>-<YYYYmmddTHHMM> (UTC, floored to the period) is the run id and the Ray
# submission id, so a slot launches at most once; a slot whose attempt failed is resumed by
# launching it again (attempt ids <slot>-r1, <slot>-r2 resume the same run), and a complete slot
# is a no-op. To resume a past slot: HERO_AT=2026-11-21T02:00Z cluster/cron/generate-slot.sh
#
# Needs: RAY_ADDRESS (the dashboard, e.g. http://127.0.0.1:8265), the cluster's Ray token in
# ~/.ray/auth_token, and this repository with its virtual environment. No object-store
# credentials: the cluster's nodes have their own.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${HERO_PYTHON:-$repo/.venv/bin/python}"
name="${HERO_SCHEDULE_NAME:-nightly}"
period_minutes="${HERO_PERIOD_MINUTES:-1440}"
config="${HERO_CONFIG:-jobs/configs/aether-gpu.yaml}"
at="${HERO_AT:-$(date -u +%Y-%m-%dT%H:%M:%SZ)}"
: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray dashboard address, e.g. http://127.0.0.1:8265}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

cd "$repo"
slot="$("$python" jobs/scheduled.py slot-id --name "$name" --period-minutes "$period_minutes" --at "$at")"
echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) slot $slot -> $RAY_ADDRESS"

generate=(python jobs/generate.py --config "$config")
if [[ -n "${HERO_INPUT:-}" ]]; then generate+=(--input "$HERO_INPUT"); fi
if [[ -n "${HERO_OUTPUT:-}" ]]; then generate+=(--output "$HERO_OUTPUT"); fi

exec "$python" jobs/scheduled.py submit --name "$name" --period-minutes "$period_minutes" \
    --at "$at" --address "$RAY_ADDRESS" --working-dir . -- "${generate[@]}"
