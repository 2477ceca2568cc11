// Package handover is the protocol a running relay and the new relay process it starts (`sockrelay
// upgrade`) speak over a Unix socket pair: messages of a small versioned frame (a fixed header, then a
// JSON body) with the descriptors they hand over attached as SCM_RIGHTS.
//
// One message is one datagram of a SOCK_SEQPACKET socket, so the kernel keeps the boundaries and a
// message's descriptors arrive with it. The conversation of version 1:
//
//	old → new  offer   the listening sockets, each with what identifies it (Listener)
//	new → old  ready   the new process serves; it names what else it can take (Ready.Accepts)
//	      or   failed  it could not start (Failed.Reason); it exits
//
// after which the old process closes its end. Later stages add to this without changing it: messages
// that hand over live tunnels (both descriptors, id, client, upstream, pool, engine, counters, start,
// timeouts) and pinned BPF objects, sent after ready and only to a new process whose Ready.Accepts names
// them; fields a decoder does not know are ignored, as encoding/json does. Version changes only when a
// message would mean something else to a decoder of the older version.
package handover

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
)

// Version is the protocol version this package writes and the only one it reads.
const Version = 1

// magic opens every frame, so that a peer that is not a relay is told apart from a relay of another
// version.
var magic = [4]byte{'S', 'R', 'H', 'O'}

// headerLen is the frame's fixed header: magic, version (uint16), body length (uint32), descriptor count
// (uint16), all big-endian.
const headerLen = 4 + 2 + 4 + 2

// MaxBody bounds a message's JSON body: a frame is one datagram, and a datagram must fit the socket's
// send buffer.
const MaxBody = 64 << 10

// MaxFDs bounds the descriptors of one message (the kernel's SCM_MAX_FD is 253).
const MaxFDs = 250

// Type says what a message is.
type Type string

const (
	TypeOffer  Type = "offer"  // old → new: Offer
	TypeReady  Type = "ready"  // new → old: Ready
	TypeFailed Type = "failed" // new → old: Failed
)

// Message is one frame's body. Exactly the field of its Type is set.
type Message struct {
	Type   Type    `json:"type"`
	Offer  *Offer  `json:"offer,omitempty"`
	Ready  *Ready  `json:"ready,omitempty"`
	Failed *Failed `json:"failed,omitempty"`
}

// Offer is what the old process hands over first: its listening sockets.
type Offer struct {
	PID       int        `json:"pid"` // the old process
	Listeners []Listener `json:"listeners"`
}

// Kind is what a listener serves.
type Kind string

const (
	KindWebSocket Kind = "websocket" // an http listener: WebSocket upgrades and plain requests
	KindTCP       Kind = "tcp"       // a tcp listener: raw TCP tunnels
	KindAdmin     Kind = "admin"     // the admin listener
)

// Listener is one listening socket and what identifies it. Address is as the configuration gives it
// (e.g. ":8080", "127.0.0.1:0" or "unix:/run/sockrelay/admin.sock"), which is how the new process
// matches it to its own configuration; Bound is where it is bound.
type Listener struct {
	Name          string `json:"name"`
	Address       string `json:"address"`
	Bound         string `json:"bound"`
	Kind          Kind   `json:"kind"`
	TLS           bool   `json:"tls,omitempty"`
	ProxyProtocol bool   `json:"proxy_protocol,omitempty"`
	// FD is the index of its descriptor among the message's.
	FD int `json:"fd"`
}

// Ready is the new process's word that it serves: the old one may let go.
type Ready struct {
	PID int `json:"pid"` // the new process
	// Accepts names what else the new process can take after its listeners; empty in version 1's
	// first stage. A later stage adds e.g. "tunnels" and "bpf".
	Accepts []string `json:"accepts,omitempty"`
}

// Failed is why the new process could not take over.
type Failed struct {
	Reason string `json:"reason"`
}

