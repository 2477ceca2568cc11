#!/bin/sh
# The checks scripts/vmtest.sh runs on each kernel: inside the VM (started by scripts/vmtest/init, busybox
# sh) or, for "host", directly on this machine. POSIX sh only.
#
# Environment:
#   VMTEST_EXPECT  sockmap     this kernel must run the kernel datapath: SOCKRELAY_REQUIRE_BPF=1, and the
#                              sockmap tests must have run and passed (not skipped)
#                  no-sockmap  this kernel lacks bpf_cast_to_kern_ctx (before 6.2): the probe must refuse
#                              sockmap for that reason and for no other, `auto` must pick splice, and the
#                              sockmap tests must skip saying so
#   VMTEST_STEPS   which steps to run, space-separated (default: all but "failing")
#   VMTEST_BIN     directory holding sockrelay, loader.test, sockmap.test, relay.test, sockrelay.test
#                  (failing.test)
#   VMTEST_IN_VM   1 inside the VM: also check the kernel log for warnings (the host's is not ours)
# Prints "VMTEST STEP <name> pass|fail <why>" per step and "VMTEST RESULT pass|fail" last.

bin=${VMTEST_BIN:?}
expect=${VMTEST_EXPECT:?}
steps=${VMTEST_STEPS:-"doctor auto loader sockmap relay sockrelay dmesg"}
work=${TMPDIR:-/tmp}/vmtest.$$
mkdir -p "$work"
failed=""

# The relay tests that move bytes through a datapath, each on copy, splice and (where it runs) sockmap,
# with the relay's start-up self-test. Left out: tests of the handshake alone, which never reach a
# datapath (`make test` runs them), and the interop tests, which need python3-websockets. The two
# heaviest backpressure tests (512 MiB to a stopped reader; both peers flooding) run on sockmap only: on
# copy and splice they test TCP's own flow control, which is not what differs between kernels.
# Measured under TCG on 6.12: about 2-7x slower than native, well inside the per-kernel timeout.
relay_tests='^(TestSelfTestFailureRefusesSockmap|TestNewServerResolvesDatapath|TestDuplexByteExact|TestDuplexManyTunnels|TestUpstreamSpeaksFirst|TestPingPongSurvivesGC|TestResetClosesBoth|TestFullCloseWhileOtherSideSends|TestHalfCloseWhileBehind|TestNoStallPingPong|TestBackpressureSlowReader|TestBackpressureBothStopReading|TestBackpressureFINWhileDemoted|TestShutdownDrains|TestShutdownClosesTunnelsAfterDrain|TestNoFDLeak|TestAdminEndpoints)$'
relay_skip='^(TestBackpressureSlowReader|TestBackpressureBothStopReading)$/^(copy|splice)$'
loader_tests='^(TestProbeDecisions|TestProbeLive|TestOpenClose)$'
# The kernel engine on its own (datapath/sockmap): its self-test, passing and refusing a broken FIN drain,
# demotion and resume, lost mode events, sockets out of Go's poller, and live moves onto it.
sockmap_tests='^(TestSelfTestPasses|TestSelfTestRejectsBrokenDatapath|TestBackpressureResumes|TestBackpressureLostEvents|TestKernelSocketsLeaveGoPoller|TestMoveCopyToSockmap|TestMoveEventLoopToSockmap)$'
# The daemon as a process: doctor's report, a WebSocket through `sockrelay run` on every datapath, the
# drain, and (where sockmap is refused) the refusal's message.
sockrelay_tests='^(TestDoctorSaysWhy|TestRunEndToEnd|TestRunDrain|TestRunSockmapRefusedSaysWhy)$'

case "$expect" in
sockmap) export SOCKRELAY_REQUIRE_BPF=1 ;;
no-sockmap) unset SOCKRELAY_REQUIRE_BPF ;;
*)
	echo "VMTEST RESULT fail (VMTEST_EXPECT=$expect: want sockmap or no-sockmap)"
	exit 1
	;;
esac

step() { # step NAME pass|fail WHY...
	name=$1 verdict=$2
	shift 2
	echo "VMTEST STEP $name $verdict${*:+ ($*)}"
	[ "$verdict" = pass ] || failed="$failed $name"
}

