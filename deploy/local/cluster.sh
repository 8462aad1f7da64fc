#!/usr/bin/env bash
# The whole PSA-Serve system on one machine, on loopback: 2 KV service
# shards, 2 compute workers and the router.
#
#   deploy/local/cluster.sh start [MODEL]        start everything, wait until healthy
#                                               (MODEL: a GGUF path or registered name)
#   deploy/local/cluster.sh status               show what runs where
#   deploy/local/cluster.sh replace-worker NAME  a rolling update of one worker (e.g. worker0):
#                                               start its successor, list it in the router's
#                                               workers file instead, stop it (SIGTERM)
#   deploy/local/cluster.sh stop                 stop everything (SIGTERM, then SIGKILL)
#
# The router discovers the workers from $PSA_CLUSTER_DIR/workers.txt, re-read
# at every health check, as Kubernetes' router resolves a headless Service:
# a worker that leaves it is forgotten with its metric series.
# Environment: PSA_BUILD_DIR (default build), PSA_CLUSTER_DIR (logs, pids,
# ports; default .cluster), PSA_ROUTER_PORT (default 7000), PSA_HTTP_PORT (the
# router's OpenAI-compatible API; default 8000, or 0 when PSA_ROUTER_PORT is 0),
# PSA_WORKER_THREADS (default: cores / 2, at least 1), PSA_KV_CAPACITY (per shard, default 2GiB),
# PSA_KV_POOL (each worker's KV block pool, default 512MiB; 0: no pool, every
# sequence keeps its whole KV in the worker), PSA_SECURE (1: TLS on every
# hop, mutual between workers and KV shards and from the router to the
# workers, HTTPS, and an API key; certificates and the key are made on first
# start in $PSA_CLUSTER_DIR/tls/: ca.pem for clients, api_key for the key). The router and the workers share
# $PSA_CLUSTER_DIR/resume.secret (made on first start if absent, mode 600): the
# router signs the resumes it sends when a worker fails mid-stream with it.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD="${PSA_BUILD_DIR:-build}"
DIR="${PSA_CLUSTER_DIR:-.cluster}"
ROUTER_PORT="${PSA_ROUTER_PORT:-7000}"
HTTP_PORT="${PSA_HTTP_PORT:-$([ "$ROUTER_PORT" = 0 ] && echo 0 || echo 8000)}"
THREADS="${PSA_WORKER_THREADS:-$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))}"
CAPACITY="${PSA_KV_CAPACITY:-2GiB}"
POOL="${PSA_KV_POOL:-512MiB}"
SECURE="${PSA_SECURE:-0}"

port_of() {  # port_of NAME KEY
  sed -n "s/^$2=//p" "$DIR/$1.ports" 2>/dev/null
}

launch() {  # launch NAME BINARY ARGS...
  local name="$1"; shift
  rm -f "$DIR/$name.ports"
  "$@" --port_file="$DIR/$name.ports" >"$DIR/$name.log" 2>&1 &
  echo $! >"$DIR/$name.pid"
}

wait_for() {  # wait_for NAME SECONDS
  local name="$1" deadline=$(( SECONDS + $2 ))
  while [ ! -s "$DIR/$name.ports" ]; do
    if ! kill -0 "$(cat "$DIR/$name.pid")" 2>/dev/null; then
      echo "cluster: $name exited during start-up; its log ($DIR/$name.log) ends with:" >&2
      tail -5 "$DIR/$name.log" >&2
      stop_all
      exit 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      echo "cluster: $name did not start within $2 s (see $DIR/$name.log)" >&2
      stop_all
      exit 1
    fi
    sleep 0.1
  done
}

stop_one() {  # stop_one NAME: SIGTERM, up to 15 s for a clean exit, then SIGKILL
  local pid; pid="$(cat "$DIR/$1.pid")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$DIR/$1.pid"
}

# TLS flags of each role when PSA_SECURE=1 (empty otherwise).
tls_flags() {  # tls_flags kv|worker|router
  [ "$SECURE" = 1 ] || return 0
  local t="$DIR/tls"
  echo "--tls_cert_file=$t/server.pem --tls_key_file=$t/server.key"
  case "$1" in
    kv) echo "--tls_client_ca_file=$t/ca.pem" ;;
    worker) echo "--tls_client_ca_file=$t/ca.pem --kv_tls_ca_file=$t/ca.pem" \
                 "--kv_tls_cert_file=$t/client.pem --kv_tls_key_file=$t/client.key" ;;
    router) echo "--worker_tls_ca_file=$t/ca.pem --worker_tls_cert_file=$t/client.pem" \
                 "--worker_tls_key_file=$t/client.key --api_keys_file=$t/api_keys.txt" ;;
  esac
}

