package sockmap

import (
	"io"
	"sync"
	"testing"
	"time"

	"github.com/sockrelay/sockrelay/datapath"
)

// recordingEngine is a fallback engine that notes each pair it is handed and carries it on the Copier.
type recordingEngine struct {
	mu      sync.Mutex
	carried []*datapath.Pair
}

func (e *recordingEngine) Kind() datapath.Kind                 { return datapath.Copy }
func (e *recordingEngine) Accepts(a, b datapath.Endpoint) bool { return true }
func (e *recordingEngine) Close() error                        { return nil }

func (e *recordingEngine) Carry(p *datapath.Pair) {
	e.mu.Lock()
	e.carried = append(e.carried, p)
	e.mu.Unlock()
	datapath.Copier{}.Carry(p)
}

func (e *recordingEngine) took(p *datapath.Pair) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, c := range e.carried {
		if c == p {
			return true
		}
	}
	return false
}

// A pair the kernel cannot take runs on the fallback engine the relay set (its event loops, whose counters
// auto's policy reads), not on goroutines for good.
func TestFallbackEngineCarriesRefusedPair(t *testing.T) {
	k, _ := newTestEngine(t)
	rec := &recordingEngine{}
	k.SetFallback(rec)
	client, relayClient, relayUp, upstream := tunnelEnds(t)
	if _, err := client.Write([]byte("bye")); err != nil {
		t.Fatal(err)
	}
	if err := client.CloseWrite(); err != nil { // a source that sent its FIN cannot enter a sockhash
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond)
	p := datapath.NewPair(datapath.Sockmap, datapath.Endpoint{Conn: relayClient}, datapath.Endpoint{Conn: relayUp}, nil)
	t.Cleanup(func() { p.End(datapath.ReasonShutdown, true) })
	k.Carry(p)
	if !rec.took(p) || p.Kind() != datapath.Copy {
		t.Fatalf("the refused pair runs on %s, taken by the set fallback: %v; want the fallback engine", p.Kind(), rec.took(p))
	}
	_ = upstream.SetReadDeadline(time.Now().Add(5 * time.Second))
	if got, err := io.ReadAll(upstream); err != nil || string(got) != "bye" {
		t.Errorf("the upstream read %q, then %v; want \"bye\", then EOF", got, err)
	}
}
