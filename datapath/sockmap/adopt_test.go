package sockmap

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/internal/syncbuf"
	"github.com/sockrelay/sockrelay/loader"
)

// adoptingEngine returns an engine over k's BPF objects, as a new process of an upgrade opens them
// (Export, then loader.Adopt), closed when t ends. Both engines share the objects from here on.
func adoptingEngine(t *testing.T, k *Engine) *Engine {
	t.Helper()
	files, err := k.Export()
	if err != nil {
		t.Fatal(err)
	}
	maps, err := loader.Adopt(files)
	if err != nil {
		t.Fatal(err)
	}
	logs := &syncbuf.Buffer{}
	k2, err := newEngineOver(slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})), nil, maps)
	if err != nil {
		t.Fatal(err)
	}
	k2.share()
	t.Cleanup(func() {
		k2.Close()
		if t.Failed() {
			t.Logf("adopting engine's log:\n%s", logs.String())
		}
	})
	return k2
}

// handOver moves p from k to k2 as an upgrade moves it between processes: k lets go of it, p's sockets
// cross as new descriptors into a pair restored from its state (its peeked bytes included), p ends here
// as handed over, and k2 adopts the new pair, after wait. It returns the new pair.
// Past wait, the window without an owner lasts until until, given the state handed over, reports true (at
// most 5 s more): on a loaded machine the peers may not run within a fixed window.
func handOver(t *testing.T, k, k2 *Engine, p *datapath.Pair, wait time.Duration, until func(st TunnelState) bool) *datapath.Pair {
	t.Helper()
	st, err := k.LetGo(p)
	if err != nil {
		t.Fatalf("let go: %v", err)
	}
	conns := [2]*net.TCPConn{}
	for i, c := range []*net.TCPConn{p.Client().Conn, p.Upstream().Conn} {
		f, err := c.File()
		if err != nil {
			t.Fatal(err)
		}
		fc, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = fc.(*net.TCPConn)
	}
	if ps := p.State().Peeked; len(ps[0])+len(ps[1]) > 0 {
		t.Logf("bytes a relaying goroutine read and did not write went along: %d and %d", len(ps[0]), len(ps[1]))
	}
	p2 := datapath.RestorePair(datapath.Sockmap, datapath.Endpoint{Conn: conns[0]}, datapath.Endpoint{Conn: conns[1]}, p.State(), nil)
	p2.ID = p.ID
	t.Cleanup(func() { p2.End(datapath.ReasonShutdown, true) })
	if up, down := p.Bytes(); up+down == 0 {
		t.Error("the pair let go of counts 0 and 0: the bytes the kernel moved so far were not folded in")
	}
	p.End("handed_over", false) // closes this side's descriptors only
	time.Sleep(wait)
	for deadline := time.Now().Add(5 * time.Second); until != nil && !until(st) && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	if err := k2.Adopt(p2, st); err != nil {
		t.Fatalf("adopt: %v", err)
	}
	return p2
}

