#!/bin/sh
# tests/cross.sh — the portability matrix: builds the library, the CLI and every tests/test_*.c
# for another machine or with another compiler, runs the tests (under qemu-user for other
# architectures) through tests/run.sh (MS_TEST_RUNNER), and ends with "N passed, N failed"
# summed over all legs.
#
#   sh tests/cross.sh LEG... [MAKEVAR=value ...]        (make cross-test ARCH=s390x)
#
# LEG is one of
#   aarch64  s390x  i386     cross gcc + qemu-user   (s390x: big-endian; i386: 32-bit, x87 float;
#                            i386 runs natively through its loader on an x86-64 host)
#   gcc  clang  tcc          native compilers (gcc: $CC or cc, as `make test`; tcc: no OpenMP,
#                            no intrinsics, no _Thread_local)
#   noomp  nosimd            native $CC or cc, NOOMP=1 / -DMS_NO_SIMD
#   all                      aarch64 s390x i386 (also when no LEG is given)
#   matrix                   all of the above
# Each leg builds into its own folder, build/cross-LEG (cross) or build/port-LEG (native), with
# make -j1. MAKEVAR=value arguments go to every make call (OPT=-O0, EXTRA_CFLAGS=...).
#
# Environment:
#   CROSS_OMP=on|off|both  OpenMP for the cross legs (default on: the cross gcc links the target's
#                          libgomp and qemu-user runs the threads; "both" adds LEG-noomp legs)
#   CROSS_NO_INSTALL=1     never apt-get (default: install what is missing, when root)
#   CROSS_QEMU=1           i386 under qemu-i386 even where the host can run i386 code itself
#   CROSS_WERROR=1         a leg with a compiler warning fails
#   CROSS_TESTS="test_io test_pytorch"  only these test programs (default: every tests/test_*.c);
#                          e.g. the byte-order tests alone on s390x, where the compute-heavy
#                          ones take 10+ min each under qemu
#   CROSS_TAG=name         build folders get a -name suffix (for runs with other MAKEVARs:
#                          make does not rebuild objects when only flags change)
#
# What is missing is installed with apt-get (Debian/Ubuntu package names), quietly and only then.
# The tests run with the repository root as working directory, as under `make test`, so they
# find tests/data and ../shared. qemu-user's -L prefix only remaps absolute paths that exist
# under the prefix (/usr/TRIPLE), never relative ones.
set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)

legs=""; makevars=""
for a in "$@"; do
    case "$a" in
    *=*) makevars="$makevars $a" ;;   # for messages; make gets them as "$@" (spaces kept)
    all) legs="$legs aarch64 s390x i386" ;;
    matrix) legs="$legs aarch64 s390x i386 gcc clang tcc noomp nosimd" ;;
    aarch64|s390x|i386|gcc|clang|tcc|noomp|nosimd) legs="$legs $a" ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "cross.sh: unknown leg '$a' (aarch64 s390x i386 gcc clang tcc noomp nosimd all matrix)"; exit 2 ;;
    esac
done
n=$#; i=0                                 # keep only the MAKEVAR=value arguments in "$@"
while [ $i -lt $n ]; do a=$1; shift; i=$((i + 1)); case "$a" in *=*) set -- "$@" "$a" ;; esac; done
[ -n "$legs" ] || legs="aarch64 s390x i386"      # `make cross-test` without ARCH: all
case "${CROSS_OMP:-on}" in
on) ;;
off|both)
    new=""
    for l in $legs; do
        case "$l" in
        aarch64|s390x|i386) [ "$CROSS_OMP" = both ] && new="$new $l"; new="$new $l-noomp" ;;
        *) new="$new $l" ;;
        esac
    done
    legs=$new ;;
*) echo "cross.sh: CROSS_OMP must be on, off or both"; exit 2 ;;
esac

