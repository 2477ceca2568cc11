package config

import "testing"

func TestMatch(t *testing.T) {
	c, err := Parse("sockrelay.yaml", []byte(`
listeners:
  - address: 127.0.0.1:8080
    routes:
      - {host: chat.example.com, path_prefix: /ws, pool: chat}
      - {host: "*.example.com", path_prefix: /api/, pool: api}
      - {host: "*.example.com", pool: wild}
      - {host: "::1", pool: local}
      - {path_prefix: /ws, pool: ws}
      - {pool: fallback}
pools:
  chat: {servers: [127.0.0.1:9001]}
  api: {servers: [127.0.0.1:9002]}
  wild: {servers: [127.0.0.1:9003]}
  local: {servers: [127.0.0.1:9004]}
  ws: {servers: [127.0.0.1:9005]}
  fallback: {servers: [127.0.0.1:9006]}
`))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Warnings) > 0 {
		t.Fatalf("warnings: %q", c.Warnings)
	}
	l := &c.Listeners[0]
	for _, tc := range []struct {
		host, path, pool string
	}{
		{"chat.example.com", "/ws", "chat"},
		{"chat.example.com", "/ws/room/1", "chat"},
		{"CHAT.Example.com:8080", "/ws", "chat"}, // case and port do not matter
		{"chat.example.com.", "/ws", "chat"},     // nor a trailing dot
		{"chat.example.com", "/wsx", "wild"},     // segment boundary: /ws does not match /wsx
		{"chat.example.com", "/", "wild"},        // the host matches, the path does not
		{"a.example.com", "/api/v1", "api"},      // a prefix ending in / matches below it...
		{"a.example.com", "/api/", "api"},        // ...and itself...
		{"a.example.com", "/api", "wild"},        // ...but not without the slash
		{"a.b.example.com", "/x", "wild"},        // *.example.com: one label or more
		{"example.com", "/x", "fallback"},        // but not example.com itself
		{"badexample.com", "/x", "fallback"},     // nor a name that merely ends the same
		{"[::1]:8080", "/", "local"},             // IPv6 host with port
		{"::1", "/", "local"},                    // and without
		{"other.org", "/ws", "ws"},               // a route without host matches any
		{"other.org", "/ws/", "ws"},              // /ws matches /ws/
		{"other.org", "", "fallback"},            // an empty path is /
		{"", "/anything", "fallback"},            // a request without Host
	} {
		r, ok := l.Match(tc.host, tc.path)
		if !ok || r.Pool != tc.pool {
			t.Errorf("Match(%q, %q) = %+v, %v; want pool %s", tc.host, tc.path, r, ok, tc.pool)
		}
	}
}

func TestMatchNone(t *testing.T) {
	l := &Listener{Routes: []Route{{Host: "chat.example.com", PathPrefix: "/", Pool: "chat"}}}
	if r, ok := l.Match("other.org", "/"); ok || r != nil {
		t.Errorf("Match(other.org) = %+v, %v; want nil, false", r, ok)
	}
}

func TestCovers(t *testing.T) {
	for _, tc := range []struct {
		a, b Route
		want bool
	}{
		{Route{PathPrefix: "/"}, Route{Host: "x.org", PathPrefix: "/ws"}, true},
		{Route{PathPrefix: "/ws"}, Route{PathPrefix: "/ws/"}, true},
		{Route{PathPrefix: "/ws/"}, Route{PathPrefix: "/ws"}, false},
		{Route{PathPrefix: "/ws"}, Route{PathPrefix: "/wsx"}, false},
		{Route{Host: "*.example.com", PathPrefix: "/"}, Route{Host: "*.a.example.com", PathPrefix: "/"}, true},
		{Route{Host: "*.example.com", PathPrefix: "/"}, Route{Host: "example.com", PathPrefix: "/"}, false},
		{Route{Host: "*.a.example.com", PathPrefix: "/"}, Route{Host: "*.example.com", PathPrefix: "/"}, false},
		{Route{Host: "x.org", PathPrefix: "/"}, Route{PathPrefix: "/"}, false},
	} {
		if got := covers(tc.a, tc.b); got != tc.want {
			t.Errorf("covers(%+v, %+v) = %v, want %v", tc.a, tc.b, got, tc.want)
		}
	}
}
