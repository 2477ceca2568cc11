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
// after which the old process closes its end, unless the new process's Ready.Accepts names "tunnels"
// (AcceptTunnels). Then the old process hands over its live userspace tunnels, in batches:
//
//	old → new  data     peeked bytes of a tunnel of the next batch too big to ride in it (Data)
//	old → new  tunnels  a batch: each tunnel's two descriptors and its state (Tunnels)
//	new → old  adopted  per tunnel, whether the new process took it (Adopted); it carries none yet
//	old → new  commit   the old process has let go of those the new one took: carry them (Commit);
//	           or, with Abort, it keeps them all: drop them
//	old → new  done     no more tunnels; the old process closes its end
//
// A tunnel is carried by exactly one process: the old one stops carrying it before it sends it and
// carries it on again only when the new one refused it (or did not answer, and was told to drop it); the
// new one carries it only after the commit (or once the old process is gone: an end of the socket pair
// without a commit). The offer also carries the kernel datapath's BPF objects (Offer.BPF), when the old
// process runs it: a new process that adopts them says so (AcceptBPF), and the old one then hands over
// its kernel tunnels too, each with its engine's state (Tunnel.Kernel), the sockets left in the BPF maps.
// Fields a decoder does not know are ignored, as encoding/json does. Version
// changes only when a message would mean something else to a decoder of the older version.
package handover

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"time"
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

	TypeData    Type = "data"    // old → new: Data
	TypeTunnels Type = "tunnels" // old → new: Tunnels
	TypeAdopted Type = "adopted" // new → old: Adopted
	TypeCommit  Type = "commit"  // old → new: Commit
	TypeDone    Type = "done"    // old → new: Done
)

// AcceptTunnels in Ready.Accepts says the new process adopts live tunnels.
const AcceptTunnels = "tunnels"

// AcceptBPF in Ready.Accepts says the new process adopted the BPF objects of the offer (Offer.BPF): its
// kernel engine runs over them, and it adopts kernel tunnels.
const AcceptBPF = "bpf"

// Message is one frame's body. Exactly the field of its Type is set.
type Message struct {
	Type   Type    `json:"type"`
	Offer  *Offer  `json:"offer,omitempty"`
	Ready  *Ready  `json:"ready,omitempty"`
	Failed *Failed `json:"failed,omitempty"`

	Data    *Data    `json:"data,omitempty"`
	Tunnels *Tunnels `json:"tunnels,omitempty"`
	Adopted *Adopted `json:"adopted,omitempty"`
	Commit  *Commit  `json:"commit,omitempty"`
	Done    *Done    `json:"done,omitempty"`
}

// Offer is what the old process hands over first: its listening sockets.
type Offer struct {
	PID       int        `json:"pid"` // the old process
	Listeners []Listener `json:"listeners"`
	// LastTunnelID is the id the old process gave its latest tunnel: the new process numbers its own
	// tunnels well past it, so that a tunnel it adopts keeps its id.
	LastTunnelID uint64 `json:"last_tunnel_id,omitempty"`
	// BPF are the kernel datapath's BPF objects (maps and programs, loader.Export), when the old process
	// runs it; empty otherwise.
	BPF []BPFObject `json:"bpf,omitempty"`
}

