package relay

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/sockrelay/sockrelay/datapath"
	"github.com/sockrelay/sockrelay/upstream"
)

// refuse answers a client whose handshake will not become a tunnel, and counts and logs why. The client
// connection is closed after the answer: a client that sent an upgrade may have pipelined WebSocket frames
// behind it, and those must never be read as HTTP.
func (s *Server) refuse(w http.ResponseWriter, r *http.Request, e *refusal) {
	s.handshakeFailed(r, e.reason)
	s.log.Info("handshake refused", "client", r.RemoteAddr, "uri", r.RequestURI, "status", e.status,
		"reason", e.reason, "err", e.msg)
	for k, v := range e.header {
		w.Header()[k] = v
	}
	if e.retryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(max(1, int(math.Ceil(e.retryAfter.Seconds())))))
	}
	w.Header().Set("Connection", "close")
	http.Error(w, e.msg, e.status)
}

// serveUpgrade runs one WebSocket handshake. The client's connection is taken over only after the upstream
// has answered with a valid 101; until then the client is an ordinary HTTP client, so no raw byte of it can
// reach an upstream that did not accept the upgrade.
func (s *Server) serveUpgrade(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	key, herr := validateUpgrade(r)
	if herr != nil {
		s.refuse(w, r, herr)
		return
	}

	clientIP := s.clientOf(r).ip
	endHandshake, releaseSlot, lerr := admit(s.limitersFor(s.listenerOf(r)), clientIP)
	if lerr != nil {
		s.refuse(w, r, lerr)
		return
	}
	defer endHandshake()
	slotTaken := true // until a tunnel holds it
	defer func() {
		if slotTaken {
			releaseSlot()
		}
	}()

	route, ok := s.routeOrRefuse(w, r)
	if !ok {
		return
	}
	pool := route.Pool
	r = withPool(r, pool)
	up, herr, err := s.openUpstream(r, route, key)
	if err != nil {
		s.handshakeFailed(r, FailClientGone)
		s.log.Info("handshake failed", "client", r.RemoteAddr, "reason", FailClientGone, "err", err)
		return
	}
	if herr != nil {
		s.refuse(w, r, herr)
		return
	}
	upstream, resp, upstreamPrefix := up.conn, up.resp, up.prefix
	opened := false
	defer func() {
		if !opened {
			upstream.Close()
			up.lease.Release()
		}
	}()
	if resp.StatusCode != http.StatusSwitchingProtocols {
		s.passResponse(w, r, upstream, resp)
		return
	}

	if s.evicted(up.lease.Server) {
		s.refuse(w, r, &refusal{status: http.StatusBadGateway, reason: FailUpstreamRemoved,
			msg: fmt.Sprintf("upstream %s was removed by a reload during the handshake", up.lease.Server.Address())})
		return
	}
	client, clientTLS, clientPrefix, err := hijack(w)
	if err != nil {
		s.handshakeFailed(r, FailClientGone)
		s.log.Info("handshake failed", "client", r.RemoteAddr, "reason", FailClientGone, "err", err)
		return
	}
	t, err := s.establish(opening{
		listener:          s.listenerOf(r),
		client:            datapath.Endpoint{Conn: client, TLS: clientTLS, Peeked: clientPrefix},
		upstream:          datapath.Endpoint{Conn: upstream, TLS: up.tls, Peeked: upstreamPrefix},
		up:                up,
		clientAddr:        r.RemoteAddr,
		clientIP:          clientIP,
		req:               describeRequest(r),
		pool:              pool.Name(),
		releaseSlot:       releaseSlot,
		halfClosedTimeout: s.cfg.HalfClosedTimeout,
	})
	switch {
	case errors.Is(err, errShuttingDownAtOpen):
		client.Close()
		s.handshakeFailed(r, FailShuttingDown)
		return
	case errors.Is(err, errEvictedAtOpen):
		opened, slotTaken = true, false // the tunnel had them, and gave them back as it ended
		s.handshakeFailed(r, FailUpstreamRemoved)
		s.log.Info("handshake failed", "client", r.RemoteAddr, "reason", FailUpstreamRemoved, "err", err)
		return
	}
	opened = true // from here on the tunnel owns both sockets, its lease and its slot
	slotTaken = false
	var switchTo net.Conn = client
	if clientTLS != nil {
		switchTo = clientTLS
	}
	if err := writeSwitch(switchTo, resp.Header, s.cfg.UpstreamResponseTimeout); err != nil {
		s.log.Info("handshake failed", "client", r.RemoteAddr, "reason", FailClientGone, "err", err)
		t.fail(ReasonClientError, err, true)
		return
	}
	s.metrics.handshakeDuration.Observe(time.Since(start).Seconds())
	s.carry(t)
}

