package main

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	"github.com/keyward/keyward/csi"
	"github.com/keyward/keyward/csi/registration"
)

// get answers path from the checks' handlers: its status and body.
func get(c checks, path string) (int, string) {
	mux := http.NewServeMux()
	c.handle(mux)
	rec := httptest.NewRecorder()
	mux.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
	return rec.Code, rec.Body.String()
}

// /healthz is the CSI Probe's condition (namespace informer synced, audit records written) plus
// kubelet not having refused the registration; kubelet's refusal, played here against the real
// registration socket, shows in /healthz and in the metrics, and its next success clears both.
func TestHealthzFollowsReadinessAndRegistration(t *testing.T) {
	// The handlers run in this goroutine (httptest), so plain variables do.
	synced, auditErr := false, error(nil)
	dir := t.TempDir()
	reg, err := registration.Start(registration.Options{Dir: dir, Driver: csi.DriverName, Endpoint: "/var/lib/kubelet/plugins/secrets.keyward.dev/csi.sock",
		Log: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Stop()
	c := checks{synced: func() bool { return synced }, audit: func() error { return auditErr }, registration: reg.Health}
	promReg := prometheus.NewRegistry()
	s := (&sourceStub{}).sources()
	s.registered, s.registerFailures = reg.Registered, reg.Failures
	if err := registerMetrics(promReg, newBrokerMetrics(), s); err != nil {
		t.Fatal(err)
	}
	expect := func(step string, code int, body string) {
		t.Helper()
		got, b := get(c, "/healthz")
		if got != code || !strings.Contains(b, body) {
			t.Fatalf("%s: /healthz %d %q, want %d %q", step, got, b, code, body)
		}
	}
	expect("informer not synced", http.StatusServiceUnavailable, "namespace informer not synced")
	synced = true
	expect("ready", http.StatusOK, "ok")
	auditErr = errors.New("audit records cannot be synced: no space left on device")
	expect("audit failing", http.StatusServiceUnavailable, "no space left on device")
	if c.ready() == nil {
		t.Fatal("the CSI Probe's condition ignores the audit log")
	}
	auditErr = nil

	conn, err := grpc.NewClient("unix://"+filepath.Join(dir, "secrets.keyward.dev-reg.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	kubelet := registerapi.NewRegistrationClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := kubelet.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{Error: "CSI driver name mismatch"}); err != nil {
		t.Fatal(err)
	}
	expect("registration refused", http.StatusServiceUnavailable, "CSI driver name mismatch")
	if c.ready() != nil {
		t.Fatal("the CSI Probe depends on kubelet's registration (its condition is the broker's own)")
	}
	wantLines(t, scrapeRegistry(t, promReg), "keyward_broker_kubelet_registered 0", "keyward_broker_kubelet_registration_failures_total 1")
	if _, err := kubelet.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Fatal(err)
	}
	expect("registered", http.StatusOK, "ok")
	wantLines(t, scrapeRegistry(t, promReg), "keyward_broker_kubelet_registered 1", "keyward_broker_kubelet_registration_failures_total 1")
}

// /livez fails when a socket kubelet calls stops accepting connections (its file removed).
func TestLivezChecksTheSockets(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "csi.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c := checks{synced: func() bool { return false }, audit: func() error { return nil }, sockets: []string{sock}}
	if code, body := get(c, "/livez"); code != http.StatusOK {
		t.Fatalf("/livez with the socket served: %d %q (readiness must not matter)", code, body)
	}
	os.Remove(sock)
	if code, body := get(c, "/livez"); code != http.StatusServiceUnavailable || !strings.Contains(body, sock) {
		t.Fatalf("/livez with the socket gone: %d %q", code, body)
	}
}
