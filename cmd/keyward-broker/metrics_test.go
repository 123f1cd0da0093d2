package main

import (
	"context"
	"errors"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	authenticationv1 "k8s.io/api/authentication/v1"

	"github.com/keyward/keyward/broker/tokenreview"
	"github.com/keyward/keyward/csi"
	"github.com/keyward/keyward/csi/podevents"
	"github.com/keyward/keyward/internal/fault"
)

// scrape returns the registry's exposition.
func scrapeRegistry(t *testing.T, reg *prometheus.Registry) string {
	t.Helper()
	rec := httptest.NewRecorder()
	promhttp.HandlerFor(reg, promhttp.HandlerOpts{}).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	return rec.Body.String()
}

// wantLines fails unless every line is in the exposition.
func wantLines(t *testing.T, got string, lines ...string) {
	t.Helper()
	for _, l := range lines {
		if !strings.Contains(got, "\n"+l+"\n") {
			t.Errorf("metrics lack %q", l)
		}
	}
	if t.Failed() {
		t.Logf("metrics:\n%s", got)
	}
}

// sourceStub holds numbers the test moves; the metrics must follow.
type sourceStub struct {
	auditErr         atomic.Value
	auditFailures    atomic.Uint64
	volumes, tokens  atomic.Int64
	leases           atomic.Int64
	podRefusals      atomic.Uint64
	nsRefusals       atomic.Uint64
	generation       atomic.Uint64
	registered       atomic.Bool
	registerFailures atomic.Uint64
}

func (s *sourceStub) sources() metricSources {
	return metricSources{noswap: true,
		auditHealth:   func() error { err, _ := s.auditErr.Load().(error); return err },
		auditFailures: s.auditFailures.Load, inFlight: func() int64 { return 0 }, waits: func() uint64 { return 0 },
		suppressed: func() uint64 { return 0 }, volumes: func() int { return int(s.volumes.Load()) }, podTokens: func() int { return int(s.tokens.Load()) },
		policy: func() (uint64, string) {
			g := s.generation.Load()
			return g, map[uint64]string{1: "aaaa", 2: "bbbb"}[g]
		},
		registered: s.registered.Load, registerFailures: s.registerFailures.Load,
		leases:         func() int { return int(s.leases.Load()) },
		budgetRefusals: func() (uint64, uint64) { return s.podRefusals.Load(), s.nsRefusals.Load() },
		podEvents:      func() podevents.Stats { return podevents.Stats{Created: 3, Patched: 2, Limited: 1} }}
}

