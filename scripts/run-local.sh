#!/usr/bin/env bash
# Runs a local lmskv cluster and the LMS API on it, with the demo data.
#
#   scripts/run-local.sh [--bin-dir DIR] [--fuzz SECONDS]
#
# Starts `lmskv local up` in the background, waits until it answers, starts
# `lms-api --seed-demo` and waits until /readyz is 200, prints the URL and the
# demo accounts, and then either stays in the foreground until Ctrl-C
# (default) or, with --fuzz, runs schemathesis against /openapi.json for the
# given number of seconds and exits with its status. Everything it started is
# stopped on exit.
set -euo pipefail

BIN_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lmskv-target}/release"
FUZZ_SECONDS=""
NODES="${NODES:-3}"
BASE_PORT="${BASE_PORT:-7001}"
DATA_DIR="${DATA_DIR:-./lmskv-data}"
API_LISTEN="${API_LISTEN:-127.0.0.1:8080}"
SCHEMATHESIS="${SCHEMATHESIS:-schemathesis}"
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) BIN_DIR="$2"; shift 2 ;;
    --fuzz) FUZZ_SECONDS="$2"; shift 2 ;;
    *) echo "run-local: unknown argument $1" >&2; exit 2 ;;
  esac
done

ENDPOINTS=""
for ((i = 0; i < NODES; i++)); do
  ENDPOINTS+="${ENDPOINTS:+,}127.0.0.1:$((BASE_PORT + i))"
done
# A fresh secret per run unless one is given; tokens do not outlive the run.
# It reaches lms-api through its environment, never its command line (which
# any local user can read in `ps`).
export LMS_JWT_SECRET="${LMS_JWT_SECRET:-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
URL="http://$API_LISTEN"

# The node settings the LMS relies on (the same as lms_api::keys::node_config_toml,
# which a unit test checks): one range per LMS table from the start, and
# automatic splits that never cut one course's keys `course/<cid>/...`, so
# its atomic batches stay in one range.
mkdir -p "$DATA_DIR"
NODE_CONFIG="$DATA_DIR/lmskv-node.toml"
cat >"$NODE_CONFIG" <<'TOML'
pre_split_keys = ["catalog/", "course/", "email/", "export/", "job/", "jobdead/", "jobdone/", "notif/", "refresh/", "seq/", "user/", "usercourse/"]
split_rows = [{ prefix = "course/", id_len = 8 }]
TOML

cluster_pid=""
api_pid=""
# Ctrl-C reaches the whole process group: the API and the cluster stop on
# their own, so they get up to 15 s before being asked again. Otherwise
# (SIGTERM, errors, the end of a fuzz run) they are asked to stop at once.
interrupted=""
stop() { # PID
  if [ -n "$interrupted" ]; then
    for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.3; done
  fi
  kill -TERM "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
cleanup() {
  trap - EXIT INT TERM
  if [ -n "$api_pid" ]; then stop "$api_pid"; fi
  if [ -n "$cluster_pid" ]; then stop "$cluster_pid"; fi
}
trap cleanup EXIT
trap 'interrupted=1; exit 130' INT
trap 'exit 143' TERM

wait_until() { # DESCRIPTION SECONDS COMMAND...
  local what="$1" secs="$2"; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then echo "run-local: $what did not happen within ${secs}s" >&2; exit 1; fi
    sleep 0.3
  done
}

echo "Starting a local $NODES-node lmskv cluster in $DATA_DIR (ports $BASE_PORT+)."
"$BIN_DIR/lmskv" local up --nodes "$NODES" --data-dir "$DATA_DIR" --base-port "$BASE_PORT" \
  --node-bin "$BIN_DIR/lmskv-node" --config "$NODE_CONFIG" &
cluster_pid=$!
wait_until "the cluster answering" 60 "$BIN_DIR/lmskv" --endpoints "$ENDPOINTS" kv scan --limit 1

if [ -n "$FUZZ_SECONDS" ]; then
  # The fuzzer sends bursts; it tests handlers, not the rate limiter.
  export LMS_RATE_LIMIT_IP_PER_S=100000 LMS_RATE_LIMIT_IP_BURST=100000
  export LMS_RATE_LIMIT_USER_PER_S=100000 LMS_RATE_LIMIT_USER_BURST=100000
  export LMS_LOGIN_ATTEMPTS_PER_MIN=1000000 LMS_LOGIN_ATTEMPTS_BURST=100000
fi
# Logs: JSON (the service's default, for log collectors) unless a person
# watches this terminal (`make run`), who gets one readable line per event.
# LMS_LOG_FORMAT chooses either way.
if [ -z "${LMS_LOG_FORMAT:-}" ] && [ -t 2 ]; then export LMS_LOG_FORMAT=text; fi
echo "Starting lms-api on $URL."
LMS_LOG="${LMS_LOG:-warn,lms_api=info}" "$BIN_DIR/lms-api" --listen "$API_LISTEN" --lmskv-endpoints "$ENDPOINTS" \
  --seed-demo true &
api_pid=$!
wait_until "lms-api becoming ready" 60 curl -sf "$URL/readyz"

cat <<INFO

LMS API ready: $URL   (Swagger UI: $URL/docs, OpenAPI: $URL/openapi.json)
Demo accounts (password: demo-password):
  admin    admin@lms.local
  teachers turing@lms.local, hopper@lms.local
  students student1@lms.local .. student4@lms.local
Try:
  curl -s -X POST $URL/api/v1/auth/login -H 'content-type: application/json' \\
       -d '{"email":"student1@lms.local","password":"demo-password"}'
INFO

if [ -n "$FUZZ_SECONDS" ]; then
  token=$(curl -sf -X POST "$URL/api/v1/auth/login" -H 'content-type: application/json' \
    -d '{"email":"admin@lms.local","password":"demo-password"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  echo "Running schemathesis for ${FUZZ_SECONDS}s (check: no 5xx)."
  # One worker: several threads trip a CPython 3.11 ast.parse race inside hypothesis.
  "$SCHEMATHESIS" run "$URL/openapi.json" --checks not_a_server_error \
    -H "Authorization: Bearer $token" --max-time "$FUZZ_SECONDS" --workers 1 \
    --phases examples,coverage,fuzzing --suppress-health-check all
  exit $?
fi
echo "Ctrl-C stops the API and the cluster."
wait "$api_pid" || true
# The API ends only when stopped; the signal that stopped it reached the cluster too.
interrupted=1