// Encode returns the frame of m, which carries nfds descriptors.
func Encode(m Message, nfds int) ([]byte, error) {
	if err := m.check(nfds); err != nil {
		return nil, err
	}
	body, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("handover: encode %s message: %w", m.Type, err)
	}
	if len(body) > MaxBody {
		return nil, fmt.Errorf("handover: %s message of %d bytes: at most %d fit one frame", m.Type, len(body), MaxBody)
	}
	frame := make([]byte, headerLen, headerLen+len(body))
	copy(frame, magic[:])
	binary.BigEndian.PutUint16(frame[4:], Version)
	binary.BigEndian.PutUint32(frame[6:], uint32(len(body)))
	binary.BigEndian.PutUint16(frame[10:], uint16(nfds))
	return append(frame, body...), nil
}

// ErrTruncated is a frame shorter than its header says: cut off in transit, or not a frame at all.
var ErrTruncated = errors.New("handover: truncated message")

// Decode reads the frame that arrived with nfds descriptors.
func Decode(frame []byte, nfds int) (Message, error) {
	if len(frame) < headerLen {
		return Message{}, fmt.Errorf("%w: %d bytes, less than the %d-byte header", ErrTruncated, len(frame), headerLen)
	}
	if [4]byte(frame[:4]) != magic {
		return Message{}, fmt.Errorf("handover: not a handover message: it starts %q, not %q", frame[:4], magic[:])
	}
	if v := binary.BigEndian.Uint16(frame[4:]); v != Version {
		return Message{}, fmt.Errorf("handover: message of protocol version %d; this binary speaks version %d only", v, Version)
	}
	n := int(binary.BigEndian.Uint32(frame[6:]))
	if n > MaxBody {
		return Message{}, fmt.Errorf("handover: body of %d bytes: at most %d", n, MaxBody)
	}
	if body := len(frame) - headerLen; body != n {
		if body < n {
			return Message{}, fmt.Errorf("%w: body of %d bytes, the header says %d", ErrTruncated, body, n)
		}
		return Message{}, fmt.Errorf("handover: %d bytes after a body of %d", body-n, n)
	}
	if want := int(binary.BigEndian.Uint16(frame[10:])); want != nfds {
		return Message{}, fmt.Errorf("handover: the message says it carries %d descriptors, %d arrived", want, nfds)
	}
	var m Message
	if err := json.Unmarshal(frame[headerLen:], &m); err != nil {
		return Message{}, fmt.Errorf("handover: message body: %w", err)
	}
	if err := m.check(nfds); err != nil {
		return Message{}, err
	}
	return m, nil
}

// check says whether m is whole and its descriptor indexes name each of its nfds descriptors once.
func (m Message) check(nfds int) error {
	if nfds < 0 || nfds > MaxFDs {
		return fmt.Errorf("handover: %d descriptors: accepted 0 to %d per message", nfds, MaxFDs)
	}
	var fds []int
	switch m.Type {
	case TypeOffer:
		if m.Offer == nil {
			return errors.New("handover: offer message without its offer")
		}
		for i, l := range m.Offer.Listeners {
			switch l.Kind {
			case KindWebSocket, KindTCP, KindAdmin:
			default:
				return fmt.Errorf("handover: offer: listener %d (%q): kind %q; accepted %s, %s or %s", i, l.Name, l.Kind, KindWebSocket, KindTCP, KindAdmin)
			}
			fds = append(fds, l.FD)
		}
	case TypeReady:
		if m.Ready == nil {
			return errors.New("handover: ready message without its pid")
		}
	case TypeFailed:
		if m.Failed == nil {
			return errors.New("handover: failed message without its reason")
		}
	default:
		return fmt.Errorf("handover: message type %q; accepted %s, %s or %s", m.Type, TypeOffer, TypeReady, TypeFailed)
	}
	return checkFDs(fds, nfds)
}

// checkFDs says whether the indexes refs name each of nfds descriptors exactly once.
func checkFDs(refs []int, nfds int) error {
	if len(refs) != nfds {
		return fmt.Errorf("handover: the message names %d descriptors and carries %d", len(refs), nfds)
	}
	seen := make([]bool, nfds)
	for _, fd := range refs {
		if fd < 0 || fd >= nfds {
			return fmt.Errorf("handover: descriptor index %d: the message carries %d (0 to %d)", fd, nfds, nfds-1)
		}
		if seen[fd] {
			return fmt.Errorf("handover: descriptor index %d is named twice", fd)
		}
		seen[fd] = true
	}
	return nil
}
