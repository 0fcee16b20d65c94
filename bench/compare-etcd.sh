#!/usr/bin/env bash
# Side-by-side benchmark: a 3-member etcd and a 3-node Quiver on 127.0.0.1, one system at a time,
# alternating etcd, Quiver, etcd, Quiver ... over --reps repetitions, every workload through the
# same harness (quiver-bench). Writes the comparison into docs/benchmarks.md, section
# "Side-by-side with etcd".
#
# Usage: bench/compare-etcd.sh [--quick] [--reps N] [--workloads W1,W2,...] [--etcd-only]
#                              [--quiver-only] [--no-docs] [--bench-args "EXTRA FLAGS"]
#   --quick       0.5 s warm-up + 2 s per workload, 10K records, 1 rep: about 75 s on 2 cores
#                 once built (a first build of quiver-bench with the etcd backend takes minutes)
#   --reps N      repetitions per system [default 3, or 1 with --quick]
#   --workloads   workloads to run [default all: W1..W10, W12]
#   --etcd-only   do not try Quiver
#   --quiver-only do not run etcd (A/B runs of Quiver builds; implies --no-docs)
#   --no-docs     print the table, leave docs/benchmarks.md alone
#   --bench-args  extra flags for every quiver-bench run (e.g. "--duration 30")
# Environment: CARGO_TARGET_DIR (build dir), BENCH_TMP (where data dirs go; must be on the disk
# you want to measure, not tmpfs) [default /var/tmp], ETCD_BASE_PORT [default 22379],
# QUIVER_BASE_PORT [default 27400], QUIVER_BIN (a prebuilt `quiver` binary), BENCH_BIN (a
# prebuilt `quiver-bench`: with QUIVER_BIN nothing is built), RUNS_OUT (append the JSON lines
# there too), RUN_LABEL (prefix of each run's label, e.g. the build's name).
#
# Installs etcd (Debian: etcd-server, etcd-client), protoc (protobuf-compiler, needed to build
# the etcd backend) and jq when missing. Everything binds 127.0.0.1; every process started here is
# killed on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
QUICK=0
REPS=""
WORKLOADS=all
ETCD_ONLY=0
QUIVER_ONLY=0
WRITE_DOCS=1
EXTRA=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --reps) REPS=$2; shift ;;
        --workloads) WORKLOADS=$2; shift ;;
        --etcd-only) ETCD_ONLY=1 ;;
        --quiver-only) QUIVER_ONLY=1; WRITE_DOCS=0 ;;
        --no-docs) WRITE_DOCS=0 ;;
        --bench-args) EXTRA=$2; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "compare-etcd.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ -n $REPS ]] || REPS=$((QUICK ? 1 : 3))
MODE_FLAGS=()
[[ $QUICK == 1 ]] && MODE_FLAGS+=(--quick)

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
# Below Linux's ephemeral range (32768-60999 by default): a port in it can be held by any
# outgoing connection of an earlier run (the bench makes thousands), and a node that cannot bind
# its port does not start.
ETCD_BASE_PORT=${ETCD_BASE_PORT:-22379}
QUIVER_BASE_PORT=${QUIVER_BASE_PORT:-27400}
mkdir -p "${BENCH_TMP:-/var/tmp}"
TMP=$(mktemp -d "${BENCH_TMP:-/var/tmp}/compare-etcd.XXXXXX")
OUT_DIR=$CARGO_TARGET_DIR/compare-etcd
mkdir -p "$OUT_DIR"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RUNS=$OUT_DIR/runs-$STAMP.jsonl
: > "$RUNS"

# ---- processes: every pid started here, killed on exit --------------------------------------
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

T_START=$(date +%s)
log() { echo "== [$(( $(date +%s) - T_START )) s] $*" >&2; }

# ---- install ----------------------------------------------------------------------------------
APT_UPDATED=0
apt_install() {
    if [[ $APT_UPDATED == 0 ]]; then apt-get update -q >/dev/null; APT_UPDATED=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
}
if [[ $QUIVER_ONLY == 0 ]] && { ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; }; then
    log "installing etcd from the system packages"
    apt_install etcd-server etcd-client
fi
if ! command -v jq >/dev/null; then
    log "installing jq (reads \`quiver status --json\` while the Quiver cluster assembles)"
    apt_install jq
