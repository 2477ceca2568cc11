package handover

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

func offer() Message {
	return Message{Type: TypeOffer, Offer: &Offer{PID: 42, Listeners: []Listener{
		{Name: "default", Address: "127.0.0.1:0", Bound: "127.0.0.1:40001", Kind: KindWebSocket, TLS: true, FD: 1},
		{Name: "admin", Address: "unix:/run/a.sock", Bound: "/run/a.sock", Kind: KindAdmin, FD: 0},
	}}}
}

// tunnels is a batch of two tunnels, one of them half-closed with bytes held each way.
func tunnels() Message {
	at := time.Date(2026, 12, 3, 4, 5, 6, 7, time.UTC)
	return Message{Type: TypeTunnels, Tunnels: &Tunnels{Batch: 3, Tunnels: []Tunnel{
		{ID: 17, Client: "10.0.0.1:5000", Upstream: "10.0.1.1:80", Pool: "chat", Listener: "public", Datapath: "copy",
			Started: at, LastActive: at.Add(time.Second), ToUpstream: 10, ToClient: 20, ClientFD: 2, UpstreamFD: 3},
		{ID: 18, Client: "10.0.0.2:5000", Upstream: "10.0.1.1:80", Pool: "chat", Listener: "public", Datapath: "splice",
			Started: at, LastActive: at, HalfClosedAt: at, HalfClosedTimeout: time.Minute, Finished: [2]bool{true, false},
			Peeked: [2][]byte{[]byte("to the upstream"), {0, 1, 2}}, ClientFD: 0, UpstreamFD: 1},
	}}}
}

// offerWithBPF is offer with two BPF objects after the listeners.
func offerWithBPF() Message {
	m := offer()
	m.Offer.BPF = []BPFObject{{Name: "targets", FD: 2}, {Name: "sockrelay_verdict", FD: 3}}
	return m
}

// kernelTunnel is a batch of one kernel tunnel, with its engine's state.
func kernelTunnel() Message {
	at := time.Date(2026, 12, 3, 4, 5, 6, 7, time.UTC)
	return Message{Type: TypeTunnels, Tunnels: &Tunnels{Batch: 4, Tunnels: []Tunnel{
		{ID: 19, Client: "10.0.0.3:5000", Upstream: "10.0.1.1:80", Pool: "chat", Listener: "public", Datapath: "sockmap",
			Started: at, LastActive: at, Kernel: json.RawMessage(`{"cookies":[4097,4098]}`), ClientFD: 1, UpstreamFD: 0},
	}}}
}

func TestCodecRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		m    Message
		nfds int
	}{
		{offer(), 2},
		{Message{Type: TypeOffer, Offer: &Offer{PID: 1}}, 0},
		{Message{Type: TypeReady, Ready: &Ready{PID: 7, Accepts: []string{"tunnels"}}}, 0},
		{Message{Type: TypeFailed, Failed: &Failed{Reason: "self-test failed"}}, 0},
		{Message{Type: TypeOffer, Offer: &Offer{PID: 1, LastTunnelID: 99}}, 0},
		{offerWithBPF(), 4},
		{Message{Type: TypeReady, Ready: &Ready{PID: 7, Accepts: []string{AcceptTunnels, AcceptBPF}}}, 0},
		{tunnels(), 4},
		{kernelTunnel(), 2},
		{Message{Type: TypeData, Data: &Data{ID: 18, Dir: 1, Bytes: []byte("held")}}, 0},
		{Message{Type: TypeAdopted, Adopted: &Adopted{Batch: 3, Results: []AdoptResult{{ID: 17, NewID: 17}, {ID: 18, Error: "no"}}}}, 0},
		{Message{Type: TypeCommit, Commit: &Commit{Batch: 3, Abort: true}}, 0},
		{Message{Type: TypeDone, Done: &Done{Tunnels: 2}}, 0},
	} {
		frame, err := Encode(tc.m, tc.nfds)
		if err != nil {
			t.Fatalf("encode %s: %v", tc.m.Type, err)
		}
		got, err := Decode(frame, tc.nfds)
		if err != nil {
			t.Fatalf("decode %s: %v", tc.m.Type, err)
		}
		if !reflect.DeepEqual(got, tc.m) {
			t.Errorf("round trip of %s: got %+v, want %+v", tc.m.Type, got, tc.m)
		}
	}
}

