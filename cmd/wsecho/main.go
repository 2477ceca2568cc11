// Command wsecho is a WebSocket echo server (internal/wsecho, on gorilla/websocket): the upstream the
// README's first command puts behind sockrelay, and the one make bench measures through.
package main

import (
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/sockrelay/sockrelay/internal/wsecho"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:9000", "`ADDR` to listen on")
	name := flag.String("name", "", "`NAME` this server gives on /whoami (default the address it listens on)")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintf(os.Stderr, "wsecho: --listen: %v\n", err)
		os.Exit(2)
	}
	log.Info("wsecho listening", "listen", ln.Addr().String())
	if *name == "" {
		*name = ln.Addr().String()
	}
	srv := &http.Server{Handler: wsecho.NamedHandler(*name, log), ReadHeaderTimeout: 10 * time.Second}
	if err := srv.Serve(ln); err != nil {
		log.Error("wsecho stopped", "err", err)
		os.Exit(1)
	}
}
