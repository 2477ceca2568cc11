// Package relay is sockrelay's front: it accepts clients, runs the WebSocket handshake (or takes a raw
// TCP connection), chooses and dials an upstream, and then hands the two sockets to a datapath that moves
// the tunnel's bytes until it ends.
//
// # The life of a tunnel, file by file
//
// A WebSocket tunnel on the kernel (sockmap) datapath:
//
//  1. Accept: listen.go (PrepareListener, then Serve; wrapListener) and proxylistener.go (the PROXY header
//     reader).
//  2. Dispatch: server.go (ServeHTTP) sends an upgrade request to websocket.go (serveUpgrade).
//  3. Validate the request against RFC 6455: handshake.go (validateUpgrade).
//  4. Admit under the limits: routing.go (listenerOf, limitersFor), clientip.go (clientOf), limits.go (admit).
//  5. Route: routing.go (routeOrRefuse, Router.Route).
//  6. Dial and forward the handshake, with retries: routing.go (openUpstream, withRetries, connectServer),
//     then websocket.go (forwardHandshake, validateSwitch of handshake.go).
//  7. Refusals (a 4xx/5xx to the client, or the upstream's own answer): websocket.go (refuse,
//     passResponse).
//  8. Take the client's socket and the bytes read past its request: websocket.go (hijack).
//  9. Establish: open.go (establish) picks the engine the endpoints allow (engineFor: TLS runs on copy),
//     makes the Tunnel (tunnel.go) and its datapath.Pair, registers it (registry.go) and checks for
//     eviction; the WebSocket front then writes the 101 (websocket.go, writeSwitch).
//  10. Carry: open.go (carry) hands the pair to its engine: copy or splice on the event loops (engines.go,
//     datapath.EventLoop; TLS pairs on datapath.Copier), or the kernel engine, package datapath/sockmap
//     (handoff.go, loop.go, drain.go, backpressure.go). A pair the kernel cannot take runs on copy.
//  11. While it lives: timeouts.go (idle, lifetime, half-close), tunnellog.go ("tunnel alive" lines),
//     admin.go (/debug/tunnels, closing one), routing.go (CloseTunnelsTo on a reload).
//  12. End: datapath.Pair.End (the engine's carrier released, both sockets closed, once), then open.go
//     (tunnelEnded: metrics, lease and limits slot given back, one log line) and registry.go (remove).
//
// A raw TCP tunnel (tcp.go, serveTCPConn) takes steps 4–6 without HTTP, and joins at step 9: both fronts
// end in establish and carry.
//
// The datapath is chosen once at start (engines.go, setUpDatapath): sockmap only when this kernel passes
// the probe and the self-test (sockmap.Start), and per listener (ListenerOptions.Datapath); under auto with
// the kernel engine loaded, automove.go moves each plain tunnel between sockmap and the event loop as its
// traffic changes (policy in datapath/auto). The engines
// and the contract they meet are in package datapath; the kernel engine's counters are read by the
// metrics at scrape time (sockmap.Engine.Stats). Plain HTTP requests are reverse-proxied (httpproxy.go,
// serveRequest; httpidle.go bounds their silences). metrics.go holds the Prometheus metrics.
package relay
