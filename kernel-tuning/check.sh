#!/usr/bin/env bash
# Checks this host's limits and sysctls against what ~3 million concurrent
# connections need (kernel-tuning/sysctl.conf), prints current vs
# recommended, and changes nothing unless asked.
#
#   kernel-tuning/check.sh              # report; exit 1 if something is low
#   kernel-tuning/check.sh --apply      # also sysctl -w the low values
#   kernel-tuning/check.sh --apply --persist   # and write /etc/sysctl.d/60-herald.conf
#
# It never lowers a value that is already higher than recommended.
set -u

here="$(cd "$(dirname "$0")" && pwd)"
apply=0
persist=0
for arg in "$@"; do
    case "$arg" in
        --apply) apply=1 ;;
        --persist) persist=1 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

low=0
printf '%-34s %-26s %-26s %s\n' setting current recommended status

report() { # name current recommended status
    printf '%-34s %-26s %-26s %s\n' "$1" "$2" "$3" "$4"
}

# Compares whitespace-separated numbers field by field: OK when every
# current field is >= the recommended one.
at_least() {
    local -a cur rec
    read -r -a cur <<<"$1"
    read -r -a rec <<<"$2"
    local i
    for i in "${!rec[@]}"; do
        [ "${cur[$i]:-0}" -ge "${rec[$i]}" ] || return 1
    done
}

while read -r line; do
    case "$line" in ''|'#'*) continue ;; esac
    key="${line%%=*}"; key="${key// /}"
    want="${line#*=}"; want="$(echo "$want" | xargs)"
    path="/proc/sys/${key//.//}"
    if [ ! -e "$path" ]; then
        report "$key" "(absent)" "$want" "not loaded / not in this kernel"
        continue
    fi
    have="$(xargs <"$path")"
    ok=1
    case "$key" in
        kernel.io_uring_disabled) [ "$have" = 0 ] || ok=0 ;;
        net.ipv4.ip_local_port_range)
            read -r hlo hhi <<<"$have"; read -r wlo whi <<<"$want"
            [ "$hlo" -le "$wlo" ] && [ "$hhi" -ge "$whi" ] || ok=0 ;;
        net.ipv4.tcp_rmem|net.ipv4.tcp_wmem)
            # Only the maximum must be large enough; small min/default are
            # what keeps idle sockets cheap.
            read -r _ _ hmax <<<"$have"; read -r _ _ wmax <<<"$want"
            [ "$hmax" -ge "$wmax" ] || ok=0 ;;
        net.ipv4.tcp_tw_reuse) [ "$have" = "$want" ] || ok=0 ;;
        net.ipv4.tcp_fin_timeout)
            [ "$have" -le "$want" ] || ok=0 ;;
        *) at_least "$have" "$want" || ok=0 ;;
    esac
    if [ "$ok" = 1 ]; then
        report "$key" "$have" "$want" OK
    else
        low=1
        report "$key" "$have" "$want" LOW
        if [ "$apply" = 1 ]; then
            sysctl -q -w "$key=$want" && echo "  applied: $key = $want"
        else
            echo "  would run: sysctl -w $key=\"$want\""
        fi
    fi
done <"$here/sysctl.conf"

nofile_soft="$(ulimit -Sn)"; nofile_hard="$(ulimit -Hn)"
for pair in "nofile (soft):$nofile_soft" "nofile (hard):$nofile_hard"; do
    name="${pair%%:*}"; value="${pair#*:}"
    if [ "$value" = unlimited ] || [ "$value" -ge 3100000 ]; then
        report "$name" "$value" 3100000 OK
    else
        low=1
        report "$name" "$value" 3100000 "LOW (set LimitNOFILE, herald.service.d/limits.conf)"
    fi
done
memlock="$(ulimit -l)"
report "memlock (KiB)" "$memlock" "65536 (kernels < 5.12)" \
    "$( { [ "$memlock" = unlimited ] || [ "$memlock" -ge 65536 ]; } && echo OK || echo 'LOW on kernels < 5.12')"

if [ "$apply" = 1 ] && [ "$persist" = 1 ]; then
    install -m 0644 "$here/sysctl.conf" /etc/sysctl.d/60-herald.conf &&
        echo "wrote /etc/sysctl.d/60-herald.conf"
fi
exit "$low"
