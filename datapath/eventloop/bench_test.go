package eventloop

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// BenchmarkPingPong measures round trips of a 64-byte message through relayed tunnels to an echo peer: with
// the event loops, and side by side in the same run with a goroutine pair per tunnel copying through userspace
// buffers (what a goroutine-per-direction copy datapath does; io.Copy itself would splice between two TCP
// sockets).
//
// The clients and the echo server run in a child process (this test binary, re-executed), so the
// benchmark's process is the relay alone: besides ns/op it reports the relay's own CPU time and context
// switches per round trip (getrusage over all its threads). With the peers in the same process, the goroutine
// pumps and the peers would share one Go scheduler and the comparison would say little about a relay.
func BenchmarkPingPong(b *testing.B) {
	engines := benchEngines(b)
	for _, tunnels := range []int{1, 100} {
		for _, e := range engines {
			b.Run(fmt.Sprintf("engine=%s/tunnels=%d", e.name, tunnels), func(b *testing.B) {
				benchPingPong(b, tunnels, e.carry)
			})
		}
	}
}

// benchEngine is one of the engines the benchmarks run side by side: carry hands it a relayed pair.
type benchEngine struct {
	name  string
	carry func(b *testing.B, a, c *net.TCPConn)
}

// benchEngines are the engines BenchmarkPingPong and BenchmarkBulk compare; the loops start once, on b,
// for all of b's sub-benchmarks.
func benchEngines(b *testing.B) []benchEngine {
	return []benchEngine{
		{name: "eventloop", carry: carryOnLoops(b)},
		{name: "goroutines", carry: carryWithGoroutines},
		{name: "eventloop-splice", carry: carrySplicedOnLoops(b)},
		{name: "goroutines-splice", carry: carrySplicingWithGoroutines},
	}
}

func carryOnLoops(b *testing.B) func(*testing.B, *net.TCPConn, *net.TCPConn) {
	var (
		once sync.Once
		ls   *Loops
	)
	return func(sub *testing.B, a, c *net.TCPConn) {
		once.Do(func() { ls = startLoops(b, Options{}) })
		if _, err := ls.Carry(a, c, nil, nil, nil); err != nil {
			sub.Fatal(err)
		}
	}
}

// carrySplicedOnLoops is carryOnLoops with the tunnels spliced (Spec.Splice).
func carrySplicedOnLoops(b *testing.B) func(*testing.B, *net.TCPConn, *net.TCPConn) {
	var (
		once sync.Once
		ls   *Loops
	)
	return func(sub *testing.B, a, c *net.TCPConn) {
		once.Do(func() { ls = startLoops(b, Options{}) })
		if _, err := ls.CarryWith(a, c, Spec{Splice: true}); err != nil {
			sub.Fatal(err)
		}
	}
}

// carrySplicingWithGoroutines carries a and c the way the splice datapath on goroutines does (datapath.Splicer):
// a goroutine and a 64 KiB pipe per direction for the tunnel's life, each splice that would block parking the
// goroutine in Go's netpoller.
func carrySplicingWithGoroutines(b *testing.B, a, c *net.TCPConn) {
	b.Cleanup(func() { a.Close(); c.Close() })
	for _, d := range [][2]*net.TCPConn{{c, a}, {a, c}} {
		r, w, err := newPipe(64 << 10)
		if err != nil {
			b.Fatal(err)
		}
		got, err := unix.FcntlInt(uintptr(w), unix.F_SETPIPE_SZ, 64<<10)
		if err != nil {
			b.Fatal(err)
		}
		p := &pipe{r: int32(r), w: int32(w), size: int32(got)}
		go spliceWithGoroutine(d[0], d[1], p)
	}
}

func spliceWithGoroutine(dst, src *net.TCPConn, p *pipe) {
	defer p.close()
	defer func() { _ = dst.CloseWrite() }()
	srcRaw, err := src.SyscallConn()
	if err != nil {
		return
	}
	dstRaw, err := dst.SyscallConn()
	if err != nil {
		return
	}
	for {
		var (
			n    int
			serr error
		)
		err := srcRaw.Read(func(fd uintptr) bool { n, serr = spliceIn(int(fd), p); return serr != unix.EAGAIN })
		if err != nil || serr != nil || n == 0 {
			return
		}
		p.held = int32(n)
		for p.held > 0 {
			err := dstRaw.Write(func(fd uintptr) bool { n, serr = spliceOut(p, int(fd)); return serr != unix.EAGAIN })
			if err != nil || serr != nil {
				return
			}
			p.held -= int32(n)
		}
	}
}

