package auto

import (
	"errors"
	"testing"
)

// TestMeasured: the policy follows what the relay adds per message on each engine (each round's count minus
// the direct path's), and only clear, consistent differences move busy tunnels to the kernel.
func TestMeasured(t *testing.T) {
	direct := []float64{1, 1, 1}
	for _, tc := range []struct {
		name    string
		c       Costs
		verdict Verdict
		want    Policy
	}{
		{"loop cheaper in every round (this host: 1.75 against 3.68)", Costs{Kernel: []float64{4.7, 4.6, 4.8}, Loop: []float64{2.7, 2.8, 2.6}, Direct: direct},
			VerdictLoopCheaper, LoopFirst},
		{"kernel cheaper in every round", Costs{Kernel: []float64{2, 2.1, 1.9}, Loop: []float64{3, 3.2, 2.9}, Direct: direct},
			VerdictKernelCheaper, KernelForBusy},
		{"kernel cheaper in every round on a busy host", Costs{Kernel: []float64{0.8, 0.8, 0.9}, Loop: []float64{1.1, 1.1, 1.2}, Direct: []float64{0, 0, 0}, HostBusy: 0.6},
			VerdictInconclusive, LoopFirst},
		{"kernel cheaper in every round, the host busy after the rounds", Costs{Kernel: []float64{2, 2.1, 1.9}, Loop: []float64{3, 3.2, 2.9}, Direct: direct, HostBusyAfter: 0.7},
			VerdictInconclusive, LoopFirst},
		{"rounds disagree", Costs{Kernel: []float64{2, 4, 2}, Loop: []float64{3, 3, 3}, Direct: direct},
			VerdictInconclusive, LoopFirst},
		{"within the margin", Costs{Kernel: []float64{3, 3.1, 3.05}, Loop: []float64{2.9, 3, 2.95}, Direct: direct},
			VerdictInconclusive, LoopFirst},
		{"too few rounds", Costs{Kernel: []float64{2, 2}, Loop: []float64{3, 3}, Direct: direct[:2], Err: errors.New("deadline")},
			VerdictInconclusive, LoopFirst},
		{"nothing above direct", Costs{Kernel: []float64{1, 1, 1}, Loop: []float64{1, 1, 1}, Direct: direct},
			VerdictInconclusive, LoopFirst},
		{"kernel cheaper in four rounds of five (seen on a busy host)", Costs{Kernel: []float64{1.2, 0.75, 1.16, 0.9, 0.5}, Loop: []float64{1.04, 0.89, 1.58, 1.36, 1.06}, Direct: []float64{0.11, 0.01, 0.37, 0.15, 0.15}},
			VerdictInconclusive, LoopFirst},
		{"not measured", Costs{Err: errors.New("no loopback")}, VerdictInconclusive, LoopFirst},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.c.Verdict(); got != tc.verdict {
				t.Errorf("verdict %s, want %s", got, tc.verdict)
			}
			got, why := Measured(tc.c)
			if got != tc.want || why == "" {
				t.Errorf("Measured = %+v (%q), want %+v", got, why, tc.want)
			}
		})
	}
}

func TestMedian(t *testing.T) {
	for _, tc := range []struct {
		in   []float64
		want float64
	}{{nil, 0}, {[]float64{3}, 3}, {[]float64{5, 1, 3}, 3}, {[]float64{4, 1, 3, 2}, 2.5}} {
		if got := median(tc.in); got != tc.want {
			t.Errorf("median(%v) = %v, want %v", tc.in, got, tc.want)
		}
	}
}
