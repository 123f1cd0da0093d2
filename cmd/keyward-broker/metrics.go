package main

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/csi"
	"github.com/keyward/keyward/csi/tmpfs"
)

// registerMetrics registers keyward-broker's metrics on reg.
func registerMetrics(reg prometheus.Registerer, node *csi.Server, svc *broker.Service, noswap bool, auditHealth func() error) error {
	b2f := func(b bool) float64 {
		if b {
			return 1
		}
		return 0
	}
	for _, c := range []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "keyward", Subsystem: "audit", Name: "healthy",
			Help: "1 while audit records are written and synced, 0 while they cannot be (every publish then fails; see the CSI Probe)."},
			func() float64 { return b2f(auditHealth() == nil) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "keyward", Subsystem: "broker", Name: "tmpfs_noswap",
			Help: "1 if volumes are mounted with noswap (their pages never reach a swap device), 0 if the kernel lacks it."},
			func() float64 { return b2f(noswap) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "keyward", Subsystem: "broker", Name: "swap_active",
			Help: "1 if a swap device is in use on the node (read from /proc/swaps at each scrape)."},
			func() float64 { on, _ := tmpfs.SwapActive(); return b2f(on) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "keyward", Subsystem: "broker", Name: "publishes_in_flight",
			Help: "NodePublishVolume calls being handled (bounded by --max-concurrent-publishes and --max-publish-bytes)."},
			func() float64 { return float64(node.Limiter().InFlight()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "keyward", Subsystem: "broker", Name: "publish_waits_total",
			Help: "Publishes that waited for a slot under the concurrency bounds."},
			func() float64 { return float64(node.Limiter().Waits()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "keyward", Subsystem: "broker", Name: "refusal_records_suppressed_total",
			Help: "Refusal audit records suppressed by the per-pod rate limit (each next record of the pod counts them)."},
			func() float64 { return float64(svc.SuppressedRefusals()) }),
	} {
		if err := reg.Register(c); err != nil {
			return err
		}
	}
	return nil
}
