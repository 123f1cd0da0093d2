package main

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	authenticationv1 "k8s.io/api/authentication/v1"

	"github.com/keyward/keyward/broker/tokenreview"
	"github.com/keyward/keyward/csi"
	"github.com/keyward/keyward/csi/podevents"
	"github.com/keyward/keyward/csi/tmpfs"
	"github.com/keyward/keyward/internal/fault"
)

// metricSources is what the broker's metrics read at each scrape: functions, so the packages that
// own the numbers need not know Prometheus.
type metricSources struct {
	noswap           bool
	auditHealth      func() error
	auditFailures    func() uint64
	inFlight         func() int64
	waits            func() uint64
	suppressed       func() uint64
	volumes          func() int
	podTokens        func() int
	leases           func() int
	budgetRefusals   func() (pod, namespace uint64)
	policy           func() (generation uint64, hash string)
	registered       func() bool            // nil: registration with kubelet is off
	registerFailures func() uint64          // with registered
	podEvents        func() podevents.Stats // nil: no events
}

// brokerMetrics are the metrics the packages report through their hooks (csi.Observer,
// vault.Options.Observe, a timed tokenreview.Reviewer) as events happen.
type brokerMetrics struct {
	publishes       *prometheus.CounterVec
	publishDuration *prometheus.HistogramVec
	tokenReviews    *prometheus.HistogramVec
	vault           *prometheus.HistogramVec
}

// latencyBuckets span 1 ms to about 16 s: a cached TokenReview to a publish that waited out a slow Vault.
var latencyBuckets = prometheus.ExponentialBuckets(0.001, 2, 15)

func newBrokerMetrics() *brokerMetrics {
	return &brokerMetrics{
		publishes: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "keyward", Subsystem: "broker", Name: "publishes_total",
			Help: "NodePublishVolume calls by result (published, republished, withdrawn, refused, failed) and the gRPC code kubelet got."},
			[]string{"result", "code"}),
		publishDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: "keyward", Subsystem: "broker", Name: "publish_duration_seconds",
			Help: "How long NodePublishVolume calls took (waiting for a slot included), by result.", Buckets: latencyBuckets},
			[]string{"result"}),
		tokenReviews: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: "keyward", Subsystem: "broker", Name: "tokenreview_duration_seconds",
			Help: "How long TokenReview requests to the apiserver took (cached reviews make none), by result (ok, error).", Buckets: latencyBuckets},
			[]string{"result"}),
		vault: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: "keyward", Subsystem: "broker", Name: "vault_request_duration_seconds",
			Help:    "How long requests to Vault took (retries included), by operation (login, read, renew, revoke) and code (OK, PermissionDenied, NotFound, Unavailable, ...).",
			Buckets: latencyBuckets}, []string{"op", "code"}),
	}
}

// Published implements csi.Observer.
func (m *brokerMetrics) Published(p csi.Publish) {
	m.publishes.WithLabelValues(string(p.Result), p.Code).Inc()
	m.publishDuration.WithLabelValues(string(p.Result)).Observe(p.Duration.Seconds())
}

// vaultRequest is vault.Options.Observe.
func (m *brokerMetrics) vaultRequest(op string, took time.Duration, err error) {
	m.vault.WithLabelValues(op, fault.ClassOf(err).String()).Observe(took.Seconds())
}

// reviewer times the TokenReviews r makes.
func (m *brokerMetrics) reviewer(r tokenreview.Reviewer) tokenreview.Reviewer {
	return tokenreview.ReviewerFunc(func(ctx context.Context, review *authenticationv1.TokenReview) (*authenticationv1.TokenReview, error) {
		start := time.Now()
		out, err := r.Create(ctx, review)
		result := "ok"
		if err != nil {
			result = "error"
		}
		m.tokenReviews.WithLabelValues(result).Observe(time.Since(start).Seconds())
		return out, err
	})
}

// policyCollector reports the policy in force: its generation and, as an info metric, its hash.
type policyCollector struct {
	generation, info *prometheus.Desc
	policy           func() (uint64, string)
}

func (c policyCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.generation; ch <- c.info }

func (c policyCollector) Collect(ch chan<- prometheus.Metric) {
	gen, hash := c.policy()
	ch <- prometheus.MustNewConstMetric(c.generation, prometheus.GaugeValue, float64(gen))
	ch <- prometheus.MustNewConstMetric(c.info, prometheus.GaugeValue, 1, hash)
}

