// Package sockmap is the kernel engine (--datapath sockmap): it puts both sockets of a pair into a BPF
// sockhash, whose verdict program (bpf/sockrelay.c, loaded by package loader) redirects each side's bytes
// to the other inside the kernel. Userspace keeps no goroutine and no buffer per pair while bytes flow;
// docs/datapath.md tells why each part is as it is, under the headings the comments cite.
//
// The files, by job:
//
//   - engine.go: the Engine (a datapath.Engine), Start (probe, load, self-test), Stats (read by a
//     collector at scrape time), and a pair's release when it ends.
//   - handoff.go: a pair entering the kernel (Carry): peeked and queued bytes first, then the insertion;
//     a pair that cannot enter runs on copy, said to the fallback callback.
//   - loop.go: the epoll loop that watches every kernel pair's sockets for FIN, hang-up and error, and
//     finds what lost mode events would have started.
//   - drain.go: each FIN carried once every byte before it has been handed on; a pair whose bytes stop
//     reaching the peer is reset (stall detection).
//   - backpressure.go: a direction the verdict demoted for a slow reader, relayed by userspace until it
//     resumes; the overflow reset when both peers stop reading.
//   - selftest.go: the self-test the engine must pass on this kernel before it carries any tunnel.
//   - adopt.go: a kernel tunnel handed to another engine over the same BPF objects (an upgrade's new
//     process), its sockets left in the maps (LetGo, Adopt, StartAdopted).
//   - stop.go: giving a pair back alive at a byte boundary, for a move to another engine (not wired in
//     yet: the tests reach it through a test hook).
//
// The test knobs are one testHooks field of the Engine, turned only from export_test.go.
//
// # Lock order
//
// A pair's lock (datapath.Pair), then the engine's mu. Pair.End calls the carrier's Release, which takes
// mu, with the pair's lock held; the engine therefore ends a pair (End, Fail) only after it has let go of
// mu.
package sockmap