// copyBuffers lends the goroutine pumps their buffers only while a read has bytes to return, as the relay's
// copy datapath does, so an idle goroutine tunnel holds no buffer either.
var copyBuffers = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// carryWithGoroutines carries a and c with a goroutine per direction that waits in Go's netpoller and reads
// through the raw conn into a pooled buffer (the shape of the relay's copy datapath).
func carryWithGoroutines(b *testing.B, a, c *net.TCPConn) {
	b.Cleanup(func() { a.Close(); c.Close() })
	go pumpWithGoroutine(c, a)
	go pumpWithGoroutine(a, c)
}

func pumpWithGoroutine(dst, src *net.TCPConn) {
	defer func() { _ = dst.CloseWrite() }()
	raw, err := src.SyscallConn()
	if err != nil {
		return
	}
	for {
		var (
			bp   *[]byte
			n    int
			rerr error
		)
		err := raw.Read(func(fd uintptr) bool {
			bp = copyBuffers.Get().(*[]byte)
			n, rerr = unix.Read(int(fd), *bp)
			if rerr == unix.EAGAIN {
				copyBuffers.Put(bp)
				return false // wait in the netpoller holding no buffer
			}
			return true
		})
		if err == nil {
			err = rerr
		}
		if err != nil || n <= 0 {
			return
		}
		_, werr := dst.Write((*bp)[:n])
		copyBuffers.Put(bp)
		if werr != nil {
			return
		}
	}
}

// benchPeerEnv, set in a child's environment, makes the test binary run benchPeer instead of the tests.
const benchPeerEnv = "EVENTLOOP_BENCH_PEER"

