// Package datapath moves a tunnel's bytes once its handshake is done. It knows nothing of HTTP, routes,
// pools, limits or metrics: it is given two connected sockets as a Pair, carries bytes both ways (each
// FIN after the last byte before it, a reset on error) and reports once, when both sockets are closed,
// why the pair ended.
//
// # The contract
//
// An Engine carries pairs: Copy (a userspace buffer), Splice (splice(2) through a pipe, on the event loop:
// EventLoop.Splice) and the kernel engine of datapath/sockmap. Accepts says whether an engine can carry two endpoints at all (splice and
// sockmap cannot carry TLS: the bytes must be decrypted in userspace); the caller picks an engine that
// accepts the pair and calls Carry, which takes the sockets over and returns at once.
//
// While an engine carries a pair it holds it with a Carrier (Pair.Hold): what the pair asks of the engine
// (bytes moved that the pair's counters do not hold yet, when a byte last moved) and how the pair lets go
// of it when it ends (Release, called once, before the sockets are closed). A Carrier that is a
// SocketOwner has closed the endpoints' conns and holds the sockets by descriptors of its own (the kernel
// engine, to keep them out of Go's poller); the pair then reaches the sockets through it until Release.
//
// Bytes a handshake read past its own end travel with their endpoint as Endpoint.Peeked, and reach the
// other side before any byte an engine moves. Every engine writes them exactly once (Direction.WritePeeked).
//
// A pair ends once, through Pair.End or Pair.Fail, with a reason. Reasons that name a side come from one
// function, Blame, whichever engine saw the error.
//
// # Moving a pair between engines
//
// Move hands a live pair from the engine carrying it to another, without losing, duplicating or
// reordering a byte: the carrier's Stop returns once the old engine holds no byte of the pair (every byte
// it read is written, nothing more is read), and the new engine then starts from the sockets as they are.
// Copy (on goroutines or on the event loop), Splice and the kernel engine can stop. The event loop (copy and
// splice) and the kernel engine give a pair back as new Go connections of their descriptors, which replace the pair's own
// (closed when the engine took the descriptors).
//
// # Lock order
//
// A Pair's lock, then an engine's. Pair.End calls Carrier.Release with the pair's lock held; an engine
// that takes its own lock in Release must never take a pair's lock while holding its own.
package datapath
