package plugin

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"k8s.io/kms/pkg/service"

	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/internal/fault"
	"github.com/keyward/keyward/internal/grpcserver"
	"github.com/keyward/keyward/kms"
)

// AnnotationKey is the one annotation keyward-kms attaches to every ciphertext. kube-apiserver only
// accepts DNS-subdomain keys without '/' (any other key keeps it from ever becoming ready).
const AnnotationKey = "kms.keyward.dev"

// annotationValue names the ciphertext format, so tools reading etcd can tell who wrapped a DEK seed.
var annotationValue = []byte("aes-256-gcm;v1")

// ServiceOptions configure NewService.
type ServiceOptions struct {
	Wrapper kms.KeyWrapper
	// Auditor receives one record per Encrypt and Decrypt. Required: audit is not optional.
	Auditor audit.Auditor
	// AuditHealth, if set, is the audit stream's health: while it fails, Status is not "ok" (every
	// call would be refused for want of its record).
	AuditHealth func() error
	Logger      *zap.Logger
	// HealthInterval between background round trips (default 10s). Status reports "ok" only if the
	// last round trip succeeded and is at most 3 intervals old.
	HealthInterval time.Duration
	// Metrics, if set, records every operation.
	Metrics *Metrics
}

// Service is keyward-kms's core: the KMS v2 operations over a KeyWrapper, with cached health and
// audit. It returns errors wrapping internal/fault's sentinels; the gRPC adapter turns them into codes.
type Service struct {
	w        kms.KeyWrapper
	audit    audit.Auditor
	auditOK  func() error
	log      *zap.Logger
	interval time.Duration
	metrics  *Metrics
	health   atomic.Pointer[healthState]
	kick     chan struct{}
	loopBeat atomic.Int64 // unix nanos of the last health attempt (for liveness)
	// outstanding is when the round trip still running started (unix nanos), or 0.
	outstanding atomic.Int64
	refusedMu   sync.Mutex
	refused     map[string]bool // key refusals already audited
}

type healthState struct {
	ok     bool
	reason string
	at     time.Time
}

var _ service.Service = (*Service)(nil)

// NewService validates the options. Call Run to start the health loop.
func NewService(opts ServiceOptions) (*Service, error) {
	if opts.Wrapper == nil || opts.Auditor == nil || opts.Logger == nil {
		return nil, errors.New("kms: Wrapper, Auditor and Logger are required")
	}
	if opts.HealthInterval == 0 {
		opts.HealthInterval = 10 * time.Second
	}
	if opts.AuditHealth == nil {
		opts.AuditHealth = func() error { return nil }
	}
	s := &Service{w: opts.Wrapper, audit: opts.Auditor, auditOK: opts.AuditHealth, log: opts.Logger, interval: opts.HealthInterval,
		metrics: opts.Metrics, kick: make(chan struct{}, 1)}
	s.health.Store(&healthState{reason: "no health check has run yet"})
	return s, nil
}

// Run checks health now and then every interval (or sooner when a call finds the HSM unavailable)
// until ctx ends.
func (s *Service) Run(ctx context.Context) {
	t := time.NewTicker(s.interval)
	defer t.Stop()
	for {
		s.CheckHealth(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-s.kick:
		}
	}
}

// CheckHealth runs one round trip now and caches the result.
//
// It waits at most one interval: a round trip that has not returned by then (a PKCS#11 call that
// hangs and ignores its context) is reported as such, no other round trip starts until it returns,
// and Livez fails once it has been out for 3 intervals. Each check also audits key objects the
// wrapper newly refuses.
func (s *Service) CheckHealth(ctx context.Context) error {
	s.loopBeat.Store(time.Now().UnixNano())
	s.auditRefusals(ctx)
	err := s.roundTrip(ctx)
	prev := s.health.Load()
	st := &healthState{ok: err == nil, at: time.Now()}
	if err != nil {
		st.reason = fault.Truncate(err.Error(), maxReason)
	}
	s.health.Store(st)
	if prev.ok != st.ok {
		if st.ok {
			s.log.Info("healthy: HSM round trip succeeded")
		} else {
			s.log.Warn("unhealthy", zap.String("reason", st.reason))
		}
	}
	if s.metrics != nil {
		s.metrics.setHealthy(st.ok)
	}
	return err
}

