package tlsconf

import (
	"context"
	"os"
	"slices"
	"time"
)

// fileStamp is what WatchFiles compares to notice a changed file.
type fileStamp struct {
	path    string
	modTime int64 // UnixNano
	size    int64
	missing bool // stat failed (mid-rotation, removed)
}

// stampFiles stats every certificate and key file. os.Stat follows symbolic
// links, so a Kubernetes secret volume, which swaps a "..data" link to
// update, shows up as a change of the files behind the links.
func stampFiles(files []CertFiles) []fileStamp {
	var stamps []fileStamp
	for _, f := range files {
		for _, path := range []string{f.Cert, f.Key} {
			if path == "" {
				continue
			}
			st := fileStamp{path: path}
			if fi, err := os.Stat(path); err != nil {
				st.missing = true
			} else {
				st.modTime, st.size = fi.ModTime().UnixNano(), fi.Size()
			}
			stamps = append(stamps, st)
		}
	}
	return stamps
}

// WatchFiles polls the certificate and key files every interval and calls
// Reload when any file's modification time or size changed, logging the
// result: one info line on success (from Reload), one error line naming
// the file on failure, after which the old certificates stay in use.
// Polling rather than inotify keeps it portable and correct across renames
// and symbolic-link swaps; certificate changes are rare, so an interval of
// seconds costs nothing.
//
// A change is acted on once: when a renewal writes the certificate and the
// key in two steps and the first reload sees a mismatched pair, the second
// write is a further change and triggers the reload that succeeds.
//
// WatchFiles blocks until ctx is done; run it in its own goroutine.
func (s *Server) WatchFiles(ctx context.Context, interval time.Duration) {
	// The stamps of the loaded set were taken before its files were read,
	// so a change made while they were being read is seen on the first tick.
	last := s.set.Load().stamps
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		now := stampFiles(*s.files.Load())
		if slices.Equal(now, last) {
			continue
		}
		last = now
		if err := s.Reload(); err != nil {
			s.log.Error("tls certificate files changed but could not be loaded; still serving the previous certificates", "err", err)
		}
	}
}