# need FILE STEP TEXT...: each TEXT must appear in FILE (fixed strings); prints the first missing one.
need() {
	f=$1
	shift
	for text in "$@"; do
		if ! grep -qF -- "$text" "$f"; then
			echo "missing: $text"
			return 1
		fi
	done
}

# run_go_test NAME BINARY RUN [SKIP]: runs a compiled test binary on the selected tests, output on the
# console and in $work/NAME.out; returns its exit status.
run_go_test() {
	name=$1 binary=$2 run=$3 skip=${4:-}
	# shellcheck disable=SC2016 # the quotes are printed, $skip is expanded
	echo "--- $name: $binary -test.run '$run'${skip:+ -test.skip '$skip'} (SOCKRELAY_REQUIRE_BPF=${SOCKRELAY_REQUIRE_BPF:-unset})"
	start=$(date +%s)
	set -- -test.v -test.count=1 -test.timeout=8m -test.run "$run"
	[ -n "$skip" ] && set -- "$@" -test.skip "$skip"
	{
		"$bin/$binary" "$@"
		echo $? >"$work/$name.rc"
	} 2>&1 | tee "$work/$name.out"
	echo "--- $name: exit $(cat "$work/$name.rc") in $(($(date +%s) - start))s"
	return "$(cat "$work/$name.rc")"
}

step_doctor() {
	"$bin/sockrelay" doctor >"$work/doctor.out" 2>&1
	rc=$?
	cat "$work/doctor.out"
	[ $rc -eq 0 ] || { step doctor fail "exit $rc"; return; }
	if [ "$expect" = sockmap ]; then
		why=$(need "$work/doctor.out" "sockmap self-test: ok" "sockmap  available" "splice   available")
	else
		# Refused for the missing kfunc, and for nothing else: every other requirement holds.
		why=$(need "$work/doctor.out" "ok   capabilities" "ok   btf" "ok   memlock" "ok   sockhash" "ok   sk_skb" \
			"FAIL repeat cut" "kernel has no bpf_cast_to_kern_ctx" "Linux 6.2 or later" \
			"sockmap self-test: not run" "sockmap  unavailable" "splice   available" "copy     available")
	fi
	if [ -n "$why" ]; then step doctor fail "$why"; else step doctor pass; fi
}

# What `sockrelay run --datapath auto` chooses, from its own log.
step_auto() {
	want=splice
	[ "$expect" = sockmap ] && want=sockmap
	"$bin/sockrelay" run --listen 127.0.0.1:0 --upstream 127.0.0.1:9 --datapath auto >"$work/auto.out" 2>&1 &
	pid=$!
	i=0
	while [ $i -lt 600 ] && ! grep -q "sockrelay listening" "$work/auto.out"; do
		kill -0 $pid 2>/dev/null || break
		sleep 0.1
		i=$((i + 1))
	done
	kill -TERM $pid 2>/dev/null
	wait $pid
	rc=$?
	cat "$work/auto.out"
	chosen=$(grep 'msg="datapath chosen"' "$work/auto.out" | sed -n 's/.* datapath=\([a-z]*\).*/\1/p')
	if [ "$chosen" != "$want" ]; then
		step auto fail "auto chose '${chosen:-nothing}', want $want"
	elif [ $rc -ne 0 ]; then
		step auto fail "sockrelay run exit $rc after SIGTERM, want 0"
	else
		step auto pass "auto chose $chosen"
	fi
}

step_loader() {
	run_go_test loader loader.test "$loader_tests" || { step loader fail "exit $(cat "$work/loader.rc")"; return; }
	if [ "$expect" = sockmap ]; then
		why=$(need "$work/loader.out" "--- PASS: TestProbeLive" "--- PASS: TestOpenClose")
	else
		why=$(need "$work/loader.out" "--- SKIP: TestProbeLive" "repeat cut: kernel has no bpf_cast_to_kern_ctx")
	fi
	if [ -n "$why" ]; then step loader fail "$why"; else step loader pass; fi
}