// TestAdoptMovesKernelTunnel moves a kernel tunnel from one engine to another over the same BPF objects
// in the middle of 16 MiB each way, paced so that bytes flow throughout. Its sockets never leave the
// maps: bytes keep arriving while neither engine holds the tunnel. Every byte arrives once, in order,
// each FIN after the last byte; the tunnel ends as closed on the adopting engine, the first holds
// nothing, and the maps are empty. The second case makes a reader pause after the move past a small held
// limit, so that a direction is demoted on the adopting engine, whose ring buffer reader is stopped: only
// the other engine reads the event, and the adopter's sweep must find the demotion.
func TestAdoptMovesKernelTunnel(t *testing.T) {
	for _, tc := range []struct {
		name        string
		heldLimit   uint64
		pauseReader time.Duration // the upstream's reader pauses after the move
		stopEvents  bool
		// relaying: the client's reader stops before the move and reads again after it, so that the
		// move finds the upstream → client direction demoted and its relaying goroutine in a write
		// (waitRelayingStuck), and the adopter finds bytes of it to relay (adopterMustRelay).
		relaying bool
	}{
		{"bytes flowing", 0, 0, false, false},
		{"a direction demoted after the move, its event read by the old engine", 64 << 10, 300 * time.Millisecond, true, false},
		{"a direction demoted and relayed at the move", 64 << 10, 0, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k, _ := newTestEngine(t)
			if tc.heldLimit != 0 {
				// Small buffers on the paused reader's path, so that its pause fills them and the
				// kernel holds more than the limit.
				k.heldLimit = tc.heldLimit
				k.setSendBuffer(64 << 10)
			}
			k2 := adoptingEngine(t, k)
			if tc.stopEvents {
				if err := k2.StopEvents(); err != nil {
					t.Fatal(err)
				}
			}
			client, upstream, p := carryPair(t, k)
			if tc.heldLimit != 0 {
				_ = upstream.SetReadBuffer(64 << 10)
			}
			relaysBefore := k2.relays.Load()
			const size, chunk = 16 << 20, 32 << 10
			toUp, toClient := stream(21, size), stream(22, size)
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()

			var clientRead atomic.Int64
			atMove, moved := make(chan struct{}), make(chan struct{})
			var moveOnce sync.Once
			var p2 *datapath.Pair
			var inWindow int64
			errs := make(chan error, 4)
			var wg sync.WaitGroup
			for _, e := range []struct {
				name      string
				conn      *net.TCPConn
				send, exp []byte
			}{{"client", client, toUp, toClient}, {"upstream", upstream, toClient, toUp}} {
				wg.Add(2)
				go func() { // paced: 32 KiB a millisecond
					defer wg.Done()
					_ = e.conn.SetWriteDeadline(time.Now().Add(60 * time.Second))
					for off := 0; off < size; off += chunk {
						if _, err := e.conn.Write(e.send[off : off+chunk]); err != nil {
							errs <- fmt.Errorf("%s write: %w", e.name, err)
							return
						}
						time.Sleep(time.Millisecond)
					}
					if err := e.conn.CloseWrite(); err != nil {
						errs <- fmt.Errorf("%s half-close: %w", e.name, err)
					}
				}()
				go func() {
					defer wg.Done()
					_ = e.conn.SetReadDeadline(time.Now().Add(60 * time.Second))
					got := make([]byte, 0, size)
					buf := make([]byte, 64<<10)
					for {
						n, err := e.conn.Read(buf)
						got = append(got, buf[:n]...)
						if e.name == "client" {
							clientRead.Store(int64(len(got)))
							if len(got) >= 1<<20 {
								moveOnce.Do(func() { close(atMove) })
								if tc.relaying {
									select {
									case <-moved:
									case <-ctx.Done():
									}
								}
							}
						} else if tc.pauseReader > 0 && len(got) >= 2<<20 {
							select {
							case <-moved:
								time.Sleep(tc.pauseReader)
								tc.pauseReader = 0
							case <-ctx.Done():
							}
						}
						if err == io.EOF {
							break
						}
						if err != nil {
							errs <- fmt.Errorf("%s read %d of %d bytes, then: %w", e.name, len(got), len(e.exp), err)
							return
						}
					}
					if d := diffStreams(got, e.exp); d != "" {
						errs <- fmt.Errorf("%s received a wrong stream: %s", e.name, d)
					}
				}()
			}
			select {
			case <-atMove:
			case <-ctx.Done():
				t.Fatal("the client never read its first MiB")
			}
			var toClientDir *kernelDir
			if tc.relaying {
				toClientDir = kernelDirOf(t, k, false)
				waitRelayingStuck(t, k, toClientDir)
			}
			before := clientRead.Load()
			p2 = handOver(t, k, k2, p, 50*time.Millisecond, func(st TunnelState) bool {
				if tc.relaying {
					return adopterMustRelay(t, k, p, st, toClientDir)
				}
				return clientRead.Load() > before
			})
			inWindow = clientRead.Load() - before
			close(moved)
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			if inWindow == 0 && !tc.relaying {
				t.Error("no byte reached the client while neither engine held the tunnel: the sockets left the kernel datapath")
			}
			t.Logf("bytes the client received while no engine held the tunnel: %d", inWindow)
			waitEnded(t, p2)
			if p2.Reason() != datapath.ReasonClosed {
				t.Errorf("the adopted pair ended with %q (%v), want %q", p2.Reason(), p2.Err(), datapath.ReasonClosed)
			}
			if up, down := p2.Bytes(); up != size || down != size {
				t.Errorf("the adopted pair counts %d and %d bytes, want %d each way", up, down, size)
			}
			if n := k.Tunnels(); n != 0 {
				t.Errorf("the engine that let go still carries %d tunnels", n)
			}
			if tc.heldLimit != 0 && k2.relays.Load() == relaysBefore {
				t.Error("the adopting engine relayed no demoted direction after the move; the case tests nothing")
			}
			assertMapsEmpty(t, k2)
		})
	}
}