// withHeader rewrites a field of a valid frame's header.
func withHeader(t *testing.T, m Message, nfds int, edit func([]byte) []byte) []byte {
	t.Helper()
	frame, err := Encode(m, nfds)
	if err != nil {
		t.Fatal(err)
	}
	return edit(frame)
}

func TestDecodeRefusesBadInput(t *testing.T) {
	good := offer()
	for _, tc := range []struct {
		name  string
		frame []byte
		nfds  int
		want  string
		trunc bool
	}{
		{"empty", nil, 0, "0 bytes, less than the 12-byte header", true},
		{"short header", []byte("SRHO\x00"), 0, "5 bytes, less than the 12-byte header", true},
		{"body cut off", withHeader(t, good, 2, func(b []byte) []byte { return b[:len(b)-5] }), 2, "body of", true},
		{"not a frame", []byte("GET / HTTP/1.1\r\n\r\n"), 0, `not a handover message: it starts "GET "`, false},
		{"wrong version", withHeader(t, good, 2, func(b []byte) []byte { binary.BigEndian.PutUint16(b[4:], 2); return b }), 2,
			"protocol version 2; this binary speaks version 1 only", false},
		{"bytes after the body", withHeader(t, good, 2, func(b []byte) []byte { return append(b, '}') }), 2, "1 bytes after a body", false},
		{"fewer descriptors arrived", withHeader(t, good, 2, func(b []byte) []byte { return b }), 1,
			"says it carries 2 descriptors, 1 arrived", false},
		{"header and body disagree", withHeader(t, good, 2, func(b []byte) []byte { binary.BigEndian.PutUint16(b[10:], 3); return b }), 3,
			"names 2 descriptors and carries 3", false},
		{"body not json", withHeader(t, good, 2, func(b []byte) []byte { b[headerLen] = 'x'; return b }), 2, "message body", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Decode(tc.frame, tc.nfds)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Decode: %v, want an error with %q", err, tc.want)
			}
			if errors.Is(err, ErrTruncated) != tc.trunc {
				t.Errorf("errors.Is(%v, ErrTruncated) = %v, want %v", err, !tc.trunc, tc.trunc)
			}
		})
	}
}

func TestEncodeRefusesBadMessages(t *testing.T) {
	dup := offer()
	dup.Offer.Listeners[1].FD = 1
	badKind := offer()
	badKind.Offer.Listeners[0].Kind = "udp"
	for _, tc := range []struct {
		name string
		m    Message
		nfds int
		want string
	}{
		{"fd index out of range", offer(), 1, "names 2 descriptors and carries 1"},
		{"fd index named twice", dup, 2, "descriptor index 1 is named twice"},
		{"BPF object short of its descriptor", offerWithBPF(), 3, "names 4 descriptors and carries 3"},
		{"unknown kind", badKind, 2, `kind "udp"; accepted websocket, tcp or admin`},
		{"unknown type", Message{Type: "tunnel"}, 0, `message type "tunnel"; accepted offer, ready, failed, data, tunnels, adopted, commit or done`},
		{"type without its field", Message{Type: TypeReady}, 0, "ready message without its pid"},
		{"too many descriptors", Message{Type: TypeFailed, Failed: &Failed{}}, MaxFDs + 1, "accepted 0 to 250"},
		{"tunnels short of descriptors", tunnels(), 3, "names 4 descriptors and carries 3"},
		{"data of no direction", Message{Type: TypeData, Data: &Data{Dir: 2}}, 0, "accepted a direction of 0 or 1"},
		{"data too long", Message{Type: TypeData, Data: &Data{Bytes: make([]byte, MaxData+1)}}, 0, "at most 32768 bytes"},
		{"commit without its batch", Message{Type: TypeCommit}, 0, "commit message without its batch"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Encode(tc.m, tc.nfds); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Encode: %v, want an error with %q", err, tc.want)
			}
		})
	}
}

// TestDecodeIgnoresUnknownFields: a later stage adds fields (tunnels, BPF objects) to version 1's
// messages; a decoder of this stage reads the rest.
func TestDecodeIgnoresUnknownFields(t *testing.T) {
	body := `{"type":"ready","ready":{"pid":9,"accepts":["tunnels"],"engines":["sockmap"]},"later":1}`
	frame := make([]byte, headerLen, headerLen+len(body))
	copy(frame, magic[:])
	binary.BigEndian.PutUint16(frame[4:], Version)
	binary.BigEndian.PutUint32(frame[6:], uint32(len(body)))
	m, err := Decode(append(frame, body...), 0)
	if err != nil {
		t.Fatal(err)
	}
	if m.Ready == nil || m.Ready.PID != 9 {
		t.Fatalf("got %+v, want ready from pid 9", m)
	}
}