make_tls() {  # a CA, a server certificate for 127.0.0.1/localhost, a client one, a key
  local t="$DIR/tls"
  [ -s "$t/api_keys.txt" ] && return 0
  command -v openssl >/dev/null || { echo "cluster: PSA_SECURE=1 needs openssl" >&2; exit 1; }
  mkdir -p "$t"
  (
    cd "$t" && umask 077
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=psa-local-ca \
      -keyout ca.key -out ca.pem 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >san.ext
    for who in server client; do
      openssl req -newkey rsa:2048 -nodes -subj "/CN=psa-local-$who" \
        -keyout "$who.key" -out "$who.csr" 2>/dev/null
      openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 \
        -extfile san.ext -out "$who.pem" 2>/dev/null
    done
    key="sk-local-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    echo "$key" >api_key
    echo "$key local" >api_keys.txt
  )
}

# psactl against the router, with TLS and the key when on.
psactl_args() {
  [ "$SECURE" = 1 ] || return 0
  echo "--tls_ca_file=$DIR/tls/ca.pem --api_key=$(cat "$DIR/tls/api_key")"
}

launch_worker() {  # launch_worker NAME, with the settings `start` saved
  # shellcheck disable=SC1091
  . "$DIR/worker.env"
  # shellcheck disable=SC2046
  launch "$1" "$BUILD/compute_worker/psa-worker" --model="$MODEL" \
    --listen=127.0.0.1:0 --metrics_listen=127.0.0.1:0 --threads="$THREADS" \
    --kv_shards="$SHARDS" --kv_pool="$POOL" --resume_secret_file="$SECRET" \
    $(tls_flags worker)
}

write_workers() {  # write_workers NAME...: the router's workers file, replaced atomically
  for w in "$@"; do echo "127.0.0.1:$(port_of "$w" grpc_port)"; done >"$DIR/workers.txt.tmp"
  mv "$DIR/workers.txt.tmp" "$DIR/workers.txt"
}

