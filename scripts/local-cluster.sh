#!/usr/bin/env bash
# Runs a small Herald cluster on this host, for trying cluster mode:
# two room nodes and one control node on the local Redis and MariaDB (or
# PostgreSQL with --postgres), in the order README "Running a cluster"
# gives. Ctrl-C stops the nodes.
#   scripts/local-cluster.sh [--postgres] [ROOMS] [CONTROLS]
set -euo pipefail
cd "$(dirname "$0")/.."

engine=mysql
if [ "${1:-}" = "--postgres" ]; then
    engine=postgres
    shift
fi
rooms="${1:-2}"
controls="${2:-1}"

# 1. The engines, and the database the nodes share.
if [ "$engine" = mysql ]; then
    scripts/start-services.sh redis mariadb
    mariadb -h 127.0.0.1 -u root -e 'CREATE DATABASE IF NOT EXISTS herald'
    database_url="mysql://root@127.0.0.1:3306/herald"
else
    scripts/start-services.sh redis postgresql
    psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'herald'" |
        grep -q 1 || psql -h 127.0.0.1 -U postgres -d postgres -c 'CREATE DATABASE herald'
    database_url="postgres://postgres@127.0.0.1:5432/herald"
fi

cargo build --release --quiet
dir="$(mktemp -d -t herald-cluster.XXXXXX)"
pids=()
stop() {
    kill "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    echo "stopped; configs and logs are in $dir"
}
trap stop EXIT
trap 'exit 130' INT TERM

config() { # node_id
    cat >"$dir/$1.toml" <<EOF
[cluster]
node_id = "$1"
redis_url = "redis://127.0.0.1:6379"
database_url = "$database_url"

[[apps]]
id = "demo"
api_key = "local-cluster-api-key"
token_secret = "local-cluster-token-secret"
EOF
    echo "$dir/$1.toml"
}

# 2. Control nodes (the first one also brings the schema up to date).
for i in $(seq 0 $((controls - 1))); do
    target/release/herald control --config "$(config "control-$i")" \
        --api-listen "127.0.0.1:$((8080 + i))" >"$dir/control-$i.log" 2>&1 &
    pids+=($!)
    sleep 1
done
# 3. Room nodes.
for i in $(seq 0 $((rooms - 1))); do
    target/release/herald room --config "$(config "room-$i")" \
        --gateway-listen "127.0.0.1:$((7070 + i))" \
        --api-listen "127.0.0.1:$((9090 + i))" >"$dir/room-$i.log" 2>&1 &
    pids+=($!)
done
sleep 2
for pid in "${pids[@]}"; do
    kill -0 "$pid" 2>/dev/null || { echo "a node failed to start; see $dir/*.log"; exit 1; }
done

cat <<EOF
Herald cluster running: $rooms room node(s) on 127.0.0.1:7070.., $controls control node(s) on 127.0.0.1:8080..
  dispatch: curl 'http://127.0.0.1:8080/v1/dispatch?app=demo&user=alice&net=wifi'
  token:    target/release/herald token --config $dir/room-0.toml --app demo --user alice
  push:     curl -H 'Authorization: Bearer local-cluster-api-key' -d '{"payload":"hi"}' \\
              http://127.0.0.1:8080/v1/apps/demo/users/alice/messages
Ctrl-C stops the nodes.
EOF
wait
