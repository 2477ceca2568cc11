//go:build race

package main

// raceEnabled: the race detector slows the relay's processes down several times.
const raceEnabled = true