step_sockmap() {
	run_go_test sockmap sockmap.test "$sockmap_tests" || { step sockmap fail "exit $(cat "$work/sockmap.rc")"; return; }
	if [ "$expect" = sockmap ]; then
		why=$(need "$work/sockmap.out" "--- PASS: TestSelfTestPasses" "--- PASS: TestSelfTestRejectsBrokenDatapath" \
			"--- PASS: TestBackpressureResumes" "--- PASS: TestBackpressureLostEvents")
	else
		why=$(need "$work/sockmap.out" "note: sockmap tests skipped" "bpf_cast_to_kern_ctx" "--- SKIP: TestSelfTestPasses")
	fi
	if [ -n "$why" ]; then step sockmap fail "$why"; else step sockmap pass; fi
}

step_relay() {
	run_go_test relay relay.test "$relay_tests" "$relay_skip" || { step relay fail "exit $(cat "$work/relay.rc")"; return; }
	if [ "$expect" = sockmap ]; then
		why=$(need "$work/relay.out" "--- PASS: TestSelfTestFailureRefusesSockmap" \
			"--- PASS: TestDuplexByteExact/sockmap" "--- PASS: TestHalfCloseWhileBehind/sockmap" \
			"--- PASS: TestBackpressureSlowReader/sockmap/stops-2s" "--- PASS: TestBackpressureBothStopReading/sockmap" \
			"--- PASS: TestBackpressureFINWhileDemoted" "--- PASS: TestNewServerResolvesDatapath/auto")
	else
		why=$(need "$work/relay.out" "note: sockmap tests skipped" "bpf_cast_to_kern_ctx" \
			"--- PASS: TestDuplexByteExact/splice" "--- PASS: TestDuplexByteExact/copy" \
			"--- PASS: TestNewServerResolvesDatapath/auto")
		grep -q -- "--- PASS: TestDuplexByteExact/sockmap" "$work/relay.out" && why="sockmap tests ran on a kernel that should refuse them"
	fi
	if [ -n "$why" ]; then step relay fail "$why"; else step relay pass; fi
}

step_sockrelay() {
	run_go_test sockrelay sockrelay.test "$sockrelay_tests" || { step sockrelay fail "exit $(cat "$work/sockrelay.rc")"; return; }
	if [ "$expect" = sockmap ]; then
		why=$(need "$work/sockrelay.out" "--- PASS: TestDoctorSaysWhy" "--- PASS: TestRunEndToEnd/sockmap")
	else
		why=$(need "$work/sockrelay.out" "--- PASS: TestRunSockmapRefusedSaysWhy" "--- SKIP: TestRunEndToEnd/sockmap")
	fi
	if [ -n "$why" ]; then step sockrelay fail "$why"; else step sockrelay pass; fi
}

# A deliberately failing test binary (scripts/vmtest/testdata/failing), for scripts/vmtest_test.sh.
step_failing() {
	if run_go_test failing failing.test .; then step failing pass; else step failing fail "exit $(cat "$work/failing.rc")"; fi
}

# Warnings, oopses and BPF splats the kernel logged while the tests ran are findings even when every test
# passed.
step_dmesg() {
	[ "${VMTEST_IN_VM:-}" = 1 ] || { step dmesg pass "not checked outside the VM"; return; }
	if dmesg | grep -E 'WARNING:|BUG:|Oops|general protection|Call Trace|refcount_t|kernel BUG' >"$work/dmesg.out"; then
		dmesg | tail -n 200
		step dmesg fail "$(head -n 1 "$work/dmesg.out")"
	else
		step dmesg pass
	fi
}

echo "VMTEST START kernel $(uname -r), expect $expect, steps: $steps"
for s in $steps; do
	case "$s" in
	doctor | auto | loader | sockmap | relay | sockrelay | failing | dmesg) "step_$s" ;;
	*) step "$s" fail "unknown step" ;;
	esac
done
rm -rf "$work"
if [ -n "$failed" ]; then
	echo "VMTEST RESULT fail (failed:$failed)"
	exit 1
fi
echo "VMTEST RESULT pass"
