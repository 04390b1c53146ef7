#!/usr/bin/env bash
# Starts the local services Herald's benchmarks and cluster tests use, only
# where they are not already running, and waits until each answers. With no
# arguments it also installs the test tools (scripts/install-test-tools.sh:
# chromium, the JS SDK's npm packages, nats-server and schemathesis).
#   scripts/start-services.sh              # all of them
#   scripts/start-services.sh redis nats   # only these
# Prints one line per service; exits non-zero if any failed to start.
set -u

listening() { # port
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

start() { # name port command...
    local name="$1" port="$2"
    shift 2
    if listening "$port"; then
        echo "$name: already running on $port"
        return 0
    fi
    if ! "$@" >/dev/null 2>&1; then
        echo "$name: FAILED to start ($*)"
        return 1
    fi
    for _ in $(seq 1 100); do
        if listening "$port"; then
            echo "$name: started on $port"
            return 0
        fi
        sleep 0.1
    done
    echo "$name: FAILED: started but nothing answers on $port after 10 s"
    return 1
}

postgresql() {
    start postgresql 5432 pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
}
redis() {
    start redis 6379 redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 \
        --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
}
mariadb() {
    start mariadb 3306 start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
}
mosquitto() {
    start mosquitto 1883 mosquitto -d -c /etc/mosquitto/mosquitto.conf
}
nats() {
    start nats 4222 start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server \
        -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
}

services=("$@")
failed=0
if [ ${#services[@]} -eq 0 ]; then
    services=(postgresql redis mariadb mosquitto nats)
    "$(dirname "$0")/install-test-tools.sh" || { echo "test tools: FAILED to install"; failed=1; }
fi
for service in "${services[@]}"; do
    case "$service" in
        postgresql|redis|mariadb|mosquitto|nats) "$service" || failed=1 ;;
        *) echo "unknown service: $service (postgresql redis mariadb mosquitto nats)"; failed=1 ;;
    esac
done
exit "$failed"