// waitRelayingStuck waits until a goroutine of k relays d, demoted, and cannot catch up: d's destination
// holds at least a quarter of the held limit unsent (its reader stopped), so the goroutine may not ask to
// resume (hasRoom) and waits in a write. A relay seen earlier, while the destination still had room, may
// catch up and resume before a move: then the move finds nothing demoted (on a loaded machine the psock
// stalls demote a direction whose reader still reads).
func waitRelayingStuck(t *testing.T, k *Engine, d *kernelDir) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		k.mu.Lock()
		stuck := false
		if d.relaying && !d.kt.released {
			unsent, err := unix.IoctlGetInt(d.dst.fd, unix.SIOCOUTQNSD)
			stuck = err == nil && uint64(unsent) >= d.limit/4
		}
		k.mu.Unlock()
		if stuck {
			return
		}
	}
	t.Fatal("no direction was demoted and relayed with its destination full within 10s")
}

// adopterMustRelay reports whether the engine that adopts d's tunnel, handed over with st from p, finds
// bytes of d to relay, so that Adopt must start its relay: bytes the verdict passed that no relaying
// goroutine read, or bytes one read and did not write (p's peeked bytes). Neither goes away while no
// engine holds the tunnel. d is the tunnel's direction on k, the engine that let go of it; the maps are
// shared.
func adopterMustRelay(t *testing.T, k *Engine, p *datapath.Pair, st TunnelState, d *kernelDir) bool {
	t.Helper()
	i := 0
	if !d.src.isClient {
		i = 1
	}
	if len(p.State().Peeked[i]) > 0 {
		return true
	}
	vs, err := k.maps.Stats(st.Cookies[i])
	if err != nil {
		t.Fatalf("the tunnel handed over left the maps: %v", err)
	}
	return vs.Passed > st.Dirs[i].UserRead
}

// TestAdoptRefusesOtherSockets: a state whose cookies are not the pair's sockets is refused, and the pair
// is left as it was, not carried.
func TestAdoptRefusesOtherSockets(t *testing.T) {
	k, _ := newTestEngine(t)
	k2 := adoptingEngine(t, k)
	_, _, p := carryPair(t, k)
	st, err := k.LetGo(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k2.Adopt(p, st) }) // back in the maps' hands, for their cleanup
	wrong := st
	wrong.Cookies[0]++
	if err := k2.Adopt(p, wrong); err == nil {
		t.Fatal("adopted a pair whose sockets are not the state's")
	}
	if p.Carrier() != nil || p.Ending() {
		t.Errorf("after a refused adoption the pair has carrier %v, ending %v; want none, live", p.Carrier(), p.Ending())
	}
}

// TestStartAdoptedLeavesLiveTunnels: StartAdopted runs the self-test over objects that carry a live tunnel
// of the other engine: the self-test's tunnels come and go, and the live one's entries and bytes are left
// alone.
func TestStartAdoptedLeavesLiveTunnels(t *testing.T) {
	k, _ := newTestEngine(t)
	client, upstream, _ := carryPair(t, k)
	files, err := k.Export()
	if err != nil {
		t.Fatal(err)
	}
	k2, err := StartAdopted(slog.New(slog.DiscardHandler), nil, k.heldLimit, files)
	if err != nil {
		t.Fatalf("start over adopted objects: %v", err)
	}
	t.Cleanup(func() { k2.Close() })
	n, err := k2.Entries()
	if err != nil {
		t.Fatal(err)
	}
	if n["verdict_map"] != 2 || n["targets"] != 2 || n["socks"] != 2 {
		t.Errorf("after the self-test the maps hold %v, want the live tunnel's 2 entries in each", n)
	}
	msg, got := stream(31, 64<<10), make([]byte, 64<<10)
	_ = client.SetDeadline(time.Now().Add(10 * time.Second))
	_ = upstream.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := client.Write(msg); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(upstream, got); err != nil {
		t.Fatalf("the live tunnel after the self-test: %v", err)
	}
	if d := diffStreams(got, msg); d != "" {
		t.Errorf("the live tunnel after the self-test: %s", d)
	}
}