// Every metric operators rely on moves with what it counts: publishes by result and code with their
// latency, TokenReview and Vault latencies, live volumes and pod tokens, audit write failures, the
// policy's generation and hash, and kubelet's registration.
func TestMetricsFollowTheBroker(t *testing.T) {
	m := newBrokerMetrics()
	st := &sourceStub{}
	st.generation.Store(1)
	reg := prometheus.NewRegistry()
	if err := registerMetrics(reg, m, st.sources()); err != nil {
		t.Fatal(err)
	}
	wantLines(t, scrapeRegistry(t, reg), "keyward_broker_volumes 0", "keyward_broker_pod_vault_tokens 0",
		"keyward_audit_write_failures_total 0", "keyward_audit_healthy 1", "keyward_broker_policy_generation 1",
		`keyward_broker_policy_info{hash="aaaa"} 1`, "keyward_broker_kubelet_registered 0",
		"keyward_broker_kubelet_registration_failures_total 0", "keyward_broker_tmpfs_noswap 1",
		`keyward_broker_pod_events_total{result="created"} 3`, `keyward_broker_pod_events_total{result="patched"} 2`,
		`keyward_broker_pod_events_total{result="limited"} 1`, `keyward_broker_pod_events_total{result="dropped"} 0`,
		"keyward_broker_leases 0", `keyward_broker_issue_budget_refusals_total{scope="pod"} 0`,
		`keyward_broker_issue_budget_refusals_total{scope="namespace"} 0`)

	// The hooks the packages call.
	m.Published(csi.Publish{Result: csi.ResultPublished, Code: "OK", Duration: 30 * time.Millisecond})
	m.Published(csi.Publish{Result: csi.ResultRefused, Code: "PermissionDenied", Duration: 2 * time.Millisecond})
	m.Published(csi.Publish{Result: csi.ResultRefused, Code: "PermissionDenied", Duration: 2 * time.Millisecond})
	review := m.reviewer(tokenreview.ReviewerFunc(func(_ context.Context, r *authenticationv1.TokenReview) (*authenticationv1.TokenReview, error) {
		if r.Spec.Token == "bad" {
			return nil, errors.New("apiserver down")
		}
		return r, nil
	}))
	review.Create(context.Background(), &authenticationv1.TokenReview{})
	review.Create(context.Background(), &authenticationv1.TokenReview{Spec: authenticationv1.TokenReviewSpec{Token: "bad"}})
	m.vaultRequest("login", 5*time.Millisecond, nil)
	m.vaultRequest("read", 3*time.Second, errors.Join(errors.New("503"), fault.ErrUnavailable))

	// The numbers the metrics read.
	st.volumes.Store(3)
	st.tokens.Store(2)
	st.auditFailures.Store(4)
	st.auditErr.Store(errors.New("disk full"))
	st.generation.Store(2)
	st.registered.Store(true)
	st.registerFailures.Store(1)
	st.leases.Store(7)
	st.podRefusals.Store(2)
	st.nsRefusals.Store(5)

	got := scrapeRegistry(t, reg)
	wantLines(t, got,
		`keyward_broker_publishes_total{code="OK",result="published"} 1`,
		`keyward_broker_publishes_total{code="PermissionDenied",result="refused"} 2`,
		`keyward_broker_publish_duration_seconds_count{result="published"} 1`,
		`keyward_broker_publish_duration_seconds_bucket{result="published",le="0.032"} 1`,
		`keyward_broker_publish_duration_seconds_bucket{result="published",le="0.016"} 0`,
		`keyward_broker_publish_duration_seconds_count{result="refused"} 2`,
		`keyward_broker_tokenreview_duration_seconds_count{result="ok"} 1`,
		`keyward_broker_tokenreview_duration_seconds_count{result="error"} 1`,
		`keyward_broker_vault_request_duration_seconds_count{code="OK",op="login"} 1`,
		`keyward_broker_vault_request_duration_seconds_count{code="Unavailable",op="read"} 1`,
		"keyward_broker_volumes 3", "keyward_broker_pod_vault_tokens 2", "keyward_audit_write_failures_total 4",
		"keyward_audit_healthy 0", "keyward_broker_policy_generation 2", `keyward_broker_policy_info{hash="bbbb"} 1`,
		"keyward_broker_kubelet_registered 1", "keyward_broker_kubelet_registration_failures_total 1",
		"keyward_broker_leases 7", `keyward_broker_issue_budget_refusals_total{scope="pod"} 2`,
		`keyward_broker_issue_budget_refusals_total{scope="namespace"} 5`)
	if strings.Contains(got, `hash="aaaa"`) {
		t.Error("the replaced policy's hash is still reported")
	}
}

// Without registration with kubelet, its metrics are absent rather than a misleading 0.
func TestRegistrationMetricsOnlyWhenRegistering(t *testing.T) {
	st := &sourceStub{}
	s := st.sources()
	s.registered, s.registerFailures = nil, nil
	reg := prometheus.NewRegistry()
	if err := registerMetrics(reg, newBrokerMetrics(), s); err != nil {
		t.Fatal(err)
	}
	if got := scrapeRegistry(t, reg); strings.Contains(got, "kubelet_regist") {
		t.Fatalf("registration metrics while not registering:\n%s", got)
	}
}
