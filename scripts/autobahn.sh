#!/usr/bin/env bash
# Autobahn TestSuite (WebSocket conformance) against the gateway's real
# WebSocket code: `herald serve` with `[gateway.websocket] test_echo = true`
# echoes every message on its ws listener, and the fuzzing client runs the
# server cases of groups 1-7 (framing, pings/pongs, reserved bits, opcodes,
# fragmentation, UTF-8, close handling) against ws://127.0.0.1:PORT/v1/connect.
#
# Groups 9 (performance: messages up to 16 MiB, over the gateway's 65,540-byte
# message limit), 10 (auto-fragmentation) and 12-13 (permessage-deflate, which
# the gateway does not offer) are not run.
#
# The client is kosoku (PyPI), which drives Autobahn's own case files with a
# runner that works on Python 3; the `autobahntestsuite` package itself
# (25.10.1 too) is Python 2 code and cannot start on Python 3. kosoku is
# installed into a virtualenv under the cargo target dir (git-ignored).
#
# Usage: scripts/autobahn.sh [--io uring|epoll] [--out DIR]
#   HERALD_BIN   the herald binary to run (default: cargo build --bin herald)
#   CI=true      a missing prerequisite fails the run; otherwise it skips
#                (exit 77)
# Writes DIR/index.json (the client's report, one JSON and HTML file per
# case beside it) and DIR/counts.json (per-group counts); prints the table.
# Exits 1 if any case of groups 1-7 FAILED.
set -euo pipefail

KOSOKU_VERSION=0.1.0
GROUPS_RUN=(1 2 3 4 5 6 7)
SKIPPED=77

cd "$(dirname "$0")/.."

io=uring
out=
while [[ $# -gt 0 ]]; do
  case "$1" in
    --io) io=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "autobahn: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$io" in uring|epoll) ;; *) echo "autobahn: --io is uring or epoll" >&2; exit 2 ;; esac

# A prerequisite is missing: fail in CI, skip elsewhere.
missing() {
  if [[ "${CI:-}" == "true" ]]; then
    echo "autobahn: ERROR: $* (CI=true: the conformance run cannot be skipped)" >&2
    exit 1
  fi
  echo "autobahn: SKIPPED: $*" >&2
  exit "$SKIPPED"
}

target_dir=${CARGO_TARGET_DIR:-}
if [[ -z "$target_dir" ]]; then
  target_dir=$(cargo metadata --format-version 1 --no-deps 2>/dev/null |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null) ||
    target_dir=target
fi
cache="$target_dir/autobahn"
out=${out:-"$cache/reports-$io"}

# The fuzzing client, in its own virtualenv (installed once, then reused).
python=
for candidate in python3.11 python3 python; do
  if command -v "$candidate" >/dev/null 2>&1 &&
    "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    python=$candidate
    break
  fi
done
[[ -n "$python" ]] || missing "no Python 3.10 or newer to run the fuzzing client (kosoku)"
venv="$cache/venv"
kosoku="$venv/bin/kosoku"
stamp="$venv/.kosoku-$KOSOKU_VERSION"
if [[ ! -x "$kosoku" || ! -e "$stamp" ]]; then
  echo "autobahn: installing kosoku $KOSOKU_VERSION into $venv" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  "$python" -m venv "$venv" >&2 || missing "cannot create a virtualenv with $python (python3-venv?)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "kosoku==$KOSOKU_VERSION" >&2 ||
    missing "cannot install kosoku==$KOSOKU_VERSION from PyPI"
  "$kosoku" --help >/dev/null 2>&1 || missing "kosoku $KOSOKU_VERSION does not run here"
  touch "$stamp"
fi

# The herald binary.
if [[ -z "${HERALD_BIN:-}" ]]; then
  cargo build --quiet --bin herald >&2
  HERALD_BIN="$target_dir/debug/herald"
