#!/bin/sh
# Runs every test program given on the command line, shows its output, and sums the
# "name: N passed, N failed" line each one ends with. Ends with the total on a line of its own;
# MS_TEST_RUNNER (e.g. "qemu-s390x -L /usr/s390x-linux-gnu") is put before each program.
# Exit status 1 if anything failed (a program that crashes or prints no summary counts as one
# failure).
# OpenMP threads sleep at barriers instead of spinning (as `mixshow` itself arranges through
# ms_wait_policy_passive): a spinning thread against other work on the cores made the 2-thread
# tests many times slower (issue 14). An explicit OMP_WAIT_POLICY / GOMP_SPINCOUNT wins.
if [ -z "${OMP_WAIT_POLICY}${GOMP_SPINCOUNT}${KMP_BLOCKTIME}" ]; then OMP_WAIT_POLICY=PASSIVE; export OMP_WAIT_POLICY; fi
# A test runs with the thread count it asks for, whatever else the machine is doing (tensor.c's
# load-aware team size would otherwise shrink a 2-thread comparison to 1 thread under load).
MS_ADAPT_THREADS=0; export MS_ADAPT_THREADS
# Every test's temporary files go into one folder of this run (test_tmp() in tests/test.h reads
# TMPDIR), removed at the end: runs of several build folders never meet, nothing is left behind.
run_tmp=$(mktemp -d) || exit 1
trap 'rm -rf "$run_tmp"' EXIT
TMPDIR=$run_tmp; export TMPDIR
total_p=0; total_f=0
for t in "$@"; do
    name=$(basename "$t")
    out=$(mktemp)
    start=$(date +%s)
    $MS_TEST_RUNNER "$t" > "$out" 2>&1
    rc=$?
    end=$(date +%s)
    cat "$out"
    line=$(grep -E "^$name: [0-9]+ passed, [0-9]+ failed$" "$out" | tail -n 1)
    rm -f "$out"
    if [ -z "$line" ]; then
        echo "$name: CRASHED or printed no summary (exit status $rc)"
        total_f=$((total_f + 1)); continue
    fi
    p=$(echo "$line" | sed -E 's/.*: ([0-9]+) passed.*/\1/')
    f=$(echo "$line" | sed -E 's/.* ([0-9]+) failed$/\1/')
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; echo "$name: exit status $rc"; fi
    total_p=$((total_p + p)); total_f=$((total_f + f))
    echo "   ($name took $((end - start)) s)"
done
echo "$total_p passed, $total_f failed"
[ "$total_f" -eq 0 ]