// TestConnPassesListener hands a listening socket over a pair and accepts a connection on the copy that
// arrived: the socket is the same one.
func TestConnPassesListener(t *testing.T) {
	old, theirs, err := Pair()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { old.Close() })
	peer, err := FromFile(theirs)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { peer.Close() })

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	f, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	m := Message{Type: TypeOffer, Offer: &Offer{PID: os.Getpid(), Listeners: []Listener{
		{Name: "default", Address: "127.0.0.1:0", Bound: ln.Addr().String(), Kind: KindWebSocket}}}}
	if err := old.Send(m, []*os.File{f}); err != nil {
		t.Fatal(err)
	}
	f.Close()
	// The sender's listener stays non-blocking (a mode the descriptors share): blocking, its Close would
	// wait for its Accept.
	rc, err := ln.(*net.TCPListener).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var flags int
	_ = rc.Control(func(fd uintptr) { flags, err = unix.FcntlInt(fd, unix.F_GETFL, 0) })
	if err != nil || flags&unix.O_NONBLOCK == 0 {
		t.Errorf("after Send, the sender's listener has flags %#x (%v): not O_NONBLOCK", flags, err)
	}
	ln.Close() // the socket lives on in the descriptor on its way

	got, files, err := peer.Receive()
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 1 || !reflect.DeepEqual(got, m) {
		t.Fatalf("received %+v with %d files, want %+v with 1", got, len(files), m)
	}
	adopted, err := net.FileListener(files[0])
	files[0].Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { adopted.Close() })
	c, err := net.DialTimeout("tcp", m.Offer.Listeners[0].Bound, time.Second)
	if err != nil {
		t.Fatalf("dial the handed-over listener: %v", err)
	}
	c.Close()
	if _, err := adopted.Accept(); err != nil {
		t.Fatalf("accept on the handed-over listener: %v", err)
	}

	old.Close()
	if _, _, err := peer.Receive(); !errors.Is(err, io.EOF) {
		t.Errorf("Receive after the peer closed: %v, want io.EOF", err)
	}
}

// TestConnRefusesMismatchedDescriptors: a frame whose header names more descriptors than came with it is
// refused, and the ones that came are not left open.
func TestConnRefusesMismatchedDescriptors(t *testing.T) {
	a, theirs, err := Pair()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	b, err := FromFile(theirs)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	frame, err := Encode(offer(), 2)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := a.c.WriteMsgUnix(frame, nil, nil); err != nil {
		t.Fatal(err)
	}
	if _, _, err := b.Receive(); err == nil || !strings.Contains(err.Error(), "carries 2 descriptors, 0 arrived") {
		t.Fatalf("Receive: %v, want the descriptor count refused", err)
	}
}

// A control message that cannot be parsed after one that carried descriptors (a header whose length runs
// past the buffer, another kind of message) is refused, and the descriptors that did arrive are closed,
// not leaked.
func TestFilesOfClosesDescriptorsOnBadControlMessage(t *testing.T) {
	bad := make([]byte, unix.CmsgSpace(0))
	h := (*unix.Cmsghdr)(unsafe.Pointer(&bad[0]))
	h.Level, h.Type = unix.SOL_SOCKET, unix.SCM_RIGHTS
	h.SetLen(unix.CmsgLen(64)) // runs past the buffer
	for _, tc := range []struct {
		name  string
		after []byte
		want  string
	}{
		{"malformed header", bad, "control message"},
		{"credentials", unix.UnixCredentials(&unix.Ucred{Pid: 1}), "control message"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, err := os.Open(os.DevNull)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { f.Close() })
			fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			files, err := filesOf(append(unix.UnixRights(fd), tc.after...))
			if err == nil || !strings.Contains(err.Error(), tc.want) || files != nil {
				closeFiles(files)
				t.Fatalf("filesOf = %d files, %v; want an error saying %q", len(files), err, tc.want)
			}
			if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != unix.EBADF {
				unix.Close(fd)
				t.Errorf("the descriptor that arrived is still open (F_GETFD: %v), want it closed", err)
			}
		})
	}
}