# ---- installing what is missing ------------------------------------------------------------
apt_updated=0
need() {   # need PROGRAM_OR_FILE PACKAGE...: install the packages when the program/file is absent
    what=$1; shift
    case "$what" in
    /*) [ -e "$what" ] && return 0 ;;
    *) command -v "$what" >/dev/null 2>&1 && return 0 ;;
    esac
    if [ "${CROSS_NO_INSTALL:-0}" = 1 ] || ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
        echo "cross.sh: $what is missing; install: $*"; return 1
    fi
    echo "cross.sh: installing $* (for $what)"
    log=$(mktemp)
    if [ $apt_updated = 0 ]; then apt_updated=1; apt-get update -q >"$log" 2>&1; fi
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >>"$log" 2>&1; then
        tail -n 20 "$log"; rm -f "$log"; echo "cross.sh: apt-get install $* failed"; return 1
    fi
    rm -f "$log"
}

# ---- one leg ---------------------------------------------------------------------------------
# Sets: CCX (compiler), ARX (archiver), RUN (runner prefix, may be empty), B (build folder),
# LEGVARS (extra make variables). Returns 1 when the tools cannot be had.
setup_leg() {
    base=${1%-noomp}
    LEGVARS=""; RUN=""; ARX=ar
    case "$1" in *-noomp) LEGVARS="NOOMP=1" ;; esac
    case "$base" in
    aarch64|s390x|i386)
        case "$base" in
        aarch64) tri=aarch64-linux-gnu; q=qemu-aarch64; pk=arm64 ;;
        s390x)   tri=s390x-linux-gnu;   q=qemu-s390x;   pk=s390x ;;
        i386)    tri=i686-linux-gnu;    q=qemu-i386;    pk=i386 ;;
        esac
        need "$tri-gcc" "gcc-$tri" "libc6-dev-$pk-cross" || return 1
        need "/usr/$tri/lib/libc.so.6" "libc6-dev-$pk-cross" || return 1
        need "$q" qemu-user || return 1
        CCX=$tri-gcc; ARX=$tri-ar; RUN="$q -L /usr/$tri"; B=build/cross-$1
        if [ "$base" = i386 ]; then
            # SSE2 float arithmetic (every x86 CPU since 2001 has it). The i686 default is x87,
            # whose 80-bit intermediates (FLT_EVAL_METHOD 2) round a*b+c once like an FMA: the
            # numbers stay within every tolerance, but the bit-exact checks (torch RNG,
            # schedulers, elementwise ops) cannot hold there. x87 is not a supported target for
            # bit-exact results; tests/portability.md lists what differs.
            CCX="$CCX -msse2 -mfpmath=sse"
            # An x86-64 host runs i386 code itself (through the target's own loader and libs):
            # 20-50x faster than qemu-i386, and on real hardware. qemu-i386 7.2 also crawls in
            # its emulated AVX2 (test_golden did not finish in 20 min). qemu-i386 -cpu qemu32
            # (no AVX: the scalar x87 kernels) is the fallback; CROSS_QEMU=1 forces it.
            RUN="$q -cpu qemu32 -L /usr/$tri"
            ld32=/usr/$tri/lib/ld-linux.so.2
            mkdir -p "$B"
            if [ "${CROSS_QEMU:-0}" != 1 ] && [ -x "$ld32" ] &&
               printf 'int main(void){return 0;}\n' | $CCX -x c - -o "$B/probe" 2>/dev/null &&
               "$ld32" --library-path "/usr/$tri/lib" "$B/probe" 2>/dev/null; then
                RUN="$ld32 --library-path /usr/$tri/lib"
            fi
        fi ;;
    clang)
        need clang clang || return 1
        need /usr/lib/llvm-14/lib/libomp.so libomp-dev || true   # clang's OpenMP; optional
        CCX=clang; B=build/port-clang ;;
    tcc)
        need tcc tcc || return 1
        # tcc 0.9.27 has no OpenMP and no -MMD/-MP: DEPFLAGS is emptied, and the leg is built
        # from scratch each time (tcc compiles the whole tree in a second or two)
        B=build/port-tcc; rm -rf "$B"; mkdir -p "$B"
        CCX=tcc
        LEGVARS="NOOMP=1 DEPFLAGS=" ;;
    gcc)    CCX=${CC:-cc}; B=build/port-gcc ;;
    noomp)  CCX=${CC:-cc}; B=build/port-noomp; LEGVARS="NOOMP=1" ;;
    nosimd) CCX=${CC:-cc}; B=build/port-nosimd; LEGVARS="EXTRA_CFLAGS=-DMS_NO_SIMD" ;;
    esac
    return 0
}

summary=""; gp=0; gf=0
now() { date +%s; }

for leg in $legs; do
    echo "==== $leg"
    if ! setup_leg "$leg"; then
        summary="$summary
$(printf '%-14s %-8s %s' "$leg" "NO TOOLS" "-")"; gf=$((gf + 1)); continue
    fi
    [ -n "${CROSS_TAG:-}" ] && B=$B-$CROSS_TAG
    bins=""
    for s in tests/test_*.c; do
        [ -e "$s" ] || continue
        t=$(basename "$s" .c)
        case " ${CROSS_TESTS:-$t} " in *" $t "*) bins="$bins $B/tests/$t" ;; esac
    done
    mkdir -p "$B"
    blog=$B/build.log
    t0=$(now)
    # shellcheck disable=SC2086  # word splitting of the variable lists is intended
    make -j1 --no-print-directory BUILD="$B" CC="$CCX" AR="$ARX" $LEGVARS "$@" "$B/mixshow" $bins >"$blog" 2>&1
    brc=$?
    t1=$(now)
    nwarn=$(grep -c 'warning:' "$blog")
    echo "$CCX $LEGVARS$makevars: build $((t1 - t0)) s, $nwarn warning(s)$( [ -n "$RUN" ] && echo ", runner: $RUN")"
    grep -E '(warning|error):' "$blog" | sort -u
    if [ $brc -ne 0 ]; then
        tail -n 30 "$blog"
        summary="$summary
$(printf '%-14s %-8s %-24s build %4ss' "$leg" "NO BUILD" "-" "$((t1 - t0))")"; gf=$((gf + 1)); continue
    fi
    out=$(mktemp)
    MS_TEST_RUNNER="$RUN" sh tests/run.sh $bins | tee "$out"     # run.sh puts $RUN before each test
    t2=$(now)
    last=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$out" | tail -n 1); rm -f "$out"
    if [ -z "$last" ]; then last="0 passed, 1 failed"; fi
    p=${last%% passed*}; f=${last#*passed, }; f=${f%% failed*}
    [ "${CROSS_WERROR:-0}" = 1 ] && [ "$nwarn" -gt 0 ] && f=$((f + 1))
    gp=$((gp + p)); gf=$((gf + f))
    res=ok; [ "$f" -ne 0 ] && res=FAIL
    summary="$summary
$(printf '%-14s %-8s %-24s build %4ss  tests %4ss  warnings %s' "$leg" "$res" "$last" "$((t1 - t0))" "$((t2 - t1))" "$nwarn")"
done

echo "==== portability matrix ($(date -u +%Y-%m-%d), $(uname -m) host)$summary"
echo "$gp passed, $gf failed"
[ "$gf" -eq 0 ]
