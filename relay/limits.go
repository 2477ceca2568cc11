package relay

import (
	"fmt"
	"math"
	"net/http"
	"sync"
	"time"
)

// Limits keep one client, or everyone together, from exhausting the relay. Zero values are unlimited.
// They apply to WebSocket handshakes and the tunnels they open; plain HTTP requests are not limited.
type Limits struct {
	// MaxTunnels caps live tunnels; past it a handshake gets 503 with Retry-After.
	MaxTunnels int
	// MaxTunnelsPerIP caps one client address's live tunnels; past it 503 with Retry-After.
	MaxTunnelsPerIP int
	// HandshakesPerIP is one client address's sustained handshake rate, per second, with bursts of
	// HandshakeBurstPerIP (at least 1); past it 429 with Retry-After saying when the next is allowed.
	// Every attempt pays, even one another limit then refuses (as nginx's limit_req counts requests), so
	// that a client hammering at its tunnel limit is slowed down too.
	HandshakesPerIP     float64
	HandshakeBurstPerIP int
	// MaxConcurrentHandshakes caps handshakes in progress (a slow upstream, or a flood); past it 503.
	MaxConcurrentHandshakes int
}

// Validate says which limit is out of range.
func (l Limits) Validate() error {
	for _, c := range []struct {
		name string
		v    int
	}{{"max_tunnels", l.MaxTunnels}, {"max_tunnels_per_ip", l.MaxTunnelsPerIP},
		{"handshake burst per IP", l.HandshakeBurstPerIP}, {"max_concurrent_handshakes", l.MaxConcurrentHandshakes}} {
		if c.v < 0 {
			return fmt.Errorf("limit %s: %d; accepted 0 (unlimited) or more", c.name, c.v)
		}
	}
	if l.HandshakesPerIP < 0 || math.IsNaN(l.HandshakesPerIP) || math.IsInf(l.HandshakesPerIP, 0) {
		return fmt.Errorf("limit handshakes per IP: %v; accepted 0 (unlimited) or a positive rate per second", l.HandshakesPerIP)
	}
	return nil
}

// limiter enforces one set of Limits (the relay's, or a listener's).
type limiter struct {
	lim Limits
	now func() time.Time

	mu         sync.Mutex
	tunnels    int
	perIP      map[string]int
	handshakes int
	buckets    map[string]*bucket
	takes      int // since the last sweep of full buckets
}

// bucket is one client address's token bucket of handshakes.
type bucket struct {
	tokens float64
	at     time.Time
}

func newLimiter(l Limits) *limiter {
	if l.HandshakesPerIP > 0 && l.HandshakeBurstPerIP < 1 {
		l.HandshakeBurstPerIP = max(1, int(math.Ceil(l.HandshakesPerIP)))
	}
	return &limiter{lim: l, now: time.Now, perIP: map[string]int{}, buckets: map[string]*bucket{}}
}

// Handshake-refusal reasons of the limits.
const (
	FailLimitTunnels      = "limit_tunnels"        // MaxTunnels reached
	FailLimitTunnelsPerIP = "limit_tunnels_per_ip" // MaxTunnelsPerIP reached for the client
	FailLimitRate         = "limit_handshake_rate" // the client's handshake rate exceeded
	FailLimitHandshakes   = "limit_handshakes"     // MaxConcurrentHandshakes reached
)

