package relay

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/internal/streamtest"
)

// finOrder says which side of a duplex transfer sends its FIN first.
type finOrder int

const (
	together      finOrder = iota // both sides send and half-close at once
	clientFirst                   // the client sends everything and its FIN; only then does the upstream send
	upstreamFirst                 // the mirror image
)

func (o finOrder) String() string {
	return [...]string{"together", "client-first", "upstream-first"}[o]
}

// duplexCase is one byte-exactness scenario: how many bytes each side sends, how many of them ride with the
// handshake (pipelined behind the request, or in the same write as the 101), and who half-closes first.
type duplexCase struct {
	toUpstream, toClient int
	pipelined, with101   int
	order                finOrder
}

func (c duplexCase) String() string {
	return fmt.Sprintf("up%d(pipe%d)-down%d(101+%d)-%s", c.toUpstream, c.pipelined, c.toClient, c.with101, c.order)
}

// runDuplex opens a tunnel and moves both streams of tc through it; see transfer.
func runDuplex(t *testing.T, r *testRelay, up *fakeUpstream, tc duplexCase, seed uint64) {
	t.Helper()
	tr := newTransfer(tc, seed)
	c, u := openTunnel(t, r.Addr, up, tr.toUpstream[:tc.pipelined], tr.toClient[:tc.with101])
	for _, err := range tr.run(c, u) {
		t.Error(err)
	}
	if !t.Failed() {
		waitTunnelsGone(t, r)
	}
}

// transfer is the pair of streams of one duplexCase, generated as they are sent and checked as they are
// received, so that a test holds none of them whole.
type transfer struct {
	tc   duplexCase
	seed uint64 // of the stream to the upstream; seed+1 is that of the stream to the client
	// toUpstream and toClient are the first bytes of each stream, those that ride with the handshake:
	// tc.pipelined behind the request, tc.with101 in the 101's segment.
	toUpstream, toClient []byte
}

func newTransfer(tc duplexCase, seed uint64) *transfer {
	return &transfer{tc: tc, seed: seed, toUpstream: streamPrefix(seed, tc.pipelined), toClient: streamPrefix(seed+1, tc.with101)}
}

