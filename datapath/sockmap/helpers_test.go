package sockmap

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/internal/streams"
	"github.com/sockrelay/sockrelay/internal/syncbuf"
)

// stream and diffStreams are the self-test's streams, for the tests.
var (
	stream      = streams.Stream
	diffStreams = streams.Diff
)

// sockmapErr is why the kernel engine cannot run here (its probe or its self-test failed), nil when it can.
var sockmapErr error

// TestMain runs the self-test once, as the relay does before it trusts this kernel. With
// SOCKRELAY_REQUIRE_BPF=1 (CI sets it: the kernel engine is tested for real there) a kernel that fails it
// fails the whole suite, never a silent skip.
func TestMain(m *testing.M) {
	if sockmapErr = SelfTest(slog.New(slog.DiscardHandler)); sockmapErr != nil {
		if os.Getenv("SOCKRELAY_REQUIRE_BPF") == "1" {
			fmt.Fprintf(os.Stderr, "SOCKRELAY_REQUIRE_BPF=1 but the kernel datapath cannot run: %v\n", sockmapErr)
			os.Exit(1)
		}
		fmt.Fprintf(os.Stderr, "note: sockmap tests skipped, the kernel datapath cannot run here: %v\n", sockmapErr)
	}
	os.Exit(m.Run())
}

// requireSockmap skips a test of the kernel engine where it cannot run; TestMain has already failed the
// suite if SOCKRELAY_REQUIRE_BPF=1.
func requireSockmap(t testing.TB) {
	t.Helper()
	if sockmapErr != nil {
		t.Skip("the kernel datapath cannot run here (see the note at the start of the test output)")
	}
}

// newTestEngine returns a kernel engine with the default held limit, closed when t ends, and the buffer
// its log writes to (shown when t fails). It runs no self-test: TestMain has.
func newTestEngine(t testing.TB) (*Engine, *syncbuf.Buffer) {
	t.Helper()
	requireSockmap(t)
	logs := &syncbuf.Buffer{}
	k, err := newEngine(slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		k.Close()
		if t.Failed() {
			t.Logf("engine log:\n%s", logs.String())
		}
	})
	return k, logs
}

// tunnelEnds opens the two loopback connections of a tunnel: the client's end and the relay's end facing
// it, the relay's end facing the upstream and the upstream's end. The client's and the upstream's ends are
// closed when t ends; the relay's belong to the pair made of them.
func tunnelEnds(t testing.TB) (client, relayClient, relayUp, upstream *net.TCPConn) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client, relayClient, err := loopbackPair(ctx, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	relayUp, upstream, err = loopbackPair(ctx, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		client.Close()
		upstream.Close()
	})
	return client, relayClient, relayUp, upstream
}

// carryPair hands k a pair of fresh loopback connections, as the relay does once a handshake is done, and
// returns the client's and the upstream's ends and the pair, which runs in the kernel. The pair is reset
// and the ends closed when t ends.
func carryPair(t testing.TB, k *Engine) (client, upstream *net.TCPConn, p *datapath.Pair) {
	t.Helper()
	return carryPairPeeked(t, k, nil, nil)
}

// carryPairPeeked is carryPair with bytes already read past the handshake: toUp from the client, toClient
// from the upstream, which the engine writes first.
func carryPairPeeked(t testing.TB, k *Engine, toUp, toClient []byte) (client, upstream *net.TCPConn, p *datapath.Pair) {
	t.Helper()
	client, relayClient, relayUp, upstream := tunnelEnds(t)
	p = datapath.NewPair(datapath.Sockmap, datapath.Endpoint{Conn: relayClient, Peeked: toUp},
		datapath.Endpoint{Conn: relayUp, Peeked: toClient}, nil)
	t.Cleanup(func() { p.End(datapath.ReasonShutdown, true) })
	k.Carry(p)
	if p.Kind() != datapath.Sockmap || p.Ending() {
		t.Fatalf("the pair did not enter the kernel: it runs on %s, ended %q", p.Kind(), p.Reason())
	}
	return client, upstream, p
}

// kernelDirOf returns a direction of k's only kernel tunnel, client → upstream when fromClient, waiting
// for the tunnel to enter the kernel.
func kernelDirOf(t testing.TB, k *Engine, fromClient bool) *kernelDir {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		k.mu.Lock()
		for _, s := range k.socks {
			d := s.srcDir()
			if d.src.isClient == fromClient {
				k.mu.Unlock()
				return d
			}
		}
		k.mu.Unlock()
	}
	t.Fatal("no kernel tunnel after 5s")
	return nil
}

// waitEnded waits until p has ended and both its sockets are closed.
func waitEnded(t testing.TB, p *datapath.Pair) {
	t.Helper()
	select {
	case <-p.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the pair did not end within 10s")
	}
}

// assertMapsEmpty fails t if any BPF map of k still holds an entry.
func assertMapsEmpty(t testing.TB, k *Engine) {
	t.Helper()
	n, err := k.Entries()
	if err != nil {
		t.Fatal(err)
	}
	for name, c := range n {
		if c != 0 {
			t.Errorf("BPF map %s holds %d entries after every tunnel ended", name, c)
		}
	}
}

// moveRetrying is datapath.Move(p, to), again while the kernel engine refuses to give p back for now
// (ErrBusy: a give-back that would hold more than giveBackHeldLimit, which the auto policy retries later),
// for up to 20s. Each try stops the pair's relaying goroutines, so tries are 10ms apart: time for them to
// write what a refused give-back handed them. It returns how many times the move was refused, and the last
// error.
func moveRetrying(p *datapath.Pair, to datapath.Engine) (refused int, err error) {
	for deadline := time.Now().Add(20 * time.Second); ; refused++ {
		err = datapath.Move(p, to)
		if !errors.Is(err, ErrBusy) || time.Now().After(deadline) {
			return refused, err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitDemoted waits until the verdict has demoted d (its reader did not read), failing the test after 10 s.
func waitDemoted(t *testing.T, k *Engine, d *kernelDir) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if st, err := k.maps.Stats(d.src.cookie); err == nil && st.Demoted {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the direction was not demoted within 10s while its reader did not read")
		}
	}
}