// beginHandshake admits one handshake from ip, or says which limit refuses it. The returned function
// ends the handshake (for the concurrency limit); call it once the handshake is over, either way.
func (l *limiter) beginHandshake(ip string) (func(), *refusal) {
	if l.lim.MaxConcurrentHandshakes == 0 && l.lim.HandshakesPerIP == 0 {
		return noop, nil // nothing to count: no lock, no allocation per handshake
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.lim.MaxConcurrentHandshakes > 0 && l.handshakes >= l.lim.MaxConcurrentHandshakes {
		return nil, &refusal{status: http.StatusServiceUnavailable, reason: FailLimitHandshakes, retryAfter: time.Second,
			msg: fmt.Sprintf("too many handshakes in progress (%d); try again shortly", l.lim.MaxConcurrentHandshakes)}
	}
	if l.lim.HandshakesPerIP > 0 {
		if wait := l.takeLocked(ip); wait > 0 {
			return nil, &refusal{status: http.StatusTooManyRequests, reason: FailLimitRate, retryAfter: wait,
				msg: fmt.Sprintf("too many handshakes from %s: at most %g a second", ip, l.lim.HandshakesPerIP)}
		}
	}
	l.handshakes++
	var once sync.Once
	return func() {
		once.Do(func() {
			l.mu.Lock()
			l.handshakes--
			l.mu.Unlock()
		})
	}, nil
}

// takeLocked takes a token from ip's bucket and returns 0, or how long until one is there.
func (l *limiter) takeLocked(ip string) time.Duration {
	now := l.now()
	burst := float64(l.lim.HandshakeBurstPerIP)
	b := l.buckets[ip]
	if b == nil {
		b = &bucket{tokens: burst, at: now}
		l.buckets[ip] = b
	}
	b.tokens = min(burst, b.tokens+now.Sub(b.at).Seconds()*l.lim.HandshakesPerIP)
	b.at = now
	if l.takes++; l.takes >= 4096 {
		l.sweepLocked(now, burst)
	}
	if b.tokens >= 1 {
		b.tokens--
		return 0
	}
	return time.Duration((1 - b.tokens) / l.lim.HandshakesPerIP * float64(time.Second))
}

// sweepLocked forgets the buckets that have refilled: a client that comes back starts full anyway, so the
// map holds only clients seen within about burst/rate seconds.
func (l *limiter) sweepLocked(now time.Time, burst float64) {
	l.takes = 0
	for ip, b := range l.buckets {
		if b.tokens+now.Sub(b.at).Seconds()*l.lim.HandshakesPerIP >= burst {
			delete(l.buckets, ip)
		}
	}
}

// reserveTunnel holds a tunnel slot for ip, or says which limit refuses it. The returned function gives
// the slot back; call it once, when the tunnel ends or the handshake fails.
func (l *limiter) reserveTunnel(ip string) (func(), *refusal) {
	if l.lim.MaxTunnels == 0 && l.lim.MaxTunnelsPerIP == 0 {
		return noop, nil // nothing held per tunnel when nothing is limited
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.lim.MaxTunnels > 0 && l.tunnels >= l.lim.MaxTunnels {
		return nil, &refusal{status: http.StatusServiceUnavailable, reason: FailLimitTunnels, retryAfter: 5 * time.Second,
			msg: fmt.Sprintf("the relay holds its maximum of %d tunnels; try again later", l.lim.MaxTunnels)}
	}
	if l.lim.MaxTunnelsPerIP > 0 && l.perIP[ip] >= l.lim.MaxTunnelsPerIP {
		return nil, &refusal{status: http.StatusServiceUnavailable, reason: FailLimitTunnelsPerIP, retryAfter: 5 * time.Second,
			msg: fmt.Sprintf("%s holds its maximum of %d tunnels; close one first", ip, l.lim.MaxTunnelsPerIP)}
	}
	l.tunnels++
	l.perIP[ip]++
	return l.releaseOnce(ip), nil
}

// holdTunnel counts a tunnel that exists already (one an upgrade handed over) under ip, whatever the
// limits say: it is never refused, since refusing would reset a live tunnel, but it takes its slot, so
// that handshakes past the limits are refused until it ends. The returned function gives the slot back.
func (l *limiter) holdTunnel(ip string) func() {
	if l.lim.MaxTunnels == 0 && l.lim.MaxTunnelsPerIP == 0 {
		return noop
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.tunnels++
	l.perIP[ip]++
	return l.releaseOnce(ip)
}

// releaseOnce is the function that gives back one tunnel slot of ip, the first time it is called.
func (l *limiter) releaseOnce(ip string) func() {
	var once sync.Once
	return func() {
		once.Do(func() {
			l.mu.Lock()
			l.tunnels--
			if l.perIP[ip]--; l.perIP[ip] <= 0 {
				delete(l.perIP, ip)
			}
			l.mu.Unlock()
		})
	}
}

func noop() {}

// admit runs a handshake from ip through every limiter in order (the relay's, then the listener's): it
// returns the functions that end the handshake and release the tunnel slots, or the first refusal, having
// released whatever it took before it.
func admit(limiters []*limiter, ip string) (endHandshake, releaseTunnel func(), refused *refusal) {
	if len(limiters) == 1 {
		// The common case: only the relay's limits. No slices or closures around the limiter's own.
		end, err := limiters[0].beginHandshake(ip)
		if err != nil {
			return nil, nil, err
		}
		release, err := limiters[0].reserveTunnel(ip)
		if err != nil {
			end()
			return nil, nil, err
		}
		return end, release, nil
	}
	var ends, releases []func()
	undo := func() {
		for _, f := range ends {
			f()
		}
		for _, f := range releases {
			f()
		}
	}
	for _, l := range limiters {
		end, err := l.beginHandshake(ip)
		if err != nil {
			undo()
			return nil, nil, err
		}
		ends = append(ends, end)
		release, err := l.reserveTunnel(ip)
		if err != nil {
			undo()
			return nil, nil, err
		}
		releases = append(releases, release)
	}
	return func() {
			for _, f := range ends {
				f()
			}
		}, func() {
			for _, f := range releases {
				f()
			}
		}, nil
}
