package relay

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync/atomic"
)

// Pool is the set of upstream servers tunnels are opened to, chosen round-robin.
type Pool struct {
	addrs []string
	next  atomic.Uint64
}

// NewPool checks that every address is HOST:PORT and returns a pool over them.
func NewPool(addrs []string) (*Pool, error) {
	if len(addrs) == 0 {
		return nil, errors.New("no upstream: give at least one HOST:PORT")
	}
	for _, a := range addrs {
		if err := checkHostPort(a); err != nil {
			return nil, fmt.Errorf("upstream %q: %w", a, err)
		}
	}
	return &Pool{addrs: append([]string(nil), addrs...)}, nil
}

// checkHostPort accepts HOST:PORT with a non-empty host and a port from 1 to 65535.
func checkHostPort(a string) error {
	host, port, err := net.SplitHostPort(a)
	if err != nil {
		return fmt.Errorf("not HOST:PORT (%v); for example 127.0.0.1:9000 or [::1]:9000", err)
	}
	if host == "" {
		return errors.New("empty host; for example 127.0.0.1:9000")
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("port %q is not a number from 1 to 65535", port)
	}
	return nil
}

// Next returns the upstream for the next tunnel or request.
func (p *Pool) Next() string {
	return p.addrs[(p.next.Add(1)-1)%uint64(len(p.addrs))]
}

// Addrs returns the pool's upstream addresses.
func (p *Pool) Addrs() []string { return append([]string(nil), p.addrs...) }