// run sends both streams (less what rode with the handshake) and half-closes in the case's order. Each end
// checks it read exactly the other's stream and then EOF, which proves the FIN came after every byte and
// that one direction kept flowing after the other's FIN.
func (tr *transfer) run(c *clientConn, u *upstreamConn) []error {
	type end struct {
		name              string
		conn              *net.TCPConn
		rd                io.Reader
		sendSeed, expSeed uint64
		sendSize, expSize int
		sent              int // bytes of the stream it sends already on their way with the handshake
		waitEOF           bool
	}
	up, down := tr.seed, tr.seed+1
	ends := []end{
		{name: "client", conn: c.TCPConn, rd: c.R, sendSeed: up, sendSize: tr.tc.toUpstream, expSeed: down, expSize: tr.tc.toClient,
			sent: tr.tc.pipelined, waitEOF: tr.tc.order == upstreamFirst},
		{name: "upstream", conn: u.TCPConn, rd: u.R, sendSeed: down, sendSize: tr.tc.toClient, expSeed: up, expSize: tr.tc.toUpstream,
			sent: tr.tc.with101, waitEOF: tr.tc.order == clientFirst},
	}
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for _, e := range ends {
		gotEOF := make(chan struct{})
		wg.Add(2)
		go func() { // reader
			defer wg.Done()
			got := newStreamCheck(e.expSeed, int64(e.expSize))
			n, err := copyWithin(e.conn, got, e.rd, 60*time.Second)
			close(gotEOF)
			if err != nil {
				errs <- fmt.Errorf("%s: read: %v (after %d bytes)", e.name, err, n)
				return
			}
			if d := got.Diff(); d != "" {
				errs <- fmt.Errorf("%s received a wrong stream: %s", e.name, d)
			}
		}()
		go func() { // writer
			defer wg.Done()
			if e.waitEOF {
				<-gotEOF
			}
			src := streamReader(e.sendSeed, int64(e.sendSize))
			_, _ = io.CopyN(io.Discard, src, int64(e.sent))
			if err := writeStream(e.conn, src, nil); err != nil {
				errs <- fmt.Errorf("%s: write: %v", e.name, err)
				return
			}
			if err := e.conn.CloseWrite(); err != nil {
				errs <- fmt.Errorf("%s: shutdown write: %v", e.name, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	var all []error
	for err := range errs {
		all = append(all, err)
	}
	return all
}

// waitTunnelsGone waits until the relay holds no tunnel.
func waitTunnelsGone(t testing.TB, r *testRelay) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for r.Tunnels().Len() > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d tunnels still live 10s after both ends finished", r.Tunnels().Len())
		}
		time.Sleep(5 * time.Millisecond)
	}
	if r.kernel != nil {
		assertMapsEmpty(t, r.kernel) // every end of a tunnel removes its sockets from the maps
	}
}

func TestDuplexByteExact(t *testing.T) {
	const mb = 1 << 20
	var cases []duplexCase
	for _, order := range []finOrder{together, clientFirst, upstreamFirst} {
		for _, sz := range [][2]int{{0, 0}, {1, 1}, {70_000, 70_000}, {4 * mb, 3 * mb}, {0, 3 * mb}, {4 * mb, 0}} {
			cases = append(cases, duplexCase{toUpstream: sz[0], toClient: sz[1], order: order})
			// The same with bytes riding on the handshake: pipelined behind the request, and in the 101's
			// segment, including the case where that is the whole stream.
			if sz[0] > 0 || sz[1] > 0 {
				cases = append(cases, duplexCase{toUpstream: sz[0], toClient: sz[1], order: order,
					pipelined: min(sz[0], 1000), with101: min(sz[1], 1000)})
			}
		}
	}
	// 64 MiB each way, half-closed in both orders: on the kernel datapath most of it is still inside the
	// kernel when the first FIN arrives (docs/datapath.md, "FIN, RST and the end of a tunnel").
	for _, order := range []finOrder{clientFirst, upstreamFirst} {
		cases = append(cases, duplexCase{toUpstream: 64 * mb, toClient: 64 * mb, order: order, pipelined: 1000, with101: 1000})
	}
	for _, dp := range testDatapaths {
		t.Run(string(dp), func(t *testing.T) {
			up := startUpstream(t)
			r := startRelay(t, dp, []string{up.Addr})
			for i, tc := range cases {
				t.Run(tc.String(), func(t *testing.T) { runDuplex(t, r, up, tc, uint64(i)) })
			}
		})
	}
}

// TestDuplexManyTunnels opens many tunnels, then moves every tunnel's streams at once.
func TestDuplexManyTunnels(t *testing.T) {
	const tunnels = 100
	tc := duplexCase{toUpstream: 256 << 10, toClient: 300 << 10, pipelined: 100, with101: 100, order: together}
	for _, dp := range testDatapaths {
		t.Run(string(dp), func(t *testing.T) {
			up := startUpstream(t)
			r := startRelay(t, dp, []string{up.Addr})
			trs := make([]*transfer, tunnels)
			cs := make([]*clientConn, tunnels)
			us := make([]*upstreamConn, tunnels)
			for i := range tunnels {
				trs[i] = newTransfer(tc, uint64(i)*7)
				cs[i], us[i] = openTunnel(t, r.Addr, up, trs[i].toUpstream[:tc.pipelined], trs[i].toClient[:tc.with101])
			}
			if n := r.Tunnels().Len(); n != tunnels {
				t.Fatalf("%d live tunnels, want %d", n, tunnels)
			}
			if dp == DatapathSockmap {
				assertNoFallback(t, r, tunnels)
			}
			var wg sync.WaitGroup
			errs := make([][]error, tunnels)
			for i := range tunnels {
				wg.Add(1)
				go func() {
					defer wg.Done()
					errs[i] = trs[i].run(cs[i], us[i])
				}()
			}
			wg.Wait()
			for i, es := range errs {
				for _, err := range es {
					t.Errorf("tunnel %d: %v", i, err)
				}
			}
			if !t.Failed() {
				waitTunnelsGone(t, r)
			}
		})
	}
}

// TestUpstreamSpeaksFirst is the server-first protocol: the upstream's first bytes come with its 101 and
// then it waits for the client, which only answers once it has them. Nothing may sit in a buffer waiting for
// more traffic.
func TestUpstreamSpeaksFirst(t *testing.T) {
	for _, dp := range testDatapaths {
		t.Run(string(dp), func(t *testing.T) {
			up := startUpstream(t)
			r := startRelay(t, dp, []string{up.Addr})
			greeting := []byte("hello from upstream")
			c, u := openTunnel(t, r.Addr, up, nil, greeting)
			got := make([]byte, len(greeting))
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(c.R, got); err != nil || !bytes.Equal(got, greeting) {
				t.Fatalf("client read %q, %v; want the greeting", got, err)
			}
			c.Write([]byte("hi"))
			u.SetReadDeadline(time.Now().Add(5 * time.Second))
			reply := make([]byte, 2)
			if _, err := io.ReadFull(u.R, reply); err != nil || string(reply) != "hi" {
				t.Fatalf("upstream read %q, %v; want \"hi\"", reply, err)
			}
		})
	}
}

// TestPingPongSurvivesGC runs a round-trip workload across forced garbage collections: the tunnel's sockets
// must be owned by something reachable, or a finalizer closes them (docs/datapath.md, "Go owns the
// sockets' descriptors").
func TestPingPongSurvivesGC(t *testing.T) {
	for _, dp := range testDatapaths {
		t.Run(string(dp), func(t *testing.T) {
			up := startUpstream(t)
			r := startRelay(t, dp, []string{up.Addr})
			c, u := openTunnel(t, r.Addr, up, nil, nil)
			go io.Copy(u, u.R) // the upstream echoes
			msg := make([]byte, 32)
			for i := range 200 {
				if i%20 == 0 {
					runtime.GC()
				}
				msg[0] = byte(i)
				c.Write(msg)
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				got := make([]byte, len(msg))
				if _, err := io.ReadFull(c.R, got); err != nil || !bytes.Equal(got, msg) {
					t.Fatalf("round trip %d: read %v, %v", i, got[:1], err)
				}
			}
		})
	}
}

// TestResetClosesBoth checks that a reset on either side ends the tunnel and resets the other side, and
// that the reason names who reset.
func TestResetClosesBoth(t *testing.T) {
	for _, dp := range testDatapaths {
		for _, resetter := range []string{"client", "upstream"} {
			t.Run(string(dp)+"/"+resetter, func(t *testing.T) {
				up := startUpstream(t)
				r := startRelay(t, dp, []string{up.Addr})
				c, u := openTunnel(t, r.Addr, up, nil, nil)
				// Some traffic first, so the tunnel is in its steady state.
				c.Write([]byte("x"))
				u.SetReadDeadline(time.Now().Add(5 * time.Second))
				if _, err := io.ReadFull(u.R, make([]byte, 1)); err != nil {
					t.Fatal(err)
				}
				tun := r.Tunnels().Tunnels()[0]

				var victim *net.TCPConn
				var rd io.Reader
				want := ReasonClientReset
				if resetter == "client" {
					c.SetLinger(0)
					c.Close()
					victim, rd = u.TCPConn, u.R
				} else {
					u.SetLinger(0)
					u.Close()
					victim, rd = c.TCPConn, c.R
					want = ReasonUpstreamReset
				}
				_, err := readAllWithin(victim, rd, 5*time.Second)
				if !errors.Is(err, unix.ECONNRESET) {
					t.Errorf("other side read %v, want a reset", err)
				}
				awaitTunnelEnd(t, r, tun, want)
			})
		}
	}
}

// awaitTunnelEnd waits 5s at most for tun to end, fails t unless it ended for want, then waits until r
// holds no tunnel.
func awaitTunnelEnd(t *testing.T, r *testRelay, tun *Tunnel, want string) {
	t.Helper()
	select {
	case <-tun.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("tunnel did not end")
	}
	if tun.Reason() != want {
		t.Errorf("reason %q, want %q", tun.Reason(), want)
	}
	waitTunnelsGone(t, r)
}

// TestResetWhileWrittenToIsAReset: a peer resets while the relay is writing to it (the other peer's stream
// fills its buffers, and it does not read). The relay's failed write takes the socket's error, after which a
// read of that socket returns 0 as at a FIN; the other peer must still see a reset, never a clean EOF first,
// and the tunnel must be blamed on the peer that reset. The datapath's two directions race for the reset
// socket, so each case resets many tunnels.
func TestResetWhileWrittenToIsAReset(t *testing.T) {
	const rounds = 50
	for _, dp := range testDatapaths {
		for _, resetter := range []string{"client", "upstream"} {
			t.Run(string(dp)+"/"+resetter, func(t *testing.T) {
				up := startUpstream(t)
				r := startRelay(t, dp, []string{up.Addr})
				eofs := 0
				for range rounds {
					if resetWhileWrittenTo(t, r, up, resetter == "client") {
						eofs++
					}
				}
				if eofs > 0 {
					t.Errorf("of %d resets, %d reached the other peer as a clean EOF", rounds, eofs)
				}
			})
		}
	}
}

// resetWhileWrittenTo opens a tunnel, has one peer (the victim) send until the other, which does not read,
// leaves the relay's write to it blocked, then resets that other peer. It reports whether the victim read a
// clean EOF rather than a reset; it fails the test on another end, or a reason that blames the wrong side.
func resetWhileWrittenTo(t *testing.T, r *testRelay, up *fakeUpstream, clientResets bool) (cleanEOF bool) {
	t.Helper()
	c, u := openTunnel(t, r.Addr, up, nil, nil)
	tun := r.Tunnels().Tunnels()[0]
	resetter, victim, rd, want := u.TCPConn, c.TCPConn, io.Reader(c.R), ReasonUpstreamReset
	if clientResets {
		resetter, victim, rd, want = c.TCPConn, u.TCPConn, u.R, ReasonClientReset
	}
	_ = resetter.SetReadBuffer(16 << 10)
	streamtest.FillUntilBlocked(t, victim)
	// The victim has stopped writing: a write of its own would take its socket's error, and its read would
	// then return 0 too.
	_ = resetter.SetLinger(0)
	_ = resetter.Close()
	_, err := readAllWithin(victim, rd, 5*time.Second)
	if err != nil && !isReset(err) {
		t.Fatalf("the victim's read ended with %v, want a reset", err)
	}
	awaitTunnelEnd(t, r, tun, want)
	return err == nil
}

// TestFullCloseWhileOtherSideSends: the client closes (not half-closes) while the upstream keeps sending.
// The relay's writes to the client then fail; the tunnel must end and the upstream must learn of it.
func TestFullCloseWhileOtherSideSends(t *testing.T) {
	for _, dp := range testDatapaths {
		t.Run(string(dp), func(t *testing.T) {
			up := startUpstream(t)
			r := startRelay(t, dp, []string{up.Addr})
			c, u := openTunnel(t, r.Addr, up, nil, nil)
			writeErr := make(chan error, 1)
			go func() {
				chunk := make([]byte, 64<<10)
				for {
					if _, err := u.Write(chunk); err != nil {
						writeErr <- err
						return
					}
				}
			}()
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(c.R, make([]byte, 1<<20)); err != nil {
				t.Fatal(err)
			}
			tun := r.Tunnels().Tunnels()[0] // before the close: the tunnel may be gone at once after it
			c.Close()
			select {
			case <-tun.Done():
			case <-time.After(10 * time.Second):
				t.Fatal("tunnel did not end after the client went away")
			}
			if tun.Reason() != ReasonClientReset && tun.Reason() != ReasonClientError {
				t.Errorf("reason %q, want the client's fault", tun.Reason())
			}
			// The upstream learns of it: its writes fail once the relay has reset its side. (It may read
			// a FIN first: the client's close can reach the relay as a FIN, which is carried on.)
			select {
			case err := <-writeErr:
				if !errors.Is(err, unix.ECONNRESET) && !errors.Is(err, unix.EPIPE) {
					t.Errorf("upstream write failed with %v, want a reset", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("upstream could still write 10s after the tunnel ended")
			}
		})
	}
}

// TestHalfCloseWhileBehind: the client sends its FIN while it has not read anything of a large stream
// the upstream sent, so on the kernel datapath the client's socket still has bytes queued for it inside
// the kernel when its FIN arrives. The FIN must end only the client's direction; the stream must still
// arrive whole, then EOF.
func TestHalfCloseWhileBehind(t *testing.T) {
	const size = 8 << 20
	for _, dp := range testDatapaths {
		t.Run(string(dp), func(t *testing.T) {
			up := startUpstream(t)
			r := startRelay(t, dp, []string{up.Addr})
			c, u := openTunnel(t, r.Addr, up, nil, nil)
			sent := make(chan error, 1)
			go func() {
				err := writeStream(u, streamReader(42, size), nil)
				if err == nil {
					err = u.CloseWrite()
				}
				sent <- err
			}()
			time.Sleep(50 * time.Millisecond) // let the stream pile up before the client's FIN
			if err := c.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			if got, err := readAllWithin(u.TCPConn, u.R, 10*time.Second); err != nil || len(got) != 0 {
				t.Fatalf("upstream read %d bytes, %v; want EOF at once", len(got), err)
			}
			got := newStreamCheck(42, size)
			if n, err := copyWithin(c.TCPConn, got, c.R, 30*time.Second); err != nil {
				t.Fatalf("client read %d of %d bytes, then %v", n, size, err)
			}
			if d := got.Diff(); d != "" {
				t.Fatal(d)
			}
			if err := <-sent; err != nil {
				t.Fatalf("upstream write: %v", err)
			}
			waitTunnelsGone(t, r)
		})
	}
}
