package datapath

// Counts are what an engine has counted of a pair since it began to carry it, each direction apart: the
// per-tunnel policy of auto (datapath/auto) compares two of them to classify a tunnel's traffic. Reading them
// costs the engine no work on its data path: the kernel engine's come from the verdict's per-socket counters
// (each socket's are the direction it reads), the event loop's from its per-tunnel atomics.
type Counts struct {
	// Dirs are client → upstream, then upstream → client.
	Dirs [2]DirCounts
}

// DirCounts are one direction's counts.
type DirCounts struct {
	// Bytes moved: on the kernel, redirected plus passed for userspace to relay while demoted.
	Bytes uint64
	// Segments: the verdict's skbs redirected, or the loop's reads that returned bytes, which wrap at 2³²
	// (two share an atomic): compare two of them modulo 2³².
	Segments uint64
	// Demotions: times the direction reached its held limit (the kernel engine only).
	Demotions uint64
}

// A Counter is a Carrier that keeps Counts.
type Counter interface {
	Carrier
	Counts() Counts
}

// Counts returns the counts of the engine that carries p now, and its kind; false when no engine carries
// it or its engine keeps none (splice, the goroutine Copier). The counts start again from 0 with each
// engine that carries the pair, so a policy compares two only while the kind and carrier stay the same.
func (p *Pair) Counts() (c Counts, carrier Carrier, ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	k, ok := p.carrier.(Counter)
	if !ok || p.ending {
		return Counts{}, nil, false
	}
	return k.Counts(), p.carrier, true
}

// Counts returns the loop's counts of the pair.
func (c *loopCarrier) Counts() Counts {
	up, down := c.h.Bytes()
	upReads, downReads := c.h.Reads()
	return Counts{Dirs: [2]DirCounts{{Bytes: uint64(up), Segments: uint64(upReads)},
		{Bytes: uint64(down), Segments: uint64(downReads)}}}
}

var _ Counter = (*loopCarrier)(nil)