stop_all() {
  local pids=()
  for f in "$DIR"/*.pid; do
    [ -e "$f" ] || continue
    local pid; pid="$(cat "$f")"
    kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    rm -f "$f"
  done
  for pid in "${pids[@]}"; do  # up to 15 s for a clean exit, then force
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
}

case "${1:-}" in
  start)
    MODEL="${2:-${PSA_MODEL:-}}"
    [ -n "$MODEL" ] || MODEL="$(scripts/fetch_model.sh)"
    [ -f "$MODEL" ] || MODEL="$(scripts/fetch_model.sh "$MODEL")"  # a registered name
    for bin in kv_service/psa-kv-service compute_worker/psa-worker router/psa-router; do
      [ -x "$BUILD/$bin" ] || { echo "cluster: $BUILD/$bin is missing; run scripts/build.sh" >&2; exit 1; }
    done
    mkdir -p "$DIR"
    if ls "$DIR"/*.pid >/dev/null 2>&1; then
      echo "cluster: already running (deploy/local/cluster.sh stop first)" >&2; exit 1
    fi
    rm -f "$DIR"/worker*.ports  # from earlier runs; replace-worker numbers after them
    SECRET="$DIR/resume.secret"
    if [ ! -s "$SECRET" ]; then
      (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$SECRET")
    fi
    [ "$SECURE" = 1 ] && make_tls
    for i in 0 1; do
      # shellcheck disable=SC2046
      launch "kv$i" "$BUILD/kv_service/psa-kv-service" --listen=127.0.0.1:0 \
        --metrics_listen=127.0.0.1:0 --capacity="$CAPACITY" $(tls_flags kv)
    done
    for i in 0 1; do wait_for "kv$i" 20; done
    SHARDS="127.0.0.1:$(port_of kv0 grpc_port),127.0.0.1:$(port_of kv1 grpc_port)"
    printf 'MODEL=%q\nTHREADS=%q\nSHARDS=%q\nPOOL=%q\nSECRET=%q\nSECURE=%q\n' \
      "$MODEL" "$THREADS" "$SHARDS" "$POOL" "$SECRET" "$SECURE" >"$DIR/worker.env"
    for i in 0 1; do launch_worker "worker$i"; done
    for i in 0 1; do wait_for "worker$i" 120; done
    write_workers worker0 worker1
    WORKERS="$(paste -sd, "$DIR/workers.txt")"
    # shellcheck disable=SC2046
    launch router "$BUILD/router/psa-router" --listen="127.0.0.1:$ROUTER_PORT" \
      --metrics_listen=127.0.0.1:0 --http_listen="127.0.0.1:$HTTP_PORT" \
      --workers_file="$DIR/workers.txt" \
      --resume_secret_file="$SECRET" $(tls_flags router)
    wait_for router 20
    ROUTER_PORT="$(port_of router grpc_port)"  # the real one if 0 was asked for
    # Healthy means the router sees both workers serving.
    for _ in $(seq 100); do
      # shellcheck disable=SC2046
      if "$BUILD/client/psactl" --target="127.0.0.1:$ROUTER_PORT" --timeout_s=5 $(psactl_args) \
          info >/dev/null 2>&1; then
        break
      fi
      sleep 0.1
    done
    HTTP_PORT="$(port_of router http_port)"
    SCHEME=http; [ "$SECURE" = 1 ] && SCHEME=https
    echo "cluster: up — router 127.0.0.1:$ROUTER_PORT (OpenAI API $SCHEME://127.0.0.1:$HTTP_PORT/v1), workers $WORKERS, KV shards $SHARDS (logs in $DIR/)"
    if [ "$SECURE" = 1 ]; then
      echo "cluster: TLS and an API key on — CA $DIR/tls/ca.pem, key in $DIR/tls/api_key" \
           "(psactl --tls_ca_file=$DIR/tls/ca.pem --api_key=\$(cat $DIR/tls/api_key); HTTPS)"
    fi
    ;;
  status)
    for f in "$DIR"/*.pid; do
      [ -e "$f" ] || { echo "cluster: not running"; exit 0; }
      name="$(basename "$f" .pid)"
      state=stopped; kill -0 "$(cat "$f")" 2>/dev/null && state=running
      http=""; [ -n "$(port_of "$name" http_port)" ] && http=", HTTP port $(port_of "$name" http_port)"
      echo "$name: $state, grpc port $(port_of "$name" grpc_port), metrics port $(port_of "$name" metrics_port)$http"
    done
    ;;
  replace-worker)
    OLD="${2:-}"
    case "$OLD" in worker*) ;; *) echo "cluster: replace-worker takes a worker's name (see status)" >&2; exit 2 ;; esac
    [ -e "$DIR/$OLD.pid" ] || { echo "cluster: no running $OLD (see status)" >&2; exit 1; }
    n=0; while [ -e "$DIR/worker$n.ports" ] || [ -e "$DIR/worker$n.pid" ]; do n=$(( n + 1 )); done
    NEW="worker$n"
    launch_worker "$NEW"
    wait_for "$NEW" 120
    KEEP=()
    for f in "$DIR"/worker*.pid; do
      w="$(basename "$f" .pid)"
      [ "$w" = "$OLD" ] || KEEP+=("$w")
    done
    write_workers "${KEEP[@]}"  # the router stops sending to OLD at its next poll
    NEW_ADDR="127.0.0.1:$(port_of "$NEW" grpc_port)"
    METRICS="http://127.0.0.1:$(port_of router metrics_port)/metrics"
    for _ in $(seq 200); do  # the router sees the successor serving
      python3 -c 'import sys, urllib.request as u
sys.exit(0 if sys.argv[2] in u.urlopen(sys.argv[1], timeout=2).read().decode() else 1)' \
        "$METRICS" "psa_router_worker_healthy{worker=\"$NEW_ADDR\"} 1" 2>/dev/null && break
      sleep 0.1
    done
    stop_one "$OLD"  # running generations finish within its grace, or resume on another
    rm -f "$DIR/$OLD.ports"
    echo "cluster: $OLD replaced by $NEW ($NEW_ADDR)"
    ;;
  stop)
    stop_all
    echo "cluster: stopped"
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p'
    exit 2
    ;;
esac
