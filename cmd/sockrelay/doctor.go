package main

import (
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/sockrelay/sockrelay/datapath/sockmap"
	"github.com/sockrelay/sockrelay/loader"
	"github.com/sockrelay/sockrelay/relay"
)

// doctorCommand prints which datapaths this host can use and, for each one it cannot, why. It exits 0 when
// at least one datapath can run (copy always can), so its output, not its status, is the verdict.
func doctorCommand(stdout io.Writer) int {
	report := loader.Probe()
	fmt.Fprintf(stdout, "kernel %s\n\nkernel datapath requirements:\n", report.Kernel)
	for _, c := range report.Checks {
		mark := "ok  "
		if !c.OK {
			mark = "FAIL"
		}
		fmt.Fprintf(stdout, "  %s %-13s %s\n", mark, c.Name, c.Detail)
	}
	fmt.Fprintln(stdout)

	var selfTest string
	selfTestOK := false
	if err := report.Err(); err != nil {
		selfTest = "not run: the requirements above are not met"
	} else {
		start := time.Now()
		if err := sockmap.SelfTest(slog.New(slog.DiscardHandler)); err != nil {
			selfTest = "FAIL: " + err.Error()
		} else {
			selfTest = fmt.Sprintf("ok (%v)", time.Since(start).Round(time.Millisecond))
			selfTestOK = true
		}
	}
	fmt.Fprintf(stdout, "sockmap self-test: %s\n\ndatapaths:\n", selfTest)

	for _, d := range []relay.Datapath{relay.DatapathSockmap, relay.DatapathSplice, relay.DatapathCopy} {
		var err error
		if d == relay.DatapathSockmap {
			err = report.Err()
			if err == nil && !selfTestOK {
				err = fmt.Errorf("self-test: %s", selfTest)
			}
		} else {
			err = relay.DatapathAvailable(d)
		}
		if err != nil {
			fmt.Fprintf(stdout, "  %-8s unavailable: %v\n", d, err)
		} else {
			fmt.Fprintf(stdout, "  %-8s available\n", d)
		}
	}
	return 0
}
