package sockmap

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/internal/streams"
	"github.com/sockrelay/sockrelay/loader"
	"golang.org/x/sys/unix"
)

// ErrSelfTest marks a self-test failure: the kernel loads the datapath but it does not relay correctly.
var ErrSelfTest = errors.New("self-test failed")

// selfTestBytes is how much each side of a self-test tunnel sends after the handoff.
const selfTestBytes = 1 << 20

// selfTestBuf is the socket buffer size on the self-test's path (see selfTestTunnel).
const selfTestBuf = 64 << 10

// selfTestTimeout bounds the whole self-test; a healthy kernel finishes it in a few tens of milliseconds.
const selfTestTimeout = 5 * time.Second

// selfTestHeldLimit is the held limit of the self-test's backpressure tunnel: small, so that its reader's
// short pause demotes the direction and the rest of the stream goes through userspace and back.
const selfTestHeldLimit = 16 << 10

// selfTestReaderPause is how long the backpressure tunnel's reader waits before it reads.
const selfTestReaderPause = 20 * time.Millisecond

// SelfTest loads the kernel datapath, runs selfTest on it and unloads it. It is what --datapath
// auto, --datapath sockmap and `sockrelay doctor` rely on to trust this kernel.
func SelfTest(log *slog.Logger) error {
	if err := loader.Probe().Err(); err != nil {
		return err
	}
	k, err := newEngine(log, nil)
	if err != nil {
		return err
	}
	defer k.Close()
	return k.selfTest()
}

// selfTest sends tunnels through k on loopback the way real ones arrive and checks that every byte comes
// out exactly once, in order, before its FIN: bytes pipelined behind the request and sent with the 101
// (held by userspace at the handoff), bytes that reached the sockets just before the insertion (the SO_RCVLOWAT poke),
// a socket whose first bytes userspace read only in part (the partly read skb), 1 MiB each way at once, and
// half-close in both orders; and a third tunnel whose reader pauses past a small held limit, so that its
// direction is demoted, relayed by userspace, and its FIN carried after it (docs/datapath.md, "Backpressure"). A kernel or a build
// that breaks any of them is refused.
func (k *Engine) selfTest() error {
	ctx, cancel := context.WithTimeout(context.Background(), selfTestTimeout)
	defer cancel()
	relays := k.relays.Load()
	cases := []struct {
		clientFINFirst bool
		heldLimit      uint64
	}{{true, k.heldLimit}, {false, k.heldLimit}, {true, selfTestHeldLimit}}
	var wg sync.WaitGroup
	errs := make([]error, len(cases))
	for i, c := range cases {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = k.selfTestTunnel(ctx, uint64(i), c.clientFINFirst, c.heldLimit)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%w: %w", ErrSelfTest, err)
	}
	if k.relays.Load() == relays {
		return fmt.Errorf("%w: a reader paused past a %d-byte held limit, and no direction was demoted", ErrSelfTest, selfTestHeldLimit)
	}
	return nil
}

// loopbackPair returns both ends of a fresh TCP connection on 127.0.0.1. A nonzero rcvbuf is set as
// SO_RCVBUF on the dialed end (dialRcv) or the accepted end before the connection exists: set afterwards, a
// window already advertised can exceed it, and the drops and retransmission backoff that follow look
// like stalls.
func loopbackPair(ctx context.Context, dialRcv, acceptRcv int) (dialed, accepted *net.TCPConn, err error) {
	setRcv := func(n int) func(string, string, syscall.RawConn) error {
		return func(_, _ string, rc syscall.RawConn) error {
			if n == 0 {
				return nil
			}
			var serr error
			if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, n) }); err != nil {
				return err
			}
			return serr
		}
	}
	lc := net.ListenConfig{Control: setRcv(acceptRcv)}
	l, err := lc.Listen(ctx, "tcp", "127.0.0.1:0")
	if err != nil {
		return nil, nil, err
	}
	defer l.Close()
	d := net.Dialer{Control: setRcv(dialRcv)}
	c, err := d.DialContext(ctx, "tcp", l.Addr().String())
	if err != nil {
		return nil, nil, err
	}
	a, err := l.(*net.TCPListener).AcceptTCP()
	if err != nil {
		c.Close()
		return nil, nil, err
	}
	return c.(*net.TCPConn), a, nil
}