fi
[[ -x "$HERALD_BIN" ]] || { echo "autobahn: ERROR: no herald binary at $HERALD_BIN" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/herald-autobahn.XXXXXX")
herald_pid=
cleanup() {
  if [[ -n "$herald_pid" ]] && kill -0 "$herald_pid" 2>/dev/null; then
    kill "$herald_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$herald_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$herald_pid" 2>/dev/null || true
    wait "$herald_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# One app (a config needs one; the echo connections never HELLO, hence the
# long auth timeout), and the echo mode.
cat >"$work/herald.toml" <<'EOF'
node_id = "autobahn"
[gateway]
shards = 1
auth_timeout_secs = 600
drain_timeout_secs = 1
pin_shards = false
[gateway.websocket]
test_echo = true
[[apps]]
id = "autobahn"
api_key = "autobahn-api-key-0123456789"
token_secret = "autobahn-token-secret-0123456789"
EOF

RUST_LOG=${RUST_LOG:-warn} "$HERALD_BIN" serve --io "$io" --config "$work/herald.toml" \
  --data-dir "$work/data" --gateway-listen 127.0.0.1:0 --listener ws=127.0.0.1:0 \
  --api-listen 127.0.0.1:0 >"$work/serve.out" 2>"$work/serve.err" &
herald_pid=$!

url=
for _ in $(seq 300); do
  url=$(sed -n 's/^herald: gateway listening on \(ws:\/\/[^ ]*\) (ws,.*/\1/p' "$work/serve.out")
  [[ -n "$url" ]] && break
  if ! kill -0 "$herald_pid" 2>/dev/null; then
    echo "autobahn: ERROR: herald serve exited before listening:" >&2
    cat "$work/serve.out" "$work/serve.err" >&2
    exit 1
  fi
  sleep 0.1
done
if [[ -z "$url" ]]; then
  echo "autobahn: ERROR: herald serve did not report a ws listener in 30 s:" >&2
  cat "$work/serve.out" "$work/serve.err" >&2
  exit 1
fi

includes=()
for group in "${GROUPS_RUN[@]}"; do includes+=(-i "$group.*"); done
rm -rf "$out"
mkdir -p "$out"
echo "autobahn: kosoku $KOSOKU_VERSION, cases ${GROUPS_RUN[*]/%/.*} against $url (--io $io)" >&2
# kosoku exits 1 when a case does not pass; the report decides below.
set +e
"$kosoku" "$url" "${includes[@]}" -o "$out" >"$work/kosoku.out" 2>&1
kosoku_status=$?
set -e
if [[ ! -s "$out/index.json" ]]; then
  echo "autobahn: ERROR: kosoku wrote no report (exit $kosoku_status):" >&2
  cat "$work/kosoku.out" >&2
  exit 1
fi
if ! kill -0 "$herald_pid" 2>/dev/null; then
  echo "autobahn: ERROR: herald serve died during the run:" >&2
  cat "$work/serve.err" >&2
  exit 1
fi

"$venv/bin/python" - "$out" "${GROUPS_RUN[@]}" <<'EOF'
import json
import sys
from collections import Counter

out, groups = sys.argv[1], sys.argv[2:]
VERDICTS = ["OK", "NON-STRICT", "INFORMATIONAL", "FAILED", "UNIMPLEMENTED"]
# A closing handshake that went wrong fails the case whatever the
# message exchange did.
CLOSE_PASSES = {"OK", "INFORMATIONAL"}

with open(f"{out}/index.json") as f:
    index = json.load(f)
counts = {group: Counter() for group in groups}
failed = []
for agent, cases in index.items():
    for case_id, result in cases.items():
        group = case_id.split(".")[0]
        verdict = result["behavior"]
        if verdict not in VERDICTS or result["behaviorClose"] not in CLOSE_PASSES:
            verdict = "FAILED"  # also kosoku's ERROR: no verdict reached
        counts.setdefault(group, Counter())[verdict] += 1
        if verdict == "FAILED":
            failed.append(
                f"{case_id}: behavior {result['behavior']}, close {result['behaviorClose']}, "
                f"close code {result.get('remoteCloseCode')} ({out}/{result['reportfile']})"
            )

def order(group):
    return int(group) if group.isdigit() else 1 << 30

rows = sorted(counts, key=order)
width = max(len(v) for v in VERDICTS)
print(f"{'group':<6}" + "".join(f"{v:>{width + 2}}" for v in VERDICTS) + f"{'total':>8}")
totals = Counter()
for group in rows:
    c = counts[group]
    totals.update(c)
    print(f"{group + '.*':<6}" + "".join(f"{c[v]:>{width + 2}}" for v in VERDICTS)
          + f"{sum(c.values()):>8}")
print(f"{'all':<6}" + "".join(f"{totals[v]:>{width + 2}}" for v in VERDICTS)
      + f"{sum(totals.values()):>8}")

with open(f"{out}/counts.json", "w") as f:
    json.dump({g: {v: counts[g][v] for v in VERDICTS} for g in rows}, f, indent=2)
    f.write("\n")

empty = [g for g in groups if not counts[g]]
if empty:
    print(f"autobahn: FAILED: no case ran in group(s) {', '.join(empty)}", file=sys.stderr)
if failed:
    print("autobahn: FAILED cases:", file=sys.stderr)
    for line in failed:
        print(f"  {line}", file=sys.stderr)
sys.exit(1 if failed or empty else 0)
EOF
echo "autobahn: all cases of groups ${GROUPS_RUN[*]} pass (report: $out/index.json, counts: $out/counts.json)" >&2
