package main

import (
	"bytes"
	"sync/atomic"
	"testing"
	"time"
)

func TestParseWarmups(t *testing.T) {
	cpu, _, err := parseCPU([]string{"-url", "ws://t/", "-warmup", "3s"}, &bytes.Buffer{})
	if err != nil || cpu.warmup != 3*time.Second {
		t.Errorf("cpu -warmup 3s: %v, %v", cpu, err)
	}
	tp, _, err := parseThroughput([]string{"-url", "ws://t/sink", "-warmup", "2s"}, &bytes.Buffer{})
	if err != nil || tp.warmup != 2*time.Second {
		t.Errorf("throughput -warmup 2s: %v, %v", tp, err)
	}
}

func TestCountFrom(t *testing.T) {
	var n atomic.Int64
	n.Store(100)
	if got, secs := newCountFrom(&n, 0).since(250, 2*time.Second); got != 250 || secs != 2 {
		t.Errorf("no warm-up: %d in %v s, want all 250 in 2 s", got, secs)
	}
	c := newCountFrom(&n, time.Hour)
	defer c.stop()
	if got, secs := c.since(250, 2*time.Second); got != 250 || secs != 2 {
		t.Errorf("a run that ended before its warm-up: %d in %v s, want all 250 in 2 s", got, secs)
	}
	c = newCountFrom(&n, time.Millisecond)
	<-c.done
	n.Store(400)
	got, secs := c.since(n.Load(), 10*time.Second)
	if got != 300 || secs >= 10 || secs < 9 {
		t.Errorf("after the warm-up: %d in %v s, want 300 (moved after it) in less than 10 s", got, secs)
	}
}