func (k *Engine) selfTestTunnel(ctx context.Context, seed uint64, clientFINFirst bool, heldLimit uint64) error {
	// Small buffers on the path keep most of each stream inside the kernel datapath while a reader waits,
	// as on a real slow link, instead of letting loopback's large autotuned buffers swallow it whole.
	client, relayClient, err := loopbackPair(ctx, selfTestBuf, 0)
	if err != nil {
		return fmt.Errorf("loopback connection: %w", err)
	}
	relayUp, upstream, err := loopbackPair(ctx, 0, selfTestBuf)
	if err != nil {
		client.Close()
		relayClient.Close()
		return fmt.Errorf("loopback connection: %w", err)
	}
	defer client.Close()
	defer upstream.Close()
	for _, c := range []*net.TCPConn{relayClient, relayUp} {
		c.SetWriteBuffer(selfTestBuf)
	}
	if dl, ok := ctx.Deadline(); ok {
		client.SetDeadline(dl)
		upstream.SetDeadline(dl)
	}

	// Each stream: 100 bytes userspace holds (pipelined / with the 101), 1900 bytes that sit in the
	// receive queue at the handoff, then 1 MiB sent after it. Under a small held limit only the first side
	// sends its 1 MiB: passed bytes queue behind whatever the other direction redirected into the same
	// socket, charged to no socket, so a busy other direction would lift the bound this tunnel checks
	// (backpressure.go, overflowAt).
	upBytes, clientBytes := selfTestBytes, selfTestBytes
	if heldLimit < selfTestBytes {
		if clientFINFirst {
			clientBytes = 0
		} else {
			upBytes = 0
		}
	}
	toUp, toClient := streams.Stream(seed*2, 2000+upBytes), streams.Stream(seed*2+1, 2000+clientBytes)
	var peeked [2][]byte
	for i, s := range []struct {
		from *net.TCPConn
		at   *net.TCPConn
		data []byte
	}{{client, relayClient, toUp}, {upstream, relayUp, toClient}} {
		if _, err := s.from.Write(s.data[:2000]); err != nil {
			return fmt.Errorf("write before handoff: %w", err)
		}
		peeked[i] = make([]byte, 100)
		if _, err := io.ReadFull(s.at, peeked[i]); err != nil {
			return fmt.Errorf("read before handoff: %w", err)
		}
	}
	t := datapath.NewPair(datapath.Sockmap, datapath.Endpoint{Conn: relayClient, Peeked: peeked[0]},
		datapath.Endpoint{Conn: relayUp, Peeked: peeked[1]}, nil)
	k.carryLimited(t, heldLimit)
	defer t.End(datapath.ReasonShutdown, true)
	if t.Kind() != datapath.Sockmap {
		return errors.New("the tunnel fell back to userspace at the handoff")
	}

	second := upstream // the side that half-closes second
	if !clientFINFirst {
		second = client
	}
	errs := make(chan error, 4)
	var wg sync.WaitGroup
	firstGotEOF := make(chan struct{})
	// The first side's stream is read only once all of it and its FIN have left: the bytes then wait in
	// the kernel for the reader, which is when a FIN carried too early cuts them off. Past a held limit
	// smaller than the stream, the writer cannot finish before the reader reads: it reads after a pause.
	firstDone := make(chan struct{})
	var pause <-chan time.Time
	if heldLimit < selfTestBytes {
		pause = time.After(selfTestReaderPause)
	}
	for _, e := range []struct {
		name      string
		conn      *net.TCPConn
		send, exp []byte
	}{{"client", client, toUp, toClient}, {"upstream", upstream, toClient, toUp}} {
		wg.Add(2)
		go func() {
			defer wg.Done()
			if e.conn == second {
				select {
				case <-firstDone:
				case <-pause:
				case <-ctx.Done():
				}
			}
			got, err := io.ReadAll(e.conn)
			if e.conn == second {
				close(firstGotEOF)
			}
			switch {
			case err != nil:
				errs <- fmt.Errorf("%s read %d of %d bytes, then: %w", e.name, len(got), len(e.exp), err)
			case !bytes.Equal(got, e.exp):
				errs <- fmt.Errorf("%s received a wrong stream: %s", e.name, streams.Diff(got, e.exp))
			}
		}()
		go func() {
			defer wg.Done()
			if e.conn == second {
				// The second side sends only part before the first FIN, the rest after it: one
				// direction must keep flowing after the other's half-close.
				half := 2000 + (len(e.send)-2000)/2
				if _, err := e.conn.Write(e.send[2000:half]); err != nil {
					errs <- fmt.Errorf("%s write: %w", e.name, err)
					return
				}
				select {
				case <-firstGotEOF:
				case <-ctx.Done():
					return
				}
				if _, err := e.conn.Write(e.send[half:]); err != nil {
					errs <- fmt.Errorf("%s write: %w", e.name, err)
					return
				}
			} else if _, err := e.conn.Write(e.send[2000:]); err != nil {
				errs <- fmt.Errorf("%s write: %w", e.name, err)
				return
			}
			if err := e.conn.CloseWrite(); err != nil {
				errs <- fmt.Errorf("%s half-close: %w", e.name, err)
			}
			if e.conn != second {
				close(firstDone)
			}
		}()
	}
	wg.Wait()
	close(errs)
	var all []error
	for err := range errs {
		all = append(all, err)
	}
	if len(all) > 0 {
		select { // the relay closes the sockets, then records why
		case <-t.Done():
		case <-time.After(100 * time.Millisecond):
		}
		if reason := t.Reason(); reason != "" {
			all = append(all, fmt.Errorf("the relay ended the tunnel early: %s", reason))
		}
		return fmt.Errorf("half-close %s first, held limit %d: %w", map[bool]string{true: "client", false: "upstream"}[clientFINFirst], heldLimit, errors.Join(all...))
	}
	select {
	case <-t.Done():
	case <-ctx.Done():
		return errors.New("the tunnel did not end after both sides half-closed")
	}
	if t.Reason() != datapath.ReasonClosed {
		return fmt.Errorf("the tunnel ended with reason %q, want %q", t.Reason(), datapath.ReasonClosed)
	}
	return nil
}
