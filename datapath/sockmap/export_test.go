package sockmap

// The test knobs of the engine (testHooks), in one place: only this package's tests and benchmarks turn
// them.

// breakFINDrain makes k carry each FIN as soon as it is seen, without waiting for the bytes before it: the
// naive relay of docs/datapath.md, which the self-test must refuse.
func (k *Engine) breakFINDrain() { k.hooks.carryFINEarly = true }

// setSendBuffer sets both sockets' send buffer to n (SO_SNDBUFFORCE) as each pair enters the kernel; 0
// leaves TCP's autotuning.
func (k *Engine) setSendBuffer(n int) { k.hooks.sndbuf = n }

// dropModeEvents makes k drop every mode event from now on, counting each as lost, as a full ring buffer
// would.
func (k *Engine) dropModeEvents() { k.hooks.dropModeEvents.Store(true) }

// droppedModeEvents is how many mode events k dropped since dropModeEvents.
func (k *Engine) droppedModeEvents() uint64 { return k.hooks.droppedModeEvents.Load() }

// stealModeEvents makes k drop every mode event from now on without counting it lost, as another process
// reading the shared ring buffer takes it, until it is called with false (that process stopped reading).
func (k *Engine) stealModeEvents(on bool) { k.hooks.stealModeEvents.Store(on) }

// pauseSweeps stops k's periodic sweeps while it shares its objects; the last one, once sharing ends,
// still runs.
func (k *Engine) pauseSweeps() { k.hooks.pauseSweeps.Store(true) }

// beforeLateEnd makes f run in the loop between its pick of a tunnel to end for a socket error and that
// end, k.mu released. Set before the engine carries a pair.
func (k *Engine) beforeLateEnd(f func(kt *kernelTunnel)) { k.hooks.beforeLateEnd = f }

// beforeSettle makes f run in stopAlive once a tunnel has left the loop, before it is given back. Set before
// the engine carries a pair.
func (k *Engine) beforeSettle(f func(kt *kernelTunnel)) { k.hooks.beforeSettle = f }

// afterSettle makes f run with the bytes each give-back of k read and did not write, per direction, before
// they become the pair's peeked bytes (or, refused, go back to the relaying goroutines). Set before the
// engine carries a pair.
func (k *Engine) afterSettle(f func(held [2][]byte)) { k.hooks.afterSettle = f }