// Healthz returns nil when the audit stream is being written and the last round trip succeeded
// recently, else the reason.
func (s *Service) Healthz() error {
	if err := s.auditOK(); err != nil {
		return err
	}
	st := s.health.Load()
	switch {
	case !st.ok:
		return errors.New(st.reason)
	case time.Since(st.at) > 3*s.interval:
		return fmt.Errorf("last successful HSM round trip was %s ago", time.Since(st.at).Round(time.Second))
	}
	return nil
}

// roundTrip runs the wrapper's Health, waiting at most one interval for it.
func (s *Service) roundTrip(ctx context.Context) error {
	start := time.Now()
	if !s.outstanding.CompareAndSwap(0, start.UnixNano()) {
		since := time.Unix(0, s.outstanding.Load())
		return fmt.Errorf("the HSM health round trip started %s ago has not returned: %w", time.Since(since).Round(time.Millisecond), fault.ErrUnavailable)
	}
	cctx, cancel := context.WithTimeout(ctx, s.interval)
	done := make(chan error, 1)
	go func() {
		defer cancel()
		err := s.w.Health(cctx)
		s.outstanding.Store(0)
		done <- err
	}()
	select {
	case err := <-done:
		return err
	case <-cctx.Done():
	}
	select {
	case err := <-done: // the wrapper honoured the deadline: its error says more
		return err
	default:
	}
	if ctx.Err() != nil {
		return fmt.Errorf("health check: %w: %w", ctx.Err(), fault.ErrUnavailable)
	}
	return fmt.Errorf("the HSM health round trip did not return within %s: %w", s.interval, fault.ErrUnavailable)
}

// Livez returns nil while the health loop runs and is not stuck. It fails when the loop has not run
// for 3 intervals (+5s), when a health round trip has been out for 3 intervals (an HSM call that
// hangs), or when the wrapper cannot recover without a new process (kms.Liveness).
func (s *Service) Livez() error {
	bound := 3 * s.interval
	last := time.Unix(0, s.loopBeat.Load())
	if age := time.Since(last); age > bound+5*time.Second {
		return fmt.Errorf("health loop has not run for %s", age.Round(time.Second))
	}
	if since := s.outstanding.Load(); since != 0 {
		if age := time.Since(time.Unix(0, since)); age > bound {
			return fmt.Errorf("health loop stuck: an HSM round trip has not returned for %s", age.Round(time.Millisecond))
		}
	}
	if l, ok := s.w.(kms.Liveness); ok {
		return l.Live()
	}
	return nil
}

// auditRefusals records each key object the wrapper refuses (kms.KeyVetter), once per object and
// reason in the process's life; a record that cannot be written is tried again at the next check.
// The wrapper logs the refusals itself.
func (s *Service) auditRefusals(ctx context.Context) {
	v, ok := s.w.(kms.KeyVetter)
	if !ok {
		return
	}
	s.refusedMu.Lock()
	defer s.refusedMu.Unlock()
	for _, r := range v.Refusals() {
		k := r.KeyID + "\x00" + r.Reason
		if s.refused[k] {
			continue
		}
		ev := audit.Event{Time: time.Now(), Type: audit.EventKMSKeyRefused, Object: audit.Object{KeyID: r.KeyID}}
		ev.Outcome(fmt.Errorf("key object %s refused, never used to wrap or unwrap: %s: %w", r.Label, r.Reason, fault.ErrDenied))
		if err := s.audit.Record(ctx, ev); err != nil {
			s.log.Warn("key refusal not audited yet", zap.String("key_id", r.KeyID), zap.Error(err))
			continue
		}
		if s.refused == nil {
			s.refused = map[string]bool{}
		}
		s.refused[k] = true
	}
}