// registerMetrics registers keyward-broker's metrics on reg.
func registerMetrics(reg prometheus.Registerer, m *brokerMetrics, s metricSources) error {
	b2f := func(b bool) float64 {
		if b {
			return 1
		}
		return 0
	}
	var cs []prometheus.Collector
	if s.podEvents != nil {
		for result, n := range map[string]func(podevents.Stats) uint64{
			"created": func(s podevents.Stats) uint64 { return s.Created }, "patched": func(s podevents.Stats) uint64 { return s.Patched },
			"failed": func(s podevents.Stats) uint64 { return s.Failed }, "limited": func(s podevents.Stats) uint64 { return s.Limited },
			"dropped": func(s podevents.Stats) uint64 { return s.Dropped },
		} {
			cs = append(cs, prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "keyward", Subsystem: "broker", Name: "pod_events_total",
				Help:        "Events on pods (SecretsRotated, SecretsDenied) by result: created, patched (a repeat), failed (the apiserver refused or did not answer), limited (rate limit), dropped (queue full).",
				ConstLabels: prometheus.Labels{"result": result}},
				func() float64 { return float64(n(s.podEvents())) }))
		}
	}
	if s.leases != nil {
		cs = append(cs, prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "keyward", Subsystem: "broker", Name: "leases",
			Help: "Leases of dynamic credentials (certificates, database credentials) the broker holds for published volumes, replaced ones not yet ended included."},
			func() float64 { return float64(s.leases()) }))
	}
	if s.budgetRefusals != nil {
		for scope, n := range map[string]func() uint64{
			"pod":       func() uint64 { p, _ := s.budgetRefusals(); return p },
			"namespace": func() uint64 { _, ns := s.budgetRefusals(); return ns },
		} {
			cs = append(cs, prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "keyward", Subsystem: "broker", Name: "issue_budget_refusals_total",
				Help:        "Dynamic credentials refused because the pod's or the namespace's issue budget (policy issueBudgets) was spent: answered ResourceExhausted and audited.",
				ConstLabels: prometheus.Labels{"scope": scope}},
				func() float64 { return float64(n()) }))
		}
	}
	cs = append(cs, m.publishes, m.publishDuration, m.tokenReviews, m.vault,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "keyward", Subsystem: "audit", Name: "healthy",
			Help: "1 while audit records are written and synced, 0 while they cannot be (every publish then fails; see the CSI Probe)."},
			func() float64 { return b2f(s.auditHealth() == nil) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "keyward", Subsystem: "audit", Name: "write_failures_total",
			Help: "Audit records that could not be written or synced (each one failed its request)."},
			func() float64 { return float64(s.auditFailures()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "keyward", Subsystem: "broker", Name: "tmpfs_noswap",
			Help: "1 if volumes are mounted with noswap (their pages never reach a swap device), 0 if the kernel lacks it."},
			func() float64 { return b2f(s.noswap) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "keyward", Subsystem: "broker", Name: "swap_active",
			Help: "1 if a swap device is in use on the node (read from /proc/swaps at each scrape)."},
			func() float64 { on, _ := tmpfs.SwapActive(); return b2f(on) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "keyward", Subsystem: "broker", Name: "publishes_in_flight",
			Help: "NodePublishVolume calls being handled (bounded by --max-concurrent-publishes and --max-publish-bytes)."},
			func() float64 { return float64(s.inFlight()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "keyward", Subsystem: "broker", Name: "publish_waits_total",
			Help: "Publishes that waited for a slot under the concurrency bounds."},
			func() float64 { return float64(s.waits()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "keyward", Subsystem: "broker", Name: "refusal_records_suppressed_total",
			Help: "Refusal audit records suppressed by the per-pod rate limit (each next record of the pod counts them)."},
			func() float64 { return float64(s.suppressed()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "keyward", Subsystem: "broker", Name: "volumes",
			Help: "Volumes holding a pod's files, as this process knows them (after a restart, each is counted again at its next republish)."},
			func() float64 { return float64(s.volumes()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "keyward", Subsystem: "broker", Name: "pod_vault_tokens",
			Help: "Vault tokens held for pods (pod mode): each is revoked when the pod's last volume goes."},
			func() float64 { return float64(s.podTokens()) }),
		policyCollector{policy: s.policy,
			generation: prometheus.NewDesc("keyward_broker_policy_generation",
				"Policies put in force since start: 1, then one more per reload (a refused reload keeps the last good policy).", nil, nil),
			info: prometheus.NewDesc("keyward_broker_policy_info", "The policy in force, by its hash (as in the policy_reload audit records); always 1.",
				[]string{"hash"}, nil)},
	)
	if s.registered != nil {
		cs = append(cs,
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "keyward", Subsystem: "broker", Name: "kubelet_registered",
				Help: "1 once kubelet's last word on the plugin registration was a success, 0 before it and after a refusal (/healthz then fails)."},
				func() float64 { return b2f(s.registered()) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "keyward", Subsystem: "broker", Name: "kubelet_registration_failures_total",
				Help: "Plugin registrations kubelet reported as failed (it retries)."},
				func() float64 { return float64(s.registerFailures()) }))
	}
	for _, c := range cs {
		if err := reg.Register(c); err != nil {
			return err
		}
	}
	return nil
}
