#!/usr/bin/env bash
# Builds and runs Quiver's fuzz targets, each for a fixed time, and prints a summary.
#
#   fuzz/run.sh [SECONDS] [TARGET...]     # default: 60 s each, every target
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --version 0.13.2 --locked`); stable toolchain
# with RUSTC_BOOTSTRAP=1 (set here). Builds go to fuzz/target, the growing corpus to
# fuzz/corpus/<target> (seeded from fuzz/seeds/<target> when present), crashes to
# fuzz/artifacts/<target>, logs to fuzz/artifacts/logs. Everything runs under `nice -n 10`.
# Extra libFuzzer flags: FUZZ_FLAGS="-max_len=4096". Known, reported bugs can be tolerated
# with QUIVER_FUZZ_ALLOW=name,... (docs/fuzzing.md lists the names).
# Exit status: 0 if no target crashed, 1 otherwise.
set -euo pipefail

cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
export RUSTC_BOOTSTRAP=1

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

nice -n 10 cargo fuzz build
mkdir -p fuzz/artifacts/logs

failed=()
summary=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    corpora=("fuzz/corpus/$t")
    if [ -d "fuzz/seeds/$t" ]; then
        corpora+=("fuzz/seeds/$t")
    fi
    log="fuzz/artifacts/logs/$t.log"
    echo "=== $t: ${secs}s"
    set +e
    # shellcheck disable=SC2086
    nice -n 10 cargo fuzz run "$t" "${corpora[@]}" -- \
        -max_total_time="$secs" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 \
        ${FUZZ_FLAGS:-} >"$log" 2>&1
    rc=$?
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -oE '(DONE|pulse|NEW|REDUCE|INITED) +cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 |
        sed -E 's/.*cov: ([0-9]+) ft: ([0-9]+)/\1 edges, \2 features/')
    corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
    if [ "$rc" -ne 0 ]; then
        failed+=("$t")
        status="CRASH (rc $rc, see $log and fuzz/artifacts/$t)"
    else
        status="ok"
    fi
    summary+=("$(printf '%-20s %10s execs %8s exec/s  cov %-28s corpus %5s  %s' \
        "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "$corpus" "$status")")
    tail -n 3 "$log"
done

echo
echo "=== summary (${secs}s per target)"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "crashed: ${failed[*]}"
    exit 1
fi
