package loader

import (
	"bytes"
	"errors"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sockrelay/sockrelay/bpf"
)

// TestVerdictReadsPeerOnlyNearLimit: with what is held far below the limit, the verdict reads the peer's
// send sequence once (its baseline, at the first redirect), not on every skb; the counters and the time of
// the last skb are still kept.
func TestVerdictReadsPeerOnlyNearLimit(t *testing.T) {
	tn := openTunnel(t, 4<<20)
	client, upstream := tn.client, tn.upstream
	const trips = 200
	msg, got := bytes.Repeat([]byte{'p'}, 32), make([]byte, 32)
	for range trips {
		mustWrite(t, client, msg)
		mustReadFull(t, upstream, got)
		mustWrite(t, upstream, got)
		mustReadFull(t, client, got)
	}
	var now unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &now); err != nil {
		t.Fatal(err)
	}
	for _, sk := range []uint64{tn.a.Cookie, tn.b.Cookie} {
		st := tunnelState(t, tn.s, sk)
		if st.St.Bytes != trips*32 {
			t.Errorf("socket %d: %d bytes redirected, want %d", sk, st.St.Bytes, trips*32)
		}
		if st.St.PeerReads != 1 {
			t.Errorf("socket %d: the verdict read the peer's send sequence %d times in %d skbs, want once",
				sk, st.St.PeerReads, st.St.Skbs)
		}
		// The coarse clock lags CLOCK_MONOTONIC by a tick at most (10 ms at HZ=100).
		if age := time.Duration(now.Nano() - int64(st.St.LastNs)); age < 0 || age > time.Second {
			t.Errorf("socket %d: last skb %v before now, want between 0 and 1s", sk, age)
		}
	}
}

// TestVerdictDemotesAtHeldLimit: when the upstream stops reading, the verdict demotes the direction once
// the kernel holds more than the limit, though it reads the peer only when that could be the case; what
// it then holds stays within the limit and one skb.
func TestVerdictDemotesAtHeldLimit(t *testing.T) {
	const limit = 256 << 10
	tn := openTunnel(t, limit)
	src, dst := tn.a, tn.b
	entered0 := sendPathBytes(t, dst.FD)
	go func() { // blocks once passed bytes fill the relay side's receive buffer; cleanup's close ends it
		chunk := bytes.Repeat([]byte{'b'}, 16<<10)
		for {
			if _, err := tn.client.Write(chunk); err != nil {
				return
			}
		}
	}()
	ev := readModeChange(t, tn.s, 10*time.Second)
	if ev.Cookie != src.Cookie || ev.Kind != Demoted || ev.Demotions != 1 {
		t.Fatalf("mode change %+v, want socket %d demoted once", ev, src.Cookie)
	}
	st, err := tn.s.Stats(src.Cookie)
	if err != nil {
		t.Fatal(err)
	}
	held := st.Bytes - (sendPathBytes(t, dst.FD) - entered0)
	if !st.Demoted || held > limit+64<<10 {
		t.Errorf("demoted %v holding %d bytes, want demoted holding at most %d (limit and one skb)",
			st.Demoted, held, limit+64<<10)
	}
}

// TestSetControlKeepsCounters: the socket's control and the verdict's counters share one map entry;
// SetControl changes the control and leaves the counters, and fails with ErrNotInMaps for a socket that
// is not in the maps.
func TestSetControlKeepsCounters(t *testing.T) {
	tn := openTunnel(t, 4<<20)
	msg := bytes.Repeat([]byte{'c'}, 100)
	mustWrite(t, tn.client, msg)
	mustReadFull(t, tn.upstream, msg)
	want := Control{Peer: tn.b.Cookie, HeldLimit: 1 << 20, UserRead: 7, UserWritten: 5, ResumeGen: 3}
	if err := tn.s.SetControl(tn.a.Cookie, want); err != nil {
		t.Fatal(err)
	}
	st := tunnelState(t, tn.s, tn.a.Cookie)
	got := Control{Peer: st.Ctl.Peer, HeldLimit: st.Ctl.Limit, UserRead: st.Ctl.UserRead,
		UserWritten: st.Ctl.UserWritten, ResumeGen: st.Ctl.ResumeGen}
	if got != want {
		t.Errorf("control after SetControl: %+v, want %+v", got, want)
	}
	if st.St.Bytes != 100 || st.St.Skbs == 0 {
		t.Errorf("counters after SetControl: %d bytes in %d skbs, want 100 bytes kept", st.St.Bytes, st.St.Skbs)
	}
	if err := tn.s.SetControl(12345, want); !errors.Is(err, ErrNotInMaps) {
		t.Errorf("SetControl of a socket not in the maps: %v, want ErrNotInMaps", err)
	}
}

