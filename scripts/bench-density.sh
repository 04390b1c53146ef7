#!/usr/bin/env bash
# The whole density run: builds release binaries, then
#   1. herald-bench idle at 150,000 connections over 10 gateway processes
#      (bytes per connection, kernel cost of a bare socket in the same run,
#      heartbeat CPU, peak memory while pushing to every connection);
#   2. herald-bench peers at 100,000 connections: Herald, Mosquitto and the
#      NATS server side by side;
#   3. herald-bench connect at 100,000 with the epoll driver, for the
#      io_uring/epoll comparison.
# Needs: mosquitto and nats-server on PATH, ~8 GiB free memory, and a
# 127.0.0.0/8 loopback (source addresses 127.2.0.1 and up). Results go to
# bench-results/ as JSON; the tables are printed.
set -eu
cd "$(dirname "$0")/.."
cargo build --release -p herald -p herald-bench
bench=target/release/herald-bench
mkdir -p bench-results
"$bench" idle --connections 150000 --gateways 10 --duration 60 --json bench-results/idle-150k.json
"$bench" peers --connections 100000 --json bench-results/peers-100k.json
"$bench" connect --connections 100000 --io epoll --json bench-results/connect-100k-epoll.json
"$bench" connect --connections 100000 --io uring --json bench-results/connect-100k-uring.json