// TestSharedSweepsUntilEveryReaderStops: a demotion whose event another reader of the shared ring buffer
// took is found by the sweeps while any other reader is left, and by one last recheck once the last stops.
// With two sharers (the process the engine adopted from, and one it exported to) the end of one leaves
// the sweeps on; once none is left, the loop rechecks every tunnel once more, the periodic sweeps paused
// here so that only that last recheck can find the demotion.
func TestSharedSweepsUntilEveryReaderStops(t *testing.T) {
	for _, tc := range []struct {
		name            string
		sharers         int
		pauseSweeps     bool
		unshareAfterDem bool // Unshare once the direction is demoted, else before the stream starts
	}{
		{"one of two readers stopped: the sweeps go on", 2, false, false},
		{"the last reader stopped: one last recheck", 1, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k, _ := newTestEngine(t)
			for range tc.sharers {
				files, err := k.Export()
				if err != nil {
					t.Fatal(err)
				}
				for _, f := range files {
					f.Close()
				}
			}
			if !tc.unshareAfterDem {
				k.Unshare()
			}
			if tc.pauseSweeps {
				k.pauseSweeps()
			}
			k.stealModeEvents(true)
			c, u, p := carryPair(t, k)
			d := kernelDirOf(t, k, false)
			const size = 64 << 20
			data := stream(41, size)
			wrote := make(chan error, 1)
			go sendStream(u, data, wrote)
			waitDemoted(t, k, d)
			if tc.unshareAfterDem {
				time.Sleep(3 * sharedSweep)
				k.mu.Lock()
				relaying := d.relaying
				k.mu.Unlock()
				if relaying {
					t.Fatal("the direction is relayed before sharing ended: the case tests nothing")
				}
				k.stealModeEvents(false) // the other process stopped reading
				k.Unshare()
			}
			if diff, err := readStream(c, data, 20*time.Second); err != nil || diff != "" {
				t.Fatalf("stream to the client (a demotion whose event another reader took was never found): %v %s", err, diff)
			}
			if werr := <-wrote; werr != nil {
				t.Fatalf("upstream write: %v", werr)
			}
			c.CloseWrite()
			waitEnded(t, p)
			assertMapsEmpty(t, k)
		})
	}
}

// TestLetGoBusy: a pair the engine cannot let go of now, but may a moment later, gives ErrBusy and is left
// as it was: one whose handshake is finishing (registered as a kernel tunnel, not carried yet), and one
// the engine is giving back already (a move off sockmap waiting for a client that does not read).
func TestLetGoBusy(t *testing.T) {
	t.Run("not carried yet", func(t *testing.T) {
		k, _ := newTestEngine(t)
		_, relayClient, relayUp, _ := tunnelEnds(t)
		p := datapath.NewPair(datapath.Sockmap, datapath.Endpoint{Conn: relayClient}, datapath.Endpoint{Conn: relayUp}, nil)
		t.Cleanup(func() { p.End(datapath.ReasonShutdown, true) })
		if _, err := k.LetGo(p); !errors.Is(err, ErrBusy) {
			t.Errorf("LetGo of a pair not carried yet returned %v, want ErrBusy", err)
		}
		k.Carry(p)
		if p.Kind() != datapath.Sockmap || p.Ending() {
			t.Fatalf("the pair did not enter the kernel after the refused LetGo: it runs on %s, ended %q", p.Kind(), p.Reason())
		}
		if _, err := k.LetGo(p); err != nil {
			t.Errorf("LetGo once carried: %v", err)
		}
	})
	t.Run("given back already", func(t *testing.T) {
		k, _ := newTestEngine(t)
		k.heldLimit = 0 // never demoted: the kernel holds what the client does not read
		_, up, p := carryPair(t, k)
		go func() { _, _ = up.Write(stream(62, 32<<20)) }() // the client reads none of it
		d := kernelDirOf(t, k, false)
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
			k.mu.Lock()
			st, handed, err := k.dirProgress(d, d.dst.fd)
			k.mu.Unlock()
			if err == nil && st.Bytes > handed+4<<20 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the kernel never held bytes for the client that does not read")
			}
		}
		moved := make(chan error, 1)
		go func() { moved <- datapath.Move(p, datapath.Copier{}) }()
		kt := p.Carrier().(*kernelTunnel)
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
			k.mu.Lock()
			stopping := kt.stopping
			k.mu.Unlock()
			if stopping {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the move did not begin within 5s")
			}
		}
		if _, err := k.LetGo(p); !errors.Is(err, ErrBusy) {
			t.Errorf("LetGo during a move off sockmap returned %v, want ErrBusy", err)
		}
		p.End(datapath.ReasonShutdown, true)
		<-moved
	})
}

