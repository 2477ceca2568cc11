package upstream

import (
	"cmp"
	"math"
	"math/rand/v2"
	"slices"
)

// The algorithms below choose one server from a non-empty list of usable candidates. They run under the
// pool's lock, so they may keep state in the servers (round-robin's running weights) and use its
// random source. Weights are effective weights (slow start included), scaled by weightScale.

// smoothRoundRobin is nginx's smooth weighted round-robin: every candidate's running weight grows by
// its weight, the largest is chosen and set back by the total. Over sum(weights) picks each server is
// chosen exactly weight times, spread out (5:1:1 gives a a b a c a a) rather than in a burst of five.
func smoothRoundRobin(cands []candidate) *Server {
	var total int64
	var best *Server
	for _, c := range cands {
		c.s.current += c.w
		total += c.w
		if best == nil || c.s.current > best.current {
			best = c.s
		}
	}
	best.current -= total
	return best
}

// leastTunnels chooses the candidate with the fewest live tunnels per unit of weight once this one is
// added, (live+1)/weight, which keeps live counts proportional to weights; with nothing live it
// prefers the heaviest server rather than treating a weight-1 and a weight-1000 server alike. Ties go
// to a random one of the tied, in proportion to weight, so that an idle pool still spreads by weight.
func leastTunnels(cands []candidate, rng *rand.Rand) *Server {
	best := 0
	tiedWeight := cands[0].w
	for i := 1; i < len(cands); i++ {
		c, b := cands[i], cands[best]
		switch l, r := (c.live+1)*b.w, (b.live+1)*c.w; {
		case l < r:
			best, tiedWeight = i, c.w
		case l == r:
			// Weighted reservoir sampling: each tied candidate ends up chosen with probability
			// weight / sum of tied weights.
			tiedWeight += c.w
			if rng.Int64N(tiedWeight) < c.w {
				best = i
			}
		}
	}
	return cands[best].s
}

// randomTwo is the power of two random choices: sample two distinct candidates in proportion to weight
// and take the one with fewer live tunnels per unit of weight (the first sampled on a tie). It never
// chooses the most loaded of three or more, and needs no global minimum.
func randomTwo(cands []candidate, rng *rand.Rand) *Server {
	var total int64
	for _, c := range cands {
		total += c.w
	}
	i := sampleWeighted(cands, rng.Int64N(total), -1)
	j := sampleWeighted(cands, rng.Int64N(total-cands[i].w), i)
	a, b := cands[i], cands[j]
	if (b.live+1)*a.w < (a.live+1)*b.w {
		return b.s
	}
	return a.s
}

// sampleWeighted returns the index that r, in [0, sum of weights except skip's), falls on.
func sampleWeighted(cands []candidate, r int64, skip int) int {
	last := -1
	for i, c := range cands {
		if i == skip {
			continue
		}
		if r < c.w {
			return i
		}
		r -= c.w
		last = i
	}
	return last
}

// boundedHash is weighted rendezvous hashing with bounded loads. Every candidate gets a score from
// hash(key, server), weighted so that a server's share of keys is its share of weight; the key's
// servers in score order are its preference list, the same on every pick, and adding or removing one
// server moves only the keys whose first choice it is or was (1/n of them).
//
// Bounded loads (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded Loads", 2017): a
// server takes the tunnel only while its live tunnels stay within loadFactor times its weighted share
// of all live tunnels (this one included); otherwise the key goes down its list. A hot key therefore
// spills over to other servers instead of piling up on one, and no server ever passes
// ceil(loadFactor × its share). Some server is always under its bound, since the bounds sum to at
// least loadFactor × (live+1).
func boundedHash(cands []candidate, key string, loadFactor float64) *Server {
	kh := hashString(key)
	var total, live int64
	for i := range cands {
		c := &cands[i]
		// Weighted rendezvous: the largest weight / -ln(u), u uniform in (0,1) from hash(key, server),
		// wins; the chance of winning is exactly weight / total weight.
		u := (float64(mix64(kh^c.s.seed)>>11) + 0.5) / (1 << 53)
		c.score = float64(c.w) / -math.Log(u)
		total += c.w
		live += c.live
	}
	slices.SortFunc(cands, func(a, b candidate) int {
		if c := cmp.Compare(b.score, a.score); c != 0 {
			return c
		}
		return cmp.Compare(a.s.seed, b.s.seed)
	})
	for _, c := range cands {
		bound := math.Ceil(loadFactor * float64(live+1) * float64(c.w) / float64(total))
		if float64(c.live+1) <= bound {
			return c.s
		}
	}
	return cands[0].s // not reached: the bounds sum past live+1
}

// hashString is 64-bit FNV-1a, finished with mix64 so that keys differing in one byte land far apart.
func hashString(s string) uint64 {
	h := uint64(14695981039346656037)
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= 1099511628211
	}
	return mix64(h)
}

// mix64 is splitmix64's finalizer, a bijection that spreads every input bit over the output.
func mix64(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}
