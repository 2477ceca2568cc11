#!/usr/bin/env bash
# Tests scripts/vmtest.sh itself: that a failure inside the VM, a kernel that never reports, a kernel that
# runs past its time and a kernel that does not exist each fail that kernel and make the runner exit
# non-zero, while the others still pass. Boots KERNEL (default 6.12; .ci/run has just cached it) a few
# times with short step lists: about a minute under TCG.
#
#   scripts/vmtest_test.sh [KERNEL]
set -euo pipefail
cd "$(dirname "$0")/.."
kernel=${1:-6.12}
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
failures=0

# check NAME WANT_STATUS PATTERN... -- ENV...: runs the runner with ENV on $kernel (and "9.9" where
# asked), then wants its exit status to be WANT_STATUS (0, or "nonzero") and every PATTERN (an extended
# regular expression) to match a line of what it printed.
check() {
	local name=$1 want=$2 out rc
	shift 2
	local patterns=()
	while [ "$1" != -- ]; do patterns+=("$1"); shift; done
	shift
	echo "== $name"
	set +e
	out=$(env VMTEST_LOGS="$logs" "$@" scripts/vmtest.sh "$kernel" ${EXTRA_KERNEL:+"$EXTRA_KERNEL"} 2>&1)
	rc=$?
	set -e
	local ok=1
	if [ "$want" = 0 ] && [ $rc -ne 0 ]; then ok=0; echo "   exit $rc, want 0"; fi
	if [ "$want" = nonzero ] && [ $rc -eq 0 ]; then ok=0; echo "   exit 0, want non-zero"; fi
	for p in "${patterns[@]}"; do
		grep -qE -- "$p" <<<"$out" || { ok=0; echo "   output lacks /$p/"; }
	done
	if [ $ok = 1 ]; then
		echo "   ok (exit $rc)"
	else
		failures=$((failures + 1))
		echo "   runner output:"
		while IFS= read -r line; do echo "   | $line"; done <<<"$out"
	fi
}

k=${kernel//./\\.}
# A test that fails inside the VM fails the kernel, names the step, and shows the failing test; the steps
# before it still report. An unknown kernel next to it fails on its own.
EXTRA_KERNEL=9.9 check "failing test inside the VM" nonzero \
	"VMTEST STEP doctor pass" "--- FAIL: TestFailsOnPurpose" "VMTEST STEP failing fail" \
	"^$k +[^ ]+ +[a-z-]+ +[0-9]+s +fail \(failed: failing\)" "^9\.9 .* fail \(no kernel to boot\)" \
	-- VMTEST_STEPS="doctor failing"
# An expectation the kernel does not meet is a failure even when every command succeeds.
check "wrong expectation" nonzero "VMTEST STEP doctor fail" "^$k .* fail \(failed: doctor\)" \
	-- VMTEST_STEPS=doctor VMTEST_EXPECT=no-sockmap
# A guest that never prints its result (here: no init, the kernel panics) fails.
check "no result line" nonzero "^$k .* fail \(no VMTEST RESULT line" \
	-- VMTEST_STEPS=doctor VMTEST_APPEND=rdinit=/nonexistent
# A guest that runs past the timeout is stopped and fails.
check "timeout" nonzero "^$k .* fail \(timed out after 3s" \
	-- VMTEST_STEPS=doctor VMTEST_TIMEOUT=3
# And a guest whose steps pass passes: the runner does not fail everything.
check "passing steps" 0 "VMTEST STEP doctor pass" "^$k .* pass$" \
	-- VMTEST_STEPS=doctor

if [ $failures -gt 0 ]; then
	echo "scripts/vmtest_test.sh: $failures case(s) failed"
	exit 1
fi
echo "scripts/vmtest_test.sh: passed"
