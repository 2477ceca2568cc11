//go:build race

package relay

// raceEnabled: under the race detector sync.Pool drops what it is given at random, and allocation
// figures are not the relay's.
const raceEnabled = true
