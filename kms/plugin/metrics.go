package plugin

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"

	"github.com/keyward/keyward/kms"
)

// Metrics are keyward-kms's Prometheus metrics.
type Metrics struct {
	ops     *prometheus.CounterVec
	latency *prometheus.HistogramVec
	healthy prometheus.Gauge
}

// NewMetrics registers the metrics on reg. The key ID is exposed only as a hash, as kube-apiserver does.
func NewMetrics(reg prometheus.Registerer, w kms.KeyWrapper) (*Metrics, error) {
	m := &Metrics{
		ops: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "keyward", Subsystem: "kms", Name: "operations_total",
			Help: "KMS operations by method (kms_encrypt, kms_decrypt) and gRPC result code.",
		}, []string{"method", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "keyward", Subsystem: "kms", Name: "operation_duration_seconds",
			Help:    "KMS operation latency by method, including the HSM call and the audit record.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}, []string{"method"}),
		healthy: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "keyward", Subsystem: "kms", Name: "healthy",
			Help: "1 if the last HSM encrypt+decrypt round trip succeeded, else 0.",
		}),
	}
	cs := []prometheus.Collector{m.ops, m.latency, m.healthy, keyIDCollector{w: w}}
	if p, ok := w.(kms.PoolReporter); ok {
		cs = append(cs,
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "keyward", Subsystem: "kms", Name: "hsm_sessions_in_use",
				Help: "PKCS#11 sessions in use."}, func() float64 { u, _ := p.PoolStats(); return float64(u) }),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "keyward", Subsystem: "kms", Name: "hsm_sessions_idle",
				Help: "PKCS#11 sessions idle in the pool."}, func() float64 { _, i := p.PoolStats(); return float64(i) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "keyward", Subsystem: "kms", Name: "hsm_recoveries_total",
				Help: "Times the PKCS#11 session pool was rebuilt after the HSM was lost."}, func() float64 { return float64(p.Recoveries()) }),
		)
	}
	for _, c := range cs {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

func (m *Metrics) observe(method string, code codes.Code, d time.Duration) {
	m.ops.WithLabelValues(method, code.String()).Inc()
	m.latency.WithLabelValues(method).Observe(d.Seconds())
}

func (m *Metrics) setHealthy(ok bool) {
	if ok {
		m.healthy.Set(1)
	} else {
		m.healthy.Set(0)
	}
}

// keyIDCollector exposes keyward_kms_key_id_hash_info{key_id_hash="..."} 1 for the current key.
type keyIDCollector struct{ w kms.KeyWrapper }

var keyIDDesc = prometheus.NewDesc("keyward_kms_key_id_hash_info",
	"The SHA-256 (first 16 hex digits) of the key ID that encrypts now.", []string{"key_id_hash"}, nil)

func (c keyIDCollector) Describe(ch chan<- *prometheus.Desc) { ch <- keyIDDesc }

func (c keyIDCollector) Collect(ch chan<- prometheus.Metric) {
	id, err := c.w.KeyID(context.Background())
	if err != nil {
		return
	}
	ch <- prometheus.MustNewConstMetric(keyIDDesc, prometheus.GaugeValue, 1, KeyIDHash(id))
}

// KeyIDHash is how a key ID appears in metrics and logs meant for broad audiences.
func KeyIDHash(id string) string {
	sum := sha256.Sum256([]byte(id))
	return hex.EncodeToString(sum[:8])
}
