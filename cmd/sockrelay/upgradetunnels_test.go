package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/loader"
	"github.com/sockrelay/sockrelay/relay"
	"github.com/sockrelay/sockrelay/upstream"
)

// streamByte is byte i of the checked stream seed: both ends of a tunnel know it, so a byte lost,
// repeated, reordered or changed anywhere in the stream is found at its offset.
func streamBytes(seed uint64, off int64, b []byte) {
	for i := range b {
		o := uint64(off) + uint64(i)
		x := (seed+1)*0x9E3779B97F4A7C15 ^ (o>>3)*0xBF58476D1CE4E5B9
		x ^= x >> 31
		x *= 0x94D049BB133111EB
		x ^= x >> 29
		b[i] = byte(x >> (8 * (o & 7)))
	}
}

// checkedSender writes the stream seed to w in chunks of 2 KiB, pace apart, until stop is closed (or,
// with limit above 0, limit bytes are out), then sends its FIN; it returns how many bytes it wrote.
func checkedSender(w *net.TCPConn, seed uint64, limit int64, pace time.Duration, stop <-chan struct{}) (int64, error) {
	buf := make([]byte, 2<<10)
	var off int64
	for limit <= 0 || off < limit {
		select {
		case <-stop:
			return off, w.CloseWrite()
		default:
		}
		n := int64(len(buf))
		if limit > 0 {
			n = min(n, limit-off)
		}
		streamBytes(seed, off, buf[:n])
		if _, err := w.Write(buf[:n]); err != nil {
			return off, fmt.Errorf("write at %d: %w", off, err)
		}
		off += n
		if pace > 0 {
			time.Sleep(pace)
		}
	}
	return off, w.CloseWrite()
}

// checkedReceiver reads r to its EOF and checks every byte against the stream seed; it returns how many
// arrived.
func checkedReceiver(r io.Reader, seed uint64) (int64, error) {
	buf, want := make([]byte, 32<<10), make([]byte, 32<<10)
	var off int64
	for {
		n, err := r.Read(buf)
		streamBytes(seed, off, want[:n])
		if i := firstDiff(buf[:n], want[:n]); i >= 0 {
			return off, fmt.Errorf("byte %d: got %#x, want %#x (stream corrupted)", off+int64(i), buf[i], want[i])
		}
		off += int64(n)
		if err == io.EOF {
			return off, nil
		}
		if err != nil {
			return off, fmt.Errorf("read at %d: %w", off, err)
		}
	}
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// streamResult is what one end of a direction saw.
type streamResult struct {
	sent, received int64
	err            error
}

// checkedUpstream is an upstream that answers a WebSocket handshake with 101 and then, by the request's
// X-Mode: "stream" checks the client's stream (X-Seed) and sends its own until stopped; "flood" sends
// floodBytes of its own as fast as it can; "echo" sends back what it reads.
type checkedUpstream struct {
	addr string
	stop chan struct{} // closed: the streams send their FIN
	pace time.Duration // of its streams' chunks

	mu      sync.Mutex
	results map[uint64]*[2]streamResult // by seed: [0] the client's stream as received here, [1] ours
	wg      sync.WaitGroup
}

func newCheckedUpstream(t *testing.T) *checkedUpstream {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &checkedUpstream{addr: ln.Addr().String(), stop: make(chan struct{}), results: map[uint64]*[2]streamResult{},
		pace: streamPace}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u.wg.Add(1)
			go u.serve(c.(*net.TCPConn))
		}
	}()
	return u
}

func (u *checkedUpstream) serve(c *net.TCPConn) {
	defer u.wg.Done()
	defer c.Close()
	br := bufio.NewReader(c)
	req, err := http.ReadRequest(br)
	if err != nil {
		return
	}
	fmt.Fprintf(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
		relay.AcceptKey(req.Header.Get("Sec-WebSocket-Key")))
	if req.Header.Get("X-Mode") == "echo" {
		_, _ = io.Copy(c, br)
		_ = c.CloseWrite()
		return
	}
	seed, _ := strconv.ParseUint(req.Header.Get("X-Seed"), 10, 64)
	res := &[2]streamResult{}
	u.mu.Lock()
	u.results[seed] = res
	u.mu.Unlock()
	var wg sync.WaitGroup
	if req.Header.Get("X-Mode") == "flood" {
		wg.Go(func() { res[1].sent, res[1].err = checkedSender(c, seed*2+1, floodBytes, 0, u.stop) })
	} else {
		wg.Go(func() { res[1].sent, res[1].err = checkedSender(c, seed*2+1, 0, u.pace, u.stop) })
	}
	res[0].received, res[0].err = checkedReceiver(br, seed*2)
	wg.Wait()
}