// tunnelState reads a socket's whole entry in the state map.
func tunnelState(t *testing.T, s *Sockmap, cookie uint64) bpf.SockrelayTunnelSock {
	t.Helper()
	var v bpf.SockrelayTunnelSock
	if err := s.objs.Socks.Lookup(cookie, &v); err != nil {
		t.Fatalf("read state of socket %d: %v", cookie, err)
	}
	return v
}

// sendPathBytes is how many bytes have entered fd's send path: acknowledged, or still in its send queue.
func sendPathBytes(t *testing.T, fd int) uint64 {
	t.Helper()
	ti, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		t.Fatal(err)
	}
	outq, err := unix.IoctlGetInt(fd, unix.SIOCOUTQ)
	if err != nil {
		t.Fatal(err)
	}
	return ti.Bytes_acked + uint64(outq)
}

// readModeChange waits up to timeout for the next mode change.
func readModeChange(t *testing.T, s *Sockmap, timeout time.Duration) ModeChange {
	t.Helper()
	s.events.SetDeadline(time.Now().Add(timeout))
	defer s.events.SetDeadline(time.Time{})
	ev, err := s.ReadModeChange()
	if err != nil {
		t.Fatalf("no mode change within %v: %v", timeout, err)
	}
	return ev
}

// TestStatsAll: one batched read of the state map gives every socket's counters, as Stats gives each
// one's, across batches smaller than the map (the cursor carries on where the last batch stopped), and
// nothing of a socket removed.
func TestStatsAll(t *testing.T) {
	s, err := Open(Options{})
	if err != nil {
		requireBPF(t, err)
	}
	t.Cleanup(func() { s.Close() })
	const tunnels = 5
	want := map[uint64]Stats{}
	var removed Socket
	for i := range tunnels {
		client, a := loopbackPair(t)
		upstream, b := loopbackPair(t)
		sa, sb := socketOf(t, a, 4<<20), socketOf(t, b, 4<<20)
		if err := s.Insert(sa, sb); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Remove(sa, sb) })
		for _, c := range []*net.TCPConn{client, upstream} {
			if err := c.SetDeadline(time.Now().Add(time.Minute)); err != nil {
				t.Fatal(err)
			}
		}
		msg, got := bytes.Repeat([]byte{'s'}, 100*(i+1)), make([]byte, 100*(i+1))
		mustWrite(t, client, msg)
		mustReadFull(t, upstream, got)
		if i == tunnels-1 {
			if err := s.Remove(sa, sb); err != nil {
				t.Fatal(err)
			}
			removed = sa
			continue
		}
		for _, sk := range []Socket{sa, sb} {
			st, err := s.Stats(sk.Cookie)
			if err != nil {
				t.Fatal(err)
			}
			want[sk.Cookie] = st
		}
		if want[sa.Cookie].Bytes != uint64(len(msg)) {
			t.Fatalf("tunnel %d: %d bytes redirected, want %d", i, want[sa.Cookie].Bytes, len(msg))
		}
	}
	for _, batch := range []int{3, statsBatch} {
		got := map[uint64]Stats{}
		err := s.statsAll(batch, func(cookie uint64, st Stats) {
			if _, twice := got[cookie]; twice {
				t.Errorf("batch %d: socket %d read twice", batch, cookie)
			}
			got[cookie] = st
		})
		if err != nil {
			t.Fatalf("batch %d: %v", batch, err)
		}
		if _, ok := got[removed.Cookie]; ok {
			t.Errorf("batch %d: removed socket %d read", batch, removed.Cookie)
		}
		for cookie, st := range want {
			if got[cookie] != st {
				t.Errorf("batch %d: socket %d: %+v, want %+v", batch, cookie, got[cookie], st)
			}
		}
		if len(got) != len(want) {
			t.Errorf("batch %d: %d sockets read, want %d", batch, len(got), len(want))
		}
	}
}
