package metricsserver

import (
	"fmt"
	"net"
	"net/http"
	"time"
)

// CheckLoopback reports an error unless addr ("host:port") is on a loopback address; flag names the
// flag it came from.
func CheckLoopback(flag, addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%s: %w", flag, err)
	}
	if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return fmt.Errorf("%s %s is not a loopback address", flag, addr)
	}
	return nil
}

// Serve listens on addr and serves h in the background; Close the server to stop.
func Serve(addr string, h http.Handler) (*http.Server, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(l)
	return srv, nil
}

// HandleHealth serves /healthz and /livez on mux: 200 "ok", or 503 and why not. Both daemons'
// probes answer this way.
func HandleHealth(mux *http.ServeMux, healthz, livez func() error) {
	check := func(f func() error) http.HandlerFunc {
		return func(w http.ResponseWriter, _ *http.Request) {
			if err := f(); err != nil {
				http.Error(w, err.Error(), http.StatusServiceUnavailable)
				return
			}
			fmt.Fprintln(w, "ok")
		}
	}
	mux.Handle("/healthz", check(healthz))
	mux.Handle("/livez", check(livez))
}