fi
# The etcd backend of quiver-bench needs protoc to build; a Quiver-only run does not build it.
FEATURES=(--features quiver-bench/etcd)
[[ $QUIVER_ONLY == 1 ]] && FEATURES=()
if [[ ${#FEATURES[@]} -gt 0 && -z ${BENCH_BIN:-} ]] && ! command -v protoc >/dev/null; then
    log "installing protoc (building the etcd backend needs it)"
    apt_install protobuf-compiler
fi

# One cargo invocation for both binaries: building them separately would build the shared
# dependencies twice (different feature sets).
BUILD_PKGS=()
[[ -z ${BENCH_BIN:-} ]] && BUILD_PKGS+=(-p quiver-bench)
[[ $ETCD_ONLY == 0 && -z ${QUIVER_BIN:-} ]] && BUILD_PKGS+=(-p cli)
if [[ ${#BUILD_PKGS[@]} -gt 0 ]]; then
    log "building ${BUILD_PKGS[*]} (release${FEATURES[*]:+, quiver-bench/etcd})"
    if ! (cd "$ROOT" && cargo build --release -q "${BUILD_PKGS[@]}" "${FEATURES[@]}") \
        >"$TMP/build.log" 2>&1; then
        if [[ ${#BUILD_PKGS[@]} -gt 2 ]]; then
            log "that failed; building quiver-bench alone (Quiver will be skipped)"
            tail -n 5 "$TMP/build.log" >&2
            (cd "$ROOT" && cargo build --release -q -p quiver-bench "${FEATURES[@]}")
            QUIVER_BUILD_FAILED=1
        else
            cat "$TMP/build.log" >&2
            exit 1
        fi
    fi
fi
BENCH=${BENCH_BIN:-$CARGO_TARGET_DIR/release/quiver-bench}

# ---- etcd ---------------------------------------------------------------------------------------
ETCD_PIDS=()
ETCD_ENDPOINTS=""
start_etcd() {
    local dir=$TMP/etcd cluster="" i
    rm -rf "$dir"; mkdir -p "$dir"
    for i in 0 1 2; do
        cluster+="${cluster:+,}e$i=http://127.0.0.1:$((ETCD_BASE_PORT + 10 * i + 1))"
    done
    ETCD_PIDS=(); ETCD_ENDPOINTS=""
    for i in 0 1 2; do
        local c=$((ETCD_BASE_PORT + 10 * i)) p=$((ETCD_BASE_PORT + 10 * i + 1))
        # Default durability: etcd fsyncs its WAL before acknowledging every commit.
        etcd --name "e$i" --data-dir "$dir/e$i" \
            --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
            --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
            --initial-cluster "$cluster" --initial-cluster-state new \
            --initial-cluster-token "bench-$$" --logger zap --log-level warn \
            >"$dir/e$i.log" 2>&1 &
        PIDS+=($!); ETCD_PIDS+=($!)
        ETCD_ENDPOINTS+="${ETCD_ENDPOINTS:+,}http://127.0.0.1:$c"
    done
    local t
    for t in $(seq 1 100); do
        if ETCDCTL_API=3 etcdctl --endpoints "$ETCD_ENDPOINTS" endpoint health >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    echo "etcd did not become healthy; logs in $dir" >&2
    tail -n 20 "$dir"/e*.log >&2
    return 1
}
# Stop the processes whose pids are the arguments (children of this script) and reap them.
stop_pids() {
    local p
    for p in "$@"; do kill "$p" 2>/dev/null || true; done
    for p in "$@"; do wait "$p" 2>/dev/null || true; done
}
stop_etcd() {
    stop_pids "${ETCD_PIDS[@]}"
    ETCD_PIDS=()
    rm -rf "$TMP/etcd"
}
run_etcd() {
    local rep=$1
    log "etcd, rep $rep/$REPS"
    start_etcd
    log "etcd is up"
    local pids
    pids=$(IFS=,; echo "${ETCD_PIDS[*]}")
    # shellcheck disable=SC2086
    "$BENCH" --backend etcd --endpoints "$ETCD_ENDPOINTS" --server-pids "$pids" \
        --workloads "$WORKLOADS" --label "${RUN_LABEL:+$RUN_LABEL }rep=$rep" --json-out "$RUNS" --format table \
        "${MODE_FLAGS[@]}" $EXTRA
    stop_etcd
}

# ---- Quiver -------------------------------------------------------------------------------------
# A 3-node cluster as `quiver demo` starts one (cli/src/demo.rs): three `quiver node` processes
# whose seeds are the three peer ports, meta created on node 0 (`quiver create-meta`), then one
# KV collection (`quiver create-collection bench --replicas 3`, persistence `logged`, one range
# placed on all three nodes by self-assignment). The fsync counter is harpoon's raft-log sync
# counter on each node's admin port.
QUIVER=""
QUIVER_PIDS=()
QUIVER_SEEDS=""
QUIVER_METRICS=""
QUIVER_SECRET=""
QUIVER_FSYNC_METRIC=${QUIVER_FSYNC_METRIC:-harpoon_log_syncs_total}
QUIVER_PERSISTENCE=${QUIVER_PERSISTENCE:-logged}
quiver_available() {
    QUIVER=${QUIVER_BIN:-}
    if [[ -z $QUIVER ]]; then
        if [[ ${QUIVER_BUILD_FAILED:-0} == 1 ]]; then
            echo "Quiver skipped: \`cargo build --release -p cli\` failed (see above)." >&2
            return 1
        fi
        QUIVER=$CARGO_TARGET_DIR/release/quiver
    fi
    local help cmd
    help=$("$QUIVER" --help 2>&1 || true)
    for cmd in node create-meta create-collection status; do
        if ! grep -qE "^\s+$cmd\b" <<<"$help"; then
            echo "Quiver skipped: \`quiver $cmd\` does not exist (needed to start a 3-node cluster with a replicated KV collection)." >&2
            return 1
        fi
    done
}
# Poll `quiver status --json` until the jq filter $1 is true (at most $2 seconds).
quiver_wait_status() {
    local filter=$1 secs=$2 t
    for t in $(seq 1 $((secs * 5))); do
        if "$QUIVER" status --json --timeout-secs 2 --seeds "$QUIVER_SEEDS" 2>/dev/null \
            | jq -e "$filter" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    return 1
}
start_quiver() {
    local dir=$TMP/quiver peers="" i
    QUIVER_SECRET="bench-$$-$RANDOM"
    rm -rf "$dir"; mkdir -p "$dir"
    for i in 0 1 2; do peers+="${peers:+,}127.0.0.1:$((QUIVER_BASE_PORT + 10 * i + 1))"; done
    QUIVER_PIDS=(); QUIVER_SEEDS=""; QUIVER_METRICS=""
    for i in 0 1 2; do
        local c=$((QUIVER_BASE_PORT + 10 * i)) p=$((QUIVER_BASE_PORT + 10 * i + 1)) a=$((QUIVER_BASE_PORT + 10 * i + 2))
        QUIVER_CLUSTER_SECRET=$QUIVER_SECRET QUIVER_LOG=${QUIVER_LOG:-warn} "$QUIVER" node \
            --data-dir "$dir/q$i" --listen "127.0.0.1:$c" --peer-listen "127.0.0.1:$p" \
            --admin-listen "127.0.0.1:$a" --seeds "$peers" --zone "zone-$i" \
            >"$dir/q$i.log" 2>&1 &
        PIDS+=($!); QUIVER_PIDS+=($!)
        QUIVER_SEEDS+="${QUIVER_SEEDS:+,}127.0.0.1:$c"
        QUIVER_METRICS+="${QUIVER_METRICS:+,}http://127.0.0.1:$a/metrics"
    done
    local t
    for t in $(seq 1 150); do
        (exec 3<>"/dev/tcp/127.0.0.1/$((QUIVER_BASE_PORT + 1))") 2>/dev/null && break
        sleep 0.2
    done
    QUIVER_CLUSTER_SECRET=$QUIVER_SECRET "$QUIVER" create-meta \
        --seed "127.0.0.1:$((QUIVER_BASE_PORT + 1))" --timeout-secs 30 >/dev/null || return 1
    # Meta with three voters and three live nodes, then the collection.
    quiver_wait_status '([.ranges[] | select(.id == 1) | .voters] | max // 0) >= 3
        and ([.nodes[] | select(.alive)] | length) >= 3' 60 || {
        echo "meta did not reach 3 voters on 3 live nodes within 60 s" >&2; return 1; }
    local made id
    made=$("$QUIVER" create-collection bench --replicas 3 --persistence "$QUIVER_PERSISTENCE" \
        --json --seeds "$QUIVER_SEEDS") || return 1
    id=$(jq -r .id <<<"$made")
    quiver_wait_status "[.ranges[] | select(.collection == $id)]
        | length >= 1 and all(.voters >= 3)" 60 || {
        echo "collection bench (id $id) was not placed on 3 voters within 60 s" >&2; return 1; }
    # A first write through the client: the range has a leader that applies.
    for t in $(seq 1 150); do
        if "$QUIVER" kv put bench bench-warm x --seeds "$QUIVER_SEEDS" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    echo "no write to collection bench succeeded within 30 s" >&2
    return 1
}
stop_quiver() {
    stop_pids "${QUIVER_PIDS[@]}"
    QUIVER_PIDS=()
    rm -rf "$TMP/quiver"
}
run_quiver() {
    local rep=$1
    log "Quiver, rep $rep/$REPS"
    if ! start_quiver; then
        echo "Quiver skipped in rep $rep: the cluster did not start; the end of each node's log:" >&2
        local f
        for f in "$TMP"/quiver/q*.log; do
            [[ -f $f ]] && { echo "-- $f" >&2; tail -n 5 "$f" >&2; }
        done
        stop_quiver; return 1
    fi
    log "Quiver is up"
    local pids
    pids=$(IFS=,; echo "${QUIVER_PIDS[*]}")
    # shellcheck disable=SC2086
    if ! "$BENCH" --backend quiver --seeds "$QUIVER_SEEDS" --collection bench --server-pids "$pids" \
        --metrics-urls "$QUIVER_METRICS" --fsync-metric "$QUIVER_FSYNC_METRIC" \
        --workloads "$WORKLOADS" --label "${RUN_LABEL:+$RUN_LABEL }rep=$rep" --json-out "$RUNS" --format table \
        "${MODE_FLAGS[@]}" $EXTRA; then
        echo "Quiver skipped in rep $rep: the bench run failed (see the error above)." >&2
        stop_quiver; return 1
    fi
    stop_quiver
}

# ---- the runs: etcd, Quiver, etcd, Quiver ... ---------------------------------------------------
# WITH_QUIVER: Quiver runs in the next rep (not after a failure); QUIVER_RAN: Quiver's rows are
# in at least one rep; QUIVER_FAILED_REP: the rep it failed in, if any.
WITH_QUIVER=0
QUIVER_RAN=0
QUIVER_FAILED_REP=""
if [[ $ETCD_ONLY == 0 ]] && quiver_available; then WITH_QUIVER=1; fi
T0=$(date +%s)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for rep in $(seq 1 "$REPS"); do
    [[ $QUIVER_ONLY == 0 ]] && run_etcd "$rep"
    if [[ $WITH_QUIVER == 1 ]]; then
        if run_quiver "$rep"; then
            QUIVER_RAN=1
        else
            WITH_QUIVER=0
            QUIVER_FAILED_REP=$rep
        fi
    fi
done
ELAPSED=$(( $(date +%s) - T0 ))
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
log "runs done in ${ELAPSED}s; JSON lines in $RUNS"
[[ -n ${RUNS_OUT:-} ]] && cat "$RUNS" >> "$RUNS_OUT"

# ---- the report ---------------------------------------------------------------------------------
TABLE=$("$BENCH" --report-from "$RUNS" --numerator quiver --denominator etcd)
BAR=$("$BENCH" --report-from "$RUNS" --numerator quiver --denominator etcd --bar | sed -n '/^- /,$p')
MEM=$(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)
CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
DISK=$(df -T "$TMP" | awk 'NR == 2 {print $1 " (" $2 ")"}')
# awk reads to the end: `head` would close the pipe early, and etcd's SIGPIPE would end this
# script under pipefail (now and then, losing the report).
ETCD_VERSION=$(etcd --version 2>/dev/null | awk 'NR == 1 {print $3}' || true)
CMD="bench/compare-etcd.sh"
[[ $QUICK == 1 ]] && CMD+=" --quick"
CMD+=" --reps $REPS"
[[ $WORKLOADS != all ]] && CMD+=" --workloads $WORKLOADS"
[[ $ETCD_ONLY == 1 ]] && CMD+=" --etcd-only"
[[ -n $EXTRA ]] && CMD+=" --bench-args \"$EXTRA\""
if [[ $QUIVER_RAN == 1 ]]; then
    QNOTE="Quiver: 3 \`quiver node\` processes (raft log fsync on every member), one KV collection
(\`$QUIVER_PERSISTENCE\`, consensus replication), replication factor 3, one range; fsyncs are
\`$QUIVER_FSYNC_METRIC\` summed over the nodes."
    if [[ -n $QUIVER_FAILED_REP ]]; then
        QNOTE+=" Quiver failed in rep $QUIVER_FAILED_REP and was not run after it: its rows come
from the reps before."
    fi
elif [[ $ETCD_ONLY == 1 ]]; then
    QNOTE="Quiver: not in this run (\`--etcd-only\`), so the ratio columns are empty."
else
    QNOTE="Quiver: not in this run (it did not build, did not start, or its first bench run failed;
see the script's log), so the ratio columns are empty."
fi
SECTION=$(cat <<EOF
## Side-by-side with etcd

Command (from the workspace root; installs etcd and protoc from the system packages when missing):

\`\`\`
$CMD
# full run: bench/compare-etcd.sh            (10 s per workload after 1 s warm-up, 100K records, 3 reps)
# one workload by hand: quiver-bench --backend etcd --endpoints http://127.0.0.1:2379 -w W2
\`\`\`

Run $(date -u '+%Y-%m-%d %H:%M UTC') in ${ELAPSED} s. Machine: $(nproc) cores ($CPU), $MEM RAM,
kernel $(uname -r), data dirs on $DISK, load average $LOAD_BEFORE before and
$LOAD_AFTER after (a shared machine: compare rows of one table, not tables of different days).

Systems: etcd $ETCD_VERSION, 3 members on 127.0.0.1 (one process each, default WAL fsync on every
member). $QNOTE
One system runs at a time, in the order etcd, Quiver, etcd, Quiver ...; each repetition starts
the cluster on empty data dirs and loads the records before the first workload that reads.
Harness: \`quiver-bench\` (crate \`bench/\`), 8 connections shared by the clients, 256 B values
unless stated, keys over $( [[ $QUICK == 1 ]] && echo 10K || echo 100K ) records.

Columns: ops/s is the median over repetitions (min-max); latencies are medians of each run's
percentile, in ms (per request: a W9 request writes 16 keys); CPU is the servers' user+system
seconds (\`/proc/<pid>/stat\`) per 1,000 ops; fsyncs are the servers' WAL fsyncs (etcd:
\`etcd_disk_wal_fsync_duration_seconds_count\` summed over members) per 1,000 ops; W12 is open loop
at 1,000 requests/s (at most 64 in flight) with latency from the intended start (missed sends are
shown with the errors).

$TABLE

The bar of the benchmark issue on this machine, from the etcd medians above:

$BAR

Raw JSON lines (one per run): \`$RUNS\` (not committed).
EOF
)
echo
echo "$SECTION"
if [[ $WRITE_DOCS == 1 ]]; then
    DOC=$ROOT/docs/benchmarks.md
    # Replace the section if it exists (up to the next "## " heading), else append it.
    SECTION=$SECTION awk '
        /^## Side-by-side with etcd[[:space:]]*$/ { skip = 1; if (!done) { print ENVIRON["SECTION"]; print ""; done = 1 }; next }
        skip && /^## / { skip = 0 }
        !skip { print }
        END { if (!done) { print ""; print ENVIRON["SECTION"] } }
    ' "$DOC" > "$TMP/benchmarks.md"
    # Drop blank lines left at the end of the file.
    sed -e :a -e '/^\n*$/{$d;N;ba' -e '}' "$TMP/benchmarks.md" > "$DOC"
    log "wrote the section 'Side-by-side with etcd' into docs/benchmarks.md"
fi