// TestDemotionsCountedByTheirEngine: with the objects shared, a demotion is counted by the engine that
// carries the tunnel, once, whichever process reads its event: here the carrying engine reads no events
// (StopEvents), its sweep finds the demotion, and the other engine, which reads every event, counts none.
func TestDemotionsCountedByTheirEngine(t *testing.T) {
	k, _ := newTestEngine(t)
	k.heldLimit = 64 << 10
	k.setSendBuffer(64 << 10)
	k2 := adoptingEngine(t, k)
	if err := k.StopEvents(); err != nil {
		t.Fatal(err)
	}
	c, u, p := carryPair(t, k)
	_ = c.SetReadBuffer(64 << 10)
	d := kernelDirOf(t, k, false)
	const size = 16 << 20
	data := stream(43, size)
	wrote := make(chan error, 1)
	go sendStream(u, data, wrote)
	waitDemoted(t, k, d)
	if diff, err := readStream(c, data, 30*time.Second); err != nil || diff != "" {
		t.Fatalf("stream to the client: %v %s", err, diff)
	}
	if werr := <-wrote; werr != nil {
		t.Fatalf("upstream write: %v", werr)
	}
	// A demotion at the stream's end is found by the carrying engine's next sweep: give it a few.
	var st loader.Stats
	for deadline := time.Now().Add(10 * sharedSweep); ; time.Sleep(sharedSweep / 4) {
		var err error
		if st, err = k.maps.Stats(d.src.cookie); err != nil {
			t.Fatal(err)
		}
		if k.Stats().Demotions == st.Demotions || time.Now().After(deadline) {
			break
		}
	}
	if got := k.Stats().Demotions; got != st.Demotions {
		t.Errorf("the carrying engine counted %d demotions, the verdict made %d", got, st.Demotions)
	}
	if got := k2.Stats().Demotions; got != 0 {
		t.Errorf("the engine that carries no tunnel counted %d demotions (the other's, whose events it read)", got)
	}
	c.CloseWrite()
	u.CloseWrite()
	waitEnded(t, p)
	assertMapsEmpty(t, k)
}

// TestLateEndSparesPairLetGo: the loop picks a tunnel to end for a socket error (the client reset) under
// the engine's lock and ends it after; a LetGo in between hands the pair on (to another process, in an
// upgrade), and the late end must not end it there.
func TestLateEndSparesPairLetGo(t *testing.T) {
	k, _ := newTestEngine(t)
	let := make(chan error, 1)
	k.beforeLateEnd(func(kt *kernelTunnel) {
		_, err := k.LetGo(kt.p)
		let <- err
	})
	client, _, p := carryPair(t, k)
	_ = client.SetLinger(0)
	client.Close() // a reset: EPOLLERR on the relay's socket
	select {
	case err := <-let:
		if err != nil {
			t.Fatalf("let go between the pick and the end: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the loop did not pick the reset tunnel within 10s")
	}
	time.Sleep(50 * time.Millisecond) // the late end, if any, has run
	if p.Ending() {
		t.Errorf("the pair let go of was ended by the engine that let go: %q (%v)", p.Reason(), p.Err())
	}
	p.End(datapath.ReasonShutdown, true)
}
