package relay

import "github.com/sockrelay/sockrelay/internal/streams"

// stream and diffStreams are the seeded streams the kernel engine's self-test sends, for the tests.
var (
	stream      = streams.Stream
	diffStreams = streams.Diff
)