// forwardHandshake sends the client's upgrade request to the upstream and reads its answer, within the
// upstream response timeout. A 101 comes back with the bytes the upstream sent behind it (they belong to the
// tunnel); any other complete response comes back for passResponse.
func (s *Server) forwardHandshake(conn net.Conn, r *http.Request, key string) (*http.Response, []byte, *refusal) {
	start := time.Now()
	deadline := start.Add(s.cfg.UpstreamResponseTimeout)
	_ = conn.SetDeadline(deadline)
	fail := func(op string, err error) *refusal {
		if isTimeout(err) {
			return &refusal{status: http.StatusGatewayTimeout, reason: FailUpstreamTimeout,
				msg: fmt.Sprintf("%s: no answer within %s", op, deadline.Sub(start).Round(time.Millisecond))}
		}
		return &refusal{status: http.StatusBadGateway, reason: FailUpstreamError, msg: fmt.Sprintf("%s: %v", op, err)}
	}
	if err := sendUpstreamRequest(conn, r, s.clientOf(r)); err != nil {
		return nil, nil, fail("send handshake", err)
	}
	// Interim responses are skipped; the heads may take MaxHeaderBytes together.
	br := handshakeReader(nil)
	resp, err := upstream.ReadAnswerWith(br, conn, &http.Request{Method: http.MethodGet}, s.cfg.MaxHeaderBytes)
	if err != nil {
		releaseReader(br)
		return nil, nil, fail("read handshake response", err)
	}
	switch {
	case resp.StatusCode == http.StatusSwitchingProtocols:
		if err := validateSwitch(resp, key); err != nil {
			releaseReader(br)
			return nil, nil, &refusal{status: http.StatusBadGateway, reason: FailUpstreamBadSwitch, msg: err.Error()}
		}
	case resp.StatusCode < 200:
		releaseReader(br)
		// Not a status HTTP has (interim ones were skipped): it cannot be passed on as an answer.
		return nil, nil, &refusal{status: http.StatusBadGateway, reason: FailUpstreamError,
			msg: fmt.Sprintf("status %d in answer to a websocket handshake", resp.StatusCode)}
	default:
		// The answer's body reads through br: it is not given back (a refusal is rare).
		return resp, nil, nil
	}
	_ = conn.SetDeadline(time.Time{})
	// A 101 has no body, so everything buffered past its header is the upstream's first tunnel bytes.
	prefix, _ := br.Peek(br.Buffered())
	prefix = bytes.Clone(prefix)
	releaseReader(br)
	return resp, prefix, nil
}

// sendUpstreamRequest writes the client's handshake to the upstream (upstreamRequest) through a shared
// buffer.
func sendUpstreamRequest(conn net.Conn, r *http.Request, client clientIdentity) error {
	bw := handshakeWriter(conn)
	defer releaseWriter(bw)
	writeUpstreamRequest(bw, r, client)
	return bw.Flush()
}

// upstreamRequest is the client's handshake as the upstream gets it: origin-form target, the client's Host,
// its end-to-end headers, no hop-by-hop headers but the upgrade itself, and X-Forwarded-* describing the client.
func upstreamRequest(r *http.Request, client clientIdentity) []byte {
	var b bytes.Buffer
	writeUpstreamRequest(&b, r, client)
	return b.Bytes()
}

// headWriter is where a head is written: a bytes.Buffer or a bufio.Writer, whose write errors it keeps
// for the caller to find once it is done (bufio.Writer.Flush).
type headWriter interface {
	io.Writer
	io.StringWriter
}