func TestMain(m *testing.M) {
	if front := os.Getenv(benchPeerEnv); front != "" {
		if err := benchPeer(front); err != nil {
			fmt.Fprintln(os.Stderr, "bench peer:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// benchPingPong starts the peer process, which dials `tunnels` clients to the relay's front listener and
// listens for the relay's upstream connections with an echo server, carries each pair, then has the peer run
// b.N round trips spread over its clients.
func benchPingPong(b *testing.B, tunnels int, carry func(*testing.B, *net.TCPConn, *net.TCPConn)) {
	benchWithPeer(b, tunnels, 64, carry)
}

// BenchmarkBulk streams 64 KiB writes through one relayed tunnel to the echo peer, which sends them back, with
// each engine side by side in the same run: MB/s counts one direction, and relay-cpu-ns/op is the relay's CPU
// per 64 KiB each way. The peers run in a child process, as for BenchmarkPingPong.
func BenchmarkBulk(b *testing.B) {
	for _, e := range benchEngines(b) {
		b.Run("engine="+e.name, func(b *testing.B) {
			b.SetBytes(64 << 10)
			benchWithPeer(b, 1, 64<<10, e.carry)
		})
	}
}

// benchWithPeer runs b.N round trips of size-byte messages over tunnels relayed tunnels to the peer process.
// Messages of 64 KiB and more stream: the peer writes them all while it reads the echo, rather than waiting for
// each to come back.
func benchWithPeer(b *testing.B, tunnels, size int, carry func(*testing.B, *net.TCPConn, *net.TCPConn)) {
	front, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer front.Close()
	self, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}
	peer := exec.Command(self, "-test.run=^$")
	peer.Env = append(os.Environ(), benchPeerEnv+"="+front.Addr().String()+","+strconv.Itoa(tunnels)+","+strconv.Itoa(size))
	peer.Stderr = os.Stderr
	toPeer, _ := peer.StdinPipe()
	fromPeer, _ := peer.StdoutPipe()
	if err := peer.Start(); err != nil {
		b.Fatalf("start bench peer: %v", err)
	}
	defer func() { _ = toPeer.Close(); _ = peer.Wait() }()
	lines := bufio.NewScanner(fromPeer)
	if !lines.Scan() {
		b.Fatalf("bench peer gave no echo address: %v", lines.Err())
	}
	echoAddr := lines.Text()
	for range tunnels {
		a, err := front.Accept()
		if err != nil {
			b.Fatal(err)
		}
		c, err := net.Dial("tcp", echoAddr)
		if err != nil {
			b.Fatal(err)
		}
		carry(b, a.(*net.TCPConn), c.(*net.TCPConn))
	}
	before := usage(b)
	b.ResetTimer()
	fmt.Fprintf(toPeer, "%d\n", b.N)
	if !lines.Scan() || lines.Text() != "done" {
		b.Fatalf("bench peer did not finish: %q, %v", lines.Text(), lines.Err())
	}
	b.StopTimer()
	after := usage(b)
	b.ReportMetric(float64(after.cpuNs-before.cpuNs)/float64(b.N), "relay-cpu-ns/op")
	b.ReportMetric(float64(after.switches-before.switches)/float64(b.N), "relay-ctxsw/op")
}

// benchPeer is the child process: an echo server, and clients that run the round trips the parent asks for.
// arg is "front-address,clients,message-size".
func benchPeer(arg string) error {
	frontAddr, rest, _ := strings.Cut(arg, ",")
	n, sz, _ := strings.Cut(rest, ",")
	clients, err := strconv.Atoi(n)
	if err != nil {
		return err
	}
	size, err := strconv.Atoi(sz)
	if err != nil {
		return err
	}
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go echoUntilEOF(c)
		}
	}()
	fmt.Println(echo.Addr())
	conns := make([]net.Conn, clients)
	for i := range conns {
		if conns[i], err = net.Dial("tcp", frontAddr); err != nil {
			return err
		}
	}
	var rounds int
	if _, err := fmt.Scanln(&rounds); err != nil {
		return fmt.Errorf("read round count: %w", err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 2*clients)
	for i, c := range conns {
		mine := rounds / clients
		if i < rounds%clients {
			mine++
		}
		wg.Add(1)
		if size >= 64<<10 {
			wg.Add(1)
			go func() { defer wg.Done(); errs <- streamTo(c, mine, size) }()
			go func() {
				defer wg.Done()
				_, err := io.CopyN(io.Discard, c, int64(mine)*int64(size))
				errs <- err
			}()
			continue
		}
		go func() {
			defer wg.Done()
			msg, got := make([]byte, size), make([]byte, size)
			for range mine {
				if _, err := c.Write(msg); err != nil {
					errs <- err
					return
				}
				if _, err := io.ReadFull(c, got); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			return err
		}
	}
	fmt.Println("done")
	return nil
}

// streamTo writes n messages of size bytes to c.
func streamTo(c net.Conn, n, size int) error {
	msg := make([]byte, size)
	for range n {
		if _, err := c.Write(msg); err != nil {
			return err
		}
	}
	return nil
}

// echoUntilEOF writes back what it reads, through a plain buffer (io.Copy from a TCP conn to itself would try
// splice).
func echoUntilEOF(c net.Conn) {
	defer c.Close()
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

type rusage struct{ cpuNs, switches int64 }

// usage reads this process's CPU time and context switches (voluntary and not), all threads included.
func usage(b *testing.B) rusage {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return rusage{cpuNs: ru.Utime.Nano() + ru.Stime.Nano(), switches: ru.Nvcsw + ru.Nivcsw}
}

// BenchmarkIdleTunnels reports what an idle tunnel costs in Go memory (heap and goroutine stacks), on top of
// its two accepted connections, with each engine; an op is carrying one tunnel. Tunnels go in batches of up to
// 1000 that carry one message each way and are measured while all sit idle, then closed. The event loop also
// frees the two Go connections it takes the descriptors from, which counts in its favour, as in the relay.
func BenchmarkIdleTunnels(b *testing.B) {
	engines := []struct {
		name  string
		carry func(b *testing.B, a, c *net.TCPConn)
	}{
		{name: "eventloop", carry: carryOnLoops(b)},
		{name: "goroutines", carry: carryWithGoroutines},
	}
	for _, e := range engines {
		b.Run("engine="+e.name, func(b *testing.B) {
			var grown int64
			for done := 0; done < b.N; {
				batch := min(1000, b.N-done)
				grown += idleBatch(b, batch, e.carry)
				done += batch
			}
			b.ReportMetric(float64(grown)/float64(b.N), "go-B/idle-tunnel")
		})
	}
}

// idleBatch carries n tunnels, moves a message each way on each, and returns how much Go memory grew from
// before the first Carry to when all are idle. It closes the tunnels' outer ends before it returns.
func idleBatch(b *testing.B, n int, carry func(*testing.B, *net.TCPConn, *net.TCPConn)) int64 {
	b.StopTimer()
	type pair struct{ client, a, c, upstream *net.TCPConn }
	pairs := make([]pair, n)
	for i := range pairs {
		client, a := tcpPair(b, nil)
		c, upstream := tcpPair(b, nil)
		pairs[i] = pair{client, a, c, upstream}
	}
	defer func() {
		for _, p := range pairs {
			p.client.Close()
			p.upstream.Close()
		}
	}()
	before := goMemory()
	b.StartTimer()
	for _, p := range pairs {
		carry(b, p.a, p.c)
	}
	b.StopTimer()
	msg := make([]byte, 64)
	for _, p := range pairs {
		for _, ends := range [][2]*net.TCPConn{{p.client, p.upstream}, {p.upstream, p.client}} {
			if _, err := ends[0].Write(msg); err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(ends[1], msg); err != nil {
				b.Fatal(err)
			}
		}
	}
	return goMemory() - before
}

// goMemory returns the Go heap and goroutine stacks in use, after a collection.
func goMemory() int64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapAlloc + m.StackInuse)
}