// BPFObject is one BPF map or program: its name in the BPF build, and the index of its descriptor among
// the message's.
type BPFObject struct {
	Name string `json:"name"`
	FD   int    `json:"fd"`
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

// Tunnels is a batch of live tunnels: per tunnel, both descriptors and what the new process needs to
// own it.
type Tunnels struct {
	Batch   int      `json:"batch"`
	Tunnels []Tunnel `json:"tunnels"`
}

// Tunnel is one live tunnel, stopped at a byte boundary: its engine holds nothing of it, the bytes it
// had read but not written are Peeked, and Finished says which direction has carried its FIN.
type Tunnel struct {
	ID       uint64 `json:"id"`
	Client   string `json:"client"`   // the client's address
	Upstream string `json:"upstream"` // the upstream server's address, as its pool names it
	Pool     string `json:"pool"`
	Listener string `json:"listener"`
	Datapath string `json:"datapath"` // the engine that carried it: copy, splice or sockmap
	// URI, Host and UserAgent are the request that opened it, for its log lines.
	URI        string    `json:"uri,omitempty"`
	Host       string    `json:"host,omitempty"`
	UserAgent  string    `json:"user_agent,omitempty"`
	ClientIP   string    `json:"client_ip,omitempty"` // what the limits count it under: see relay.Adoption
	Started    time.Time `json:"started"`
	LastActive time.Time `json:"last_active"`
	// HalfClosedAt is when its first FIN was carried; zero while neither direction has finished.
	HalfClosedAt      time.Time     `json:"half_closed_at,omitzero"`
	HalfClosedTimeout time.Duration `json:"half_closed_timeout,omitempty"`
	ToUpstream        uint64        `json:"to_upstream"`
	ToClient          uint64        `json:"to_client"`
	// Finished is per direction, client → upstream then upstream → client.
	Finished [2]bool `json:"finished"`
	// Peeked are the bytes read from the client (0) and from the upstream (1) that their peer has not
	// been sent yet: they go first. Data messages before the batch may have sent a head of them.
	Peeked [2][]byte `json:"peeked"`
	// ClientFD and UpstreamFD are the indexes of its descriptors among the message's.
	ClientFD   int `json:"client_fd"`
	UpstreamFD int `json:"upstream_fd"`
	// Kernel is, for a kernel tunnel (Datapath sockmap), its engine's state (datapath/sockmap.TunnelState),
	// which the adopting engine reads: the sockets are in the BPF maps the new process adopted.
	Kernel json.RawMessage `json:"kernel,omitempty"`
}

// MaxData bounds the bytes of one Data message (their base64 fits a body).
const MaxData = 32 << 10

// Data is a piece of a tunnel's peeked bytes of one direction (0: from the client, 1: from the
// upstream), sent ahead of the batch that names the tunnel: the new process puts them before the
// tunnel's own Peeked.
type Data struct {
	ID    uint64 `json:"id"`
	Dir   int    `json:"dir"`
	Bytes []byte `json:"bytes"`
}

// Adopted is the new process's answer to a batch: one result per tunnel, in the batch's order.
type Adopted struct {
	Batch   int           `json:"batch"`
	Results []AdoptResult `json:"results"`
}

// AdoptResult says whether the new process took a tunnel (Error empty) and under which id.
type AdoptResult struct {
	ID    uint64 `json:"id"`
	NewID uint64 `json:"new_id,omitempty"`
	Error string `json:"error,omitempty"`
}

// Commit settles a batch: without Abort the old process has let go of every tunnel the new one took,
// which carries them now; with Abort the old one carries them all on, and the new one drops them.
type Commit struct {
	Batch int  `json:"batch"`
	Abort bool `json:"abort,omitempty"`
}

// Done ends the tunnels' handover; Tunnels is how many the old process handed over.
type Done struct {
	Tunnels int `json:"tunnels"`
	// EventsStopped: the old process reads the kernel datapath's mode events no more (it holds no kernel
	// tunnel, or runs no kernel engine), so the new one may stop its sweeps for events it read. Without
	// it the new process sweeps until the old one has exited.
	EventsStopped bool `json:"events_stopped,omitempty"`
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
		for _, o := range m.Offer.BPF {
			fds = append(fds, o.FD)
		}
	case TypeReady:
		if m.Ready == nil {
			return errors.New("handover: ready message without its pid")
		}
	case TypeFailed:
		if m.Failed == nil {
			return errors.New("handover: failed message without its reason")
		}
	case TypeTunnels:
		if m.Tunnels == nil {
			return errors.New("handover: tunnels message without its batch")
		}
		for _, t := range m.Tunnels.Tunnels {
			fds = append(fds, t.ClientFD, t.UpstreamFD)
		}
	case TypeData:
		if m.Data == nil || m.Data.Dir < 0 || m.Data.Dir > 1 || len(m.Data.Bytes) > MaxData {
			return fmt.Errorf("handover: data message: accepted a direction of 0 or 1 and at most %d bytes", MaxData)
		}
	case TypeAdopted:
		if m.Adopted == nil {
			return errors.New("handover: adopted message without its results")
		}
	case TypeCommit:
		if m.Commit == nil {
			return errors.New("handover: commit message without its batch")
		}
	case TypeDone:
		if m.Done == nil {
			return errors.New("handover: done message without its count")
		}
	default:
		return fmt.Errorf("handover: message type %q; accepted %s, %s, %s, %s, %s, %s, %s or %s", m.Type,
			TypeOffer, TypeReady, TypeFailed, TypeData, TypeTunnels, TypeAdopted, TypeCommit, TypeDone)
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
