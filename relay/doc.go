// Package relay is sockrelay's front: it accepts clients, runs the WebSocket handshake (or takes a raw
// TCP connection), chooses and dials an upstream, and then hands the two sockets to a datapath that moves
// the tunnel's bytes until it ends.
//
// # The life of a tunnel, file by file
//
// A WebSocket tunnel on the kernel (sockmap) datapath:
//
//  1. Accept: server.go (ServeListenerWith, wrapListener) and proxyproto.go (the PROXY header reader).
//  2. Dispatch: server.go (ServeHTTP) sends an upgrade request to serveUpgrade.
//  3. Validate the request against RFC 6455: handshake.go (validateUpgrade).
//  4. Admit under the limits: routing.go (listenerOf, limitersFor), clientip.go (clientOf), limits.go (admit).
//  5. Route: routing.go (routeOrRefuse, Router.Route).
//  6. Dial and forward the handshake, with retries: routing.go (openUpstream, withRetries, connectServer),
//     then server.go (forwardHandshake, validateSwitch of handshake.go).
//  7. Refusals (a 4xx/5xx to the client, or the upstream's own answer): server.go (refuse, passResponse).
//  8. Take the client's socket and the bytes read past its request: server.go (hijack).
//  9. Register the Tunnel (tunnel.go) in the Registry (registry.go), then write the 101: server.go
//     (writeSwitch).
//  10. Carry: server.go (startTunnel) hands the tunnel to its datapath: copy.go, splice.go, or the kernel
//     engine in sockmap.go (handoff, event loop, FIN drain, stall guard) and sockmap_backpressure.go (a
//     demoted direction relayed by userspace).
//  11. While it lives: timeouts.go (idle, lifetime, half-close), tunnellog.go ("tunnel alive" lines),
//     admin.go (/debug/tunnels, closing one), routing.go (CloseTunnelsTo on a reload).
//  12. End: tunnel.go (end: release from the datapath, close both sockets, once), then server.go
//     (tunnelEnded: metrics, lease and limits slot given back, one log line) and registry.go (remove).
//
// A raw TCP tunnel (tcp.go, serveTCPConn) takes steps 4–6 without HTTP, and joins at step 9.
//
// The datapath is chosen once at start (server.go, setUpDatapath): sockmap only when this kernel passes
// loader.Probe and the self-test (selftest.go), and per listener (ListenerOptions.Datapath). Plain HTTP
// requests are reverse-proxied (server.go, serveRequest; httpidle.go bounds their silences). metrics.go
// holds the Prometheus metrics, which collectors read from the registry at scrape time.
package relay