// writeUpstreamRequest writes upstreamRequest to w.
func writeUpstreamRequest(w headWriter, r *http.Request, client clientIdentity) {
	h := r.Header.Clone() // r's own headers stay as the client sent them: a retry writes them again
	removeHopHeaders(h)
	h.Set("Connection", "Upgrade")
	h.Set("Upgrade", "websocket")
	setForwarded(h, r, client)
	_, _ = w.WriteString("GET ")
	_, _ = w.WriteString(r.URL.RequestURI())
	_, _ = w.WriteString(" HTTP/1.1\r\nHost: ")
	_, _ = w.WriteString(r.Host)
	_, _ = w.WriteString("\r\n")
	_ = h.Write(w)
	_, _ = w.WriteString("\r\n")
}

// passResponse gives the client the upstream's refusal (a 401, a 403, a redirect, ...) as an ordinary response.
func (s *Server) passResponse(w http.ResponseWriter, r *http.Request, upstream net.Conn, resp *http.Response) {
	defer resp.Body.Close()
	s.handshakeFailed(r, FailUpstreamRefused)
	s.log.Info("handshake refused by upstream", "client", r.RemoteAddr, "uri", r.RequestURI,
		"upstream", upstream.RemoteAddr().String(), "status", resp.StatusCode)
	removeHopHeaders(resp.Header)
	for k, v := range resp.Header {
		w.Header()[k] = v
	}
	w.Header().Set("Connection", "close")
	w.WriteHeader(resp.StatusCode)
	// The body gets a fresh timeout of its own: an upstream that never ends it cannot hold the handler.
	_ = upstream.SetDeadline(time.Now().Add(s.cfg.UpstreamResponseTimeout))
	if _, err := io.Copy(w, resp.Body); err != nil {
		s.log.Info("passing upstream response body failed", "client", r.RemoteAddr, "err", err)
	}
}

// hijack takes the client's connection from net/http, with the bytes net/http had already read past the
// request: the client's pipelined first tunnel bytes. On a TLS listener it also returns the TLS
// connection, which the tunnel's bytes go through; the socket is still returned, for closing it.
func hijack(w http.ResponseWriter) (*net.TCPConn, *tls.Conn, []byte, error) {
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return nil, nil, nil, fmt.Errorf("hijack client connection: %w", err)
	}
	prefix, _ := brw.Reader.Peek(brw.Reader.Buffered())
	prefix = bytes.Clone(prefix)
	// Nothing reads or writes through net/http's buffers any more: other handshakes may use them.
	releaseReader(brw.Reader)
	releaseWriter(brw.Writer)
	tlsConn, isTLS := conn.(*tls.Conn)
	if isTLS {
		// Ciphertext the TLS connection has not read yet stays where it is, in a PROXY header reader
		// or the socket: the TLS connection goes on reading through what it was given.
		conn = tlsConn.NetConn()
	}
	if pc, ok := conn.(*proxiedConn); ok {
		if isTLS {
			return pc.TCPConn, tlsConn, prefix, nil
		}
		// net/http read through the PROXY header reader: what it holds comes first, then what that
		// reader holds, then the socket.
		return pc.TCPConn, nil, append(prefix, pc.leftover()...), nil
	}
	tc, ok := conn.(*net.TCPConn)
	if !ok {
		conn.Close()
		return nil, nil, nil, fmt.Errorf("client connection is a %T, not TCP", conn)
	}
	return tc, tlsConn, prefix, nil
}

// writeSwitch sends the client the upstream's 101 with the upstream's end-to-end headers
// (Sec-WebSocket-Accept, -Protocol, -Extensions, cookies) and this hop's Upgrade and Connection. It
// rewrites upstreamHeader to those: the upstream's answer has no other use once the client has it.
func writeSwitch(client net.Conn, upstreamHeader http.Header, timeout time.Duration) error {
	h := upstreamHeader
	removeHopHeaders(h)
	h.Set("Upgrade", "websocket")
	h.Set("Connection", "Upgrade")
	_ = client.SetWriteDeadline(time.Now().Add(timeout)) // a head past the buffer's size is written as it goes
	bw := handshakeWriter(client)
	defer releaseWriter(bw)
	_, _ = bw.WriteString("HTTP/1.1 101 Switching Protocols\r\n")
	_ = h.Write(bw)
	_, _ = bw.WriteString("\r\n")
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("send 101 to client: %w", err)
	}
	return client.SetWriteDeadline(time.Time{})
}
