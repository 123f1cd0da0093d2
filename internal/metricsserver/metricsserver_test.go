package metricsserver

import (
	"io"
	"net/http"
	"testing"
)

func TestCheckLoopback(t *testing.T) {
	for addr, ok := range map[string]bool{"127.0.0.1:9465": true, "[::1]:9465": true, "localhost:1": true,
		"0.0.0.0:9465": false, "10.0.0.1:9465": false, "9465": false, ":9465": false} {
		if err := CheckLoopback("--metrics-address", addr); (err == nil) != ok {
			t.Errorf("%s: %v", addr, err)
		}
	}
}

func TestServe(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "m 1\n") })
	srv, err := Serve("127.0.0.1:0", mux)
	if err != nil {
		t.Fatal(err)
	}
	srv.Close()
	if _, err := Serve("256.0.0.1:1", mux); err == nil {
		t.Fatal("listened on an impossible address")
	}
}
