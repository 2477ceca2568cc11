package upstream

import (
	"bufio"
	"fmt"
	"io"
	"math"
	"net/http"
)

// MaxInterimResponses bounds the interim responses a server may send before its answer to one request.
const MaxInterimResponses = 8

// ReadAnswer reads a server's answer to req from conn. Interim responses (1xx other than 101: 100
// Continue, 103 Early Hints) may come before it (RFC 9110 section 15.2); a WebSocket client has no use for
// them, so they are skipped, at most MaxInterimResponses of them. The heads, interim ones included, may
// take maxHeadBytes together: a server that never ends its head costs that much, not all it can send.
// ReadAnswer returns the answer and the reader that holds what came after its head (the answer's body,
// or a tunnel's first bytes); past the head, it reads conn without limit.
func ReadAnswer(conn io.Reader, req *http.Request, maxHeadBytes int) (*http.Response, *bufio.Reader, error) {
	br := new(bufio.Reader) // Reset gives it the default size, as bufio.NewReader does
	resp, err := ReadAnswerWith(br, conn, req, maxHeadBytes)
	if err != nil {
		return nil, nil, err
	}
	return resp, br, nil
}

// ReadAnswerWith is ReadAnswer through a reader the caller gives (one it reuses for many answers): br is
// reset to read conn, and on success holds what came after the answer's head.
func ReadAnswerWith(br *bufio.Reader, conn io.Reader, req *http.Request, maxHeadBytes int) (*http.Response, error) {
	head := &io.LimitedReader{R: conn, N: int64(maxHeadBytes)}
	br.Reset(head)
	for interim := 0; ; interim++ {
		resp, err := http.ReadResponse(br, req)
		if err != nil {
			if head.N <= 0 {
				return nil, fmt.Errorf("response head larger than %d bytes", maxHeadBytes)
			}
			return nil, err
		}
		if resp.StatusCode < 100 || resp.StatusCode >= 200 || resp.StatusCode == http.StatusSwitchingProtocols {
			head.N = math.MaxInt64
			return resp, nil
		}
		if interim == MaxInterimResponses {
			return nil, fmt.Errorf("more than %d interim responses", MaxInterimResponses)
		}
	}
}