// floodBytes is what a "flood" tunnel's upstream sends, to a client that reads none of it before the
// upgrade: the relay holds bytes it read and could not write when it parks the tunnel.
const floodBytes = 16 << 20

// streamPace is how far apart a stream's 2 KiB chunks go: 100 KB/s a direction, so that hundreds of
// tunnels flow on two shared cores.
const streamPace = 20 * time.Millisecond

// result is what the upstream saw of the tunnel of seed.
func (u *checkedUpstream) result(seed uint64) [2]streamResult {
	u.mu.Lock()
	defer u.mu.Unlock()
	if r := u.results[seed]; r != nil {
		return *r
	}
	return [2]streamResult{{err: errors.New("no such tunnel at the upstream")}}
}

// openRaw opens a tunnel through the relay at addr with a hand-written WebSocket handshake, so that its
// bytes afterwards are the test's own.
func openRaw(t *testing.T, addr, mode string, seed uint64) (*net.TCPConn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Mode: %s\r\nX-Seed: %d\r\n\r\n", mode, seed)
	br := bufio.NewReader(c)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("handshake through the relay: %v %v", resp, err)
	}
	_ = c.SetReadDeadline(time.Time{})
	return c.(*net.TCPConn), br
}

// adminGet GETs path from the admin listener on a Unix socket.
func adminGet(t *testing.T, admin, path string) string {
	t.Helper()
	sock := strings.TrimPrefix(admin, "unix:")
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	resp, err := hc.Get("http://localhost" + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// tunnelIDs lists the ids /debug/tunnels gives, sorted, with their pids' datapaths.
func tunnelIDs(t *testing.T, admin string) ([]uint64, []relay.TunnelInfo) {
	t.Helper()
	var infos []relay.TunnelInfo
	body := adminGet(t, admin, "/debug/tunnels")
	if err := json.Unmarshal([]byte(body), &infos); err != nil {
		t.Fatalf("/debug/tunnels: %v: %s", err, body)
	}
	var ids []uint64
	for _, i := range infos {
		ids = append(ids, i.ID)
	}
	slices.Sort(ids)
	return ids, infos
}

// roundTrips are the longest round trips a ping-pong tunnel saw: while an upgrade was in progress, and
// otherwise.
type roundTrips struct{ during, outside time.Duration }

// pingPong sends a counter and waits for it back, over and over, until stop, then ends the tunnel with
// its FIN and waits for the upstream's; it returns the longest round trips it saw, those that overlapped
// the time upgrading says is an upgrade's apart.
func pingPong(c *net.TCPConn, br *bufio.Reader, stop <-chan struct{}, upgrading *atomic.Bool) (roundTrips, error) {
	var longest roundTrips
	out, in := make([]byte, 8), make([]byte, 8)
	for i := uint64(0); ; i++ {
		select {
		case <-stop:
			// Our FIN, then the upstream's after it.
			if err := c.CloseWrite(); err != nil {
				return longest, err
			}
			if n, err := io.Copy(io.Discard, br); err != nil || n != 0 {
				return longest, fmt.Errorf("after our FIN: %d bytes, %v; want the upstream's FIN", n, err)
			}
			return longest, nil
		default:
		}
		binary.BigEndian.PutUint64(out, i)
		start, during := time.Now(), upgrading.Load()
		_ = c.SetDeadline(start.Add(10 * time.Second))
		if _, err := c.Write(out); err != nil {
			return longest, fmt.Errorf("ping %d: %w", i, err)
		}
		if _, err := io.ReadFull(br, in); err != nil {
			return longest, fmt.Errorf("pong %d: %w", i, err)
		}
		if got := binary.BigEndian.Uint64(in); got != i {
			return longest, fmt.Errorf("pong %d: got %d", i, got)
		}
		if upgrading.Load() || during {
			longest.during = max(longest.during, time.Since(start))
		} else {
			longest.outside = max(longest.outside, time.Since(start))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestUpgradeHandsOverTunnels: tunnels with checked streams both ways, ping-pong tunnels and half-closed
// tunnels (the client sent its FIN before the upgrade) on copy and on splice are handed to the new process
// during the traffic: no stream is corrupted or reset, the new process's /debug/tunnels lists every one
// under its id, the old process exits at once (not after its drain timeout), and the FIN each side sent
// arrives once, after its last byte.
func TestUpgradeHandsOverTunnels(t *testing.T) {
	for _, dp := range []string{"copy", "splice"} {
		t.Run(dp, func(t *testing.T) { upgradeHandsOverTunnels(t, dp, 200, streamPace) })
	}
}

// TestUpgradeHandsOverKernelTunnels is the same on the kernel datapath: the new process adopts the old
// one's BPF objects and every kernel tunnel moves with its sockets left in the maps, flood tunnels (whose
// client does not read until the upgrade is over: a direction demoted and relayed by a goroutine)
// included. The longest ping-pong round trip during the upgrade is the longest pause it caused.
func TestUpgradeHandsOverKernelTunnels(t *testing.T) {
	if err := loader.Probe().Err(); err != nil {
		if os.Getenv("SOCKRELAY_REQUIRE_BPF") == "1" {
			t.Fatalf("SOCKRELAY_REQUIRE_BPF=1 but the kernel datapath cannot run: %v", err)
		}
		t.Skipf("the kernel datapath cannot run here: %v", err)
	}
	upgradeHandsOverTunnels(t, "sockmap", 200, streamPace)
}

// TestUpgradeHandsOverManyTunnels is the same with 2000 streams, each ten times slower.
func TestUpgradeHandsOverManyTunnels(t *testing.T) {
	if testing.Short() || raceEnabled {
		t.Skip("2000 tunnels: not in -short, nor under the race detector (the relay processes run 30s at most)")
	}
	upgradeHandsOverTunnels(t, "copy", 2000, 10*streamPace)
}

// upgradeHandsOverTunnels runs streams checked streams, their chunks pace apart, and the other tunnels
// through an upgrade on datapath.
func upgradeHandsOverTunnels(t *testing.T, datapath string, streams int, pace time.Duration) {
	const pingers, halfClosed, floods = 20, 10, 5
	up := newCheckedUpstream(t)
	up.pace = pace
	r := startUpgradableOn(t, datapath, up.addr, 20*time.Second)

	ends := make([]*streamEnd, streams+halfClosed+floods)
	for i := range ends {
		mode := "stream"
		if i >= streams+halfClosed {
			mode = "flood"
		}
		c, br := openRaw(t, r.listen, mode, uint64(i))
		ends[i] = &streamEnd{c: c, br: br, seed: uint64(i)}
	}
	stopClients, upgraded := make(chan struct{}), make(chan struct{})
	var wg sync.WaitGroup
	for i, e := range ends {
		limit := int64(0)
		if i >= streams && i < streams+halfClosed {
			limit = 3000 // half-closed before the upgrade: a short stream, then the FIN
		}
		wg.Go(func() { e.res[0].sent, e.res[0].err = checkedSender(e.c, e.seed*2, limit, pace, stopClients) })
		wg.Go(func() {
			if i >= streams+halfClosed {
				<-upgraded // flood: the relay's buffers fill up with the upstream's bytes meanwhile
			}
			e.res[1].received, e.res[1].err = checkedReceiver(e.br, e.seed*2+1)
		})
	}
	stopPings := make(chan struct{})
	var upgrading atomic.Bool
	longest := make([]roundTrips, pingers)
	pingErrs := make([]error, pingers)
	for i := range pingers {
		c, br := openRaw(t, r.listen, "echo", 0)
		wg.Go(func() { longest[i], pingErrs[i] = pingPong(c, br, stopPings, &upgrading) })
	}
	// The half-closed tunnels' client streams have ended at the upstream before the upgrade.
	waitFor(t, "the half-closed streams to end at the upstream", func() bool {
		for i := streams; i < streams+halfClosed; i++ {
			if up.result(uint64(i))[0].received != 3000 {
				return false
			}
		}
		return true
	})
	oldIDs, oldInfos := tunnelIDs(t, r.admin)
	if len(oldIDs) != len(ends)+pingers {
		t.Fatalf("the old process lists %d tunnels, want %d", len(oldIDs), len(ends)+pingers)
	}
	time.Sleep(300 * time.Millisecond)

	upgrading.Store(true)
	code, out := r.upgrade(t)
	if code != 0 {
		t.Fatalf("upgrade: exit %d: %s\n%s", code, out, r.logs)
	}
	r.waitExit(t, 5*time.Second) // with every tunnel live and 20s of drain: it held none
	upgrading.Store(false)
	if datapath == "sockmap" && len(r.logs.lines("upgrade: adopted the old process's BPF objects; its kernel tunnels can move here")) != 1 {
		t.Errorf("the new process did not say that it adopted the BPF objects\n%s", r.logs)
	}
	close(upgraded)
	newIDs, infos := tunnelIDs(t, r.admin)
	if !slices.Equal(newIDs, oldIDs) {
		t.Errorf("the new process lists tunnels %v, want the old one's %v", newIDs, oldIDs)
	}
	was := map[uint64]relay.Datapath{}
	for _, info := range oldInfos {
		was[info.ID] = info.Datapath
	}
	for _, info := range infos {
		// A kernel tunnel whose source kept its queue full at the handoff ran on copy from its start.
		if string(info.Datapath) != datapath && (datapath != "sockmap" || info.Datapath != was[info.ID]) {
			t.Errorf("tunnel %d runs on %s in the new process, want %s (it ran on %s)", info.ID, info.Datapath, datapath, was[info.ID])
			break
		}
	}
	// The new process holds the upstream server's leases: its pool counts every tunnel.
	var pools []upstream.Snapshot
	if body := adminGet(t, r.admin, "/admin/pools"); json.Unmarshal([]byte(body), &pools) != nil ||
		len(pools) != 1 || len(pools[0].Servers) != 1 || pools[0].Servers[0].LiveTunnels != int64(len(oldIDs)) {
		t.Errorf("the new process's pools: %s; want its server with %d live tunnels", body, len(oldIDs))
	}
	handed := r.logs.lines("upgrade: tunnels handed over")
	if len(handed) != 1 || handed[0]["handed_over"] != float64(len(oldIDs)) || handed[0]["kept"] != float64(0) {
		t.Errorf("the old process's account of the handover: %v, want %d handed over, 0 kept", handed, len(oldIDs))
	}
	time.Sleep(300 * time.Millisecond) // traffic on the new process
	close(stopClients)
	close(up.stop)
	close(stopPings)
	wg.Wait()
	up.wg.Wait()

	checkStreams(t, ends, up, r.logs)
	for i, err := range pingErrs {
		if err != nil {
			t.Errorf("ping-pong tunnel %d: %v", i, err)
		}
	}
	took, _ := handed[0]["took_ms"].(float64)
	var worst roundTrips
	for _, l := range longest {
		worst = roundTrips{max(worst.during, l.during), max(worst.outside, l.outside)}
	}
	t.Logf("%s; %d tunnels handed over in %.0fms (%v bytes read and not yet written went along); the longest ping-pong round trip: %s during the upgrade, %s outside it",
		strings.TrimSpace(out), len(oldIDs), took, handed[0]["peeked_bytes"], worst.during.Round(time.Millisecond),
		worst.outside.Round(time.Millisecond))
}

// TestUpgradeAdoptionFailureKeepsTunnel: a new process that refuses some tunnels (the test hook refuses
// those of odd ids) leaves them with the old process, which carries them on without a byte lost and
// exits once they end; the new process carries the others. No tunnel is carried by both or by neither.
func TestUpgradeAdoptionFailureKeepsTunnel(t *testing.T) {
	for _, dp := range []string{"copy", "sockmap"} {
		t.Run(dp, func(t *testing.T) {
			if err := loader.Probe().Err(); dp == "sockmap" && err != nil {
				t.Skipf("this host cannot run sockmap: %v", err)
			}
			upgradeAdoptionFailureKeepsTunnel(t, dp) // on sockmap the old engine adopts the kept ones back
		})
	}
}

func upgradeAdoptionFailureKeepsTunnel(t *testing.T, datapath string) {
	const pingers = 10
	up := newCheckedUpstream(t)
	r := startUpgradableOn(t, datapath, up.addr, 20*time.Second, refuseTunnelsEnv+"=odd")
	var wg sync.WaitGroup
	stop := make(chan struct{})
	errs := make([]error, pingers)
	for i := range pingers {
		c, br := openRaw(t, r.listen, "echo", 0)
		wg.Go(func() { _, errs[i] = pingPong(c, br, stop, &atomic.Bool{}) })
	}
	oldIDs, _ := tunnelIDs(t, r.admin)
	if code, out := r.upgrade(t); code != 0 {
		t.Fatalf("upgrade: exit %d: %s\n%s", code, out, r.logs)
	}
	waitFor(t, "the old process's account of the handover", func() bool {
		return len(r.logs.lines("upgrade: tunnels handed over")) == 1
	})
	var even, odd []uint64
	for _, id := range oldIDs {
		if id%2 == 0 {
			even = append(even, id)
		} else {
			odd = append(odd, id)
		}
	}
	if got, _ := tunnelIDs(t, r.admin); !slices.Equal(got, even) {
		t.Errorf("the new process carries tunnels %v, want those it adopted, %v", got, even)
	}
	if n := len(r.logs.lines("upgrade: the new process did not adopt the tunnel; it stays here")); n != len(odd) {
		t.Errorf("the old process kept %d tunnels, want %d:\n%s", n, len(odd), r.logs)
	}
	time.Sleep(300 * time.Millisecond) // traffic on both processes
	select {
	case err := <-r.exited:
		t.Fatalf("the old process exited (%v) while it carried the tunnels it kept:\n%s", err, r.logs)
	default:
	}
	// The old process is done sending once nothing more can move, not when its drain ends; but while it
	// carries kernel tunnels over the objects the new one adopted it reads their ring buffer, and the new
	// one must go on sweeping its tunnels' modes (it stops once told done).
	done := func() bool { return len(r.logs.lines("upgrade: tunnels adopted from the old process")) == 1 }
	if datapath == "sockmap" && done() {
		t.Errorf("the old process said it was done while it read the kernel events the new one shares:\n%s", r.logs)
	}
	if datapath != "sockmap" && !pollFor(5*time.Second, done) {
		t.Errorf("the old process, with nothing left to move, did not say it was done:\n%s", r.logs)
	}
	close(stop)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("ping-pong tunnel %d: %v", i, err)
		}
	}
	r.waitExit(t, 5*time.Second) // its tunnels ended
}

// TestUpgradeKeepsTunnelLifetime: a moved tunnel's lifetime counts from its start in the old process, not
// from its adoption: the new process resets it once the lifetime is over.
func TestUpgradeKeepsTunnelLifetime(t *testing.T) {
	const lifetime = 3 * time.Second
	up := newCheckedUpstream(t)
	admin := "unix:" + filepath.Join(t.TempDir(), "admin.sock")
	r := startUpgradableWith(t, admin, nil, "--listen", "127.0.0.1:0", "--admin", admin, "--upstream", up.addr,
		"--datapath", "copy", "--drain-timeout", "20s", "--log-format", "json", "--tunnel-lifetime", lifetime.String())
	c, br := openRaw(t, r.listen, "echo", 0)
	opened := time.Now()
	time.Sleep(time.Second)
	if code, out := r.upgrade(t); code != 0 {
		t.Fatalf("upgrade: exit %d: %s\n%s", code, out, r.logs)
	}
	r.waitExit(t, 5*time.Second)                                   // it handed the tunnel over
	_, err := pingPong(c, br, make(chan struct{}), &atomic.Bool{}) // until the lifetime cuts it
	lived := time.Since(opened)
	if err == nil || len(r.logs.lines("tunnel lifetime reached, closing it")) != 1 {
		t.Fatalf("the tunnel ended with %v after %s; want the new process to reset it for its lifetime:\n%s", err, lived, r.logs)
	}
	// The scans run every 300ms; counted from the adoption it would have lived 4s and more.
	if lived < lifetime || lived > lifetime+900*time.Millisecond {
		t.Errorf("the tunnel lived %s, want its lifetime, %s, counted from its start before the upgrade", lived, lifetime)
	}
}

// TestUpgradeNewProcessDiesWithTunnels: a new process that dies with a batch of tunnels in hand (the
// test hook) leaves them with the old process, which carries them on without a byte lost or a reset.
func TestUpgradeNewProcessDiesWithTunnels(t *testing.T) {
	const pingers = 10
	up := newCheckedUpstream(t)
	r := startUpgradableOn(t, "copy", up.addr, 20*time.Second, refuseTunnelsEnv+"=crash")
	var wg sync.WaitGroup
	stop := make(chan struct{})
	errs := make([]error, pingers)
	for i := range pingers {
		c, br := openRaw(t, r.listen, "echo", 0)
		wg.Go(func() { _, errs[i] = pingPong(c, br, stop, &atomic.Bool{}) })
	}
	if code, out := r.upgrade(t); code != 0 {
		t.Fatalf("upgrade: exit %d: %s\n%s", code, out, r.logs)
	}
	if !poll(func() bool {
		return len(r.logs.lines("upgrade: the new process did not take a batch of tunnels; they stay here")) == 1
	}) {
		t.Fatalf("the old process did not take the batch back:\n%s", r.logs)
	}
	time.Sleep(300 * time.Millisecond) // traffic on the old process
	close(stop)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("ping-pong tunnel %d: %v", i, err)
		}
	}
	r.waitExit(t, 5*time.Second) // its tunnels ended
}