// Status is the KMS v2 Status: version v2, the current key ID and the cached health.
func (s *Service) Status(ctx context.Context) (*service.StatusResponse, error) {
	id, err := s.w.KeyID(ctx)
	healthz := "ok"
	if err != nil {
		healthz = fault.Truncate(err.Error(), maxReason)
	} else if herr := s.Healthz(); herr != nil {
		healthz = herr.Error()
	}
	return &service.StatusResponse{Version: "v2", Healthz: healthz, KeyID: id}, nil
}

// Encrypt wraps a DEK seed for kube-apiserver; uid is the apiserver's request UID.
func (s *Service) Encrypt(ctx context.Context, uid string, plaintext []byte) (resp *service.EncryptResponse, err error) {
	start := time.Now()
	var keyID string
	defer func() {
		err = s.finish(ctx, audit.EventKMSEncrypt, uid, keyID, start, err)
		if err != nil {
			resp = nil
		}
	}()
	ct, keyID, err := s.w.Wrap(ctx, plaintext)
	if err != nil {
		return nil, err
	}
	if len(ct) > kms.MaxCiphertext || len(keyID) > kms.MaxKeyID || keyID == "" {
		return nil, fmt.Errorf("wrapper returned %d-byte ciphertext, %d-byte key ID: %w", len(ct), len(keyID), fault.ErrUnavailable)
	}
	return &service.EncryptResponse{Ciphertext: ct, KeyID: keyID,
		Annotations: map[string][]byte{AnnotationKey: annotationValue}}, nil
}

// Decrypt unwraps a DEK seed.
func (s *Service) Decrypt(ctx context.Context, uid string, req *service.DecryptRequest) (pt []byte, err error) {
	start := time.Now()
	defer func() {
		err = s.finish(ctx, audit.EventKMSDecrypt, uid, req.KeyID, start, err)
		if err != nil {
			pt = nil
		}
	}()
	if req.KeyID == "" || len(req.KeyID) > kms.MaxKeyID {
		return nil, fmt.Errorf("key ID of %d bytes: %w", len(req.KeyID), fault.ErrInvalid)
	}
	if v, ok := req.Annotations[AnnotationKey]; ok && string(v) != string(annotationValue) {
		return nil, fmt.Errorf("unknown ciphertext format %q: %w", fault.Truncate(string(v), maxReason), fault.ErrInvalid)
	}
	return s.w.Unwrap(ctx, req.Ciphertext, req.KeyID)
}

// finish records metrics and the audit record for one operation. If the record cannot be written the
// operation fails (fail closed) and its result is discarded by the caller.
func (s *Service) finish(ctx context.Context, typ audit.EventType, uid, keyID string, start time.Time, err error) error {
	if errors.Is(err, fault.ErrUnavailable) {
		s.markUnhealthy(err)
	}
	latency := time.Since(start)
	ev := audit.Event{Time: start, RequestID: uid, Type: typ, Object: audit.Object{KeyID: keyID}, LatencyMS: audit.Millis(latency)}
	ev.Outcome(err)
	if err == nil {
		ev.Reason = "ok"
	}
	// The plugin's reasons are bounded tighter than the schema's (kube-apiserver asks thousands of
	// times a second; a record quotes at most maxReason bytes of a caller's input).
	ev.Reason = fault.Truncate(ev.Reason, maxReason)
	if aerr := s.audit.Record(ctx, ev); aerr != nil && err == nil {
		err = fmt.Errorf("audit record not written, refusing the result: %w", fault.ErrUnavailable)
	}
	if s.metrics != nil {
		s.metrics.observe(string(typ), grpcserver.Code(fault.ClassOf(err)), latency)
	}
	return err
}

func (s *Service) markUnhealthy(err error) {
	s.health.Store(&healthState{reason: fault.Truncate(err.Error(), maxReason), at: time.Now()})
	if s.metrics != nil {
		s.metrics.setHealthy(false)
	}
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// maxReason bounds an error text in Status and audit reasons.
const maxReason = 240
