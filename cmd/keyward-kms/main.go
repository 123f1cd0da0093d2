package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"

	"github.com/keyward/keyward/internal/apiserver"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/internal/daemon"
	"github.com/keyward/keyward/internal/grpcserver"
	"github.com/keyward/keyward/internal/hardening"
	"github.com/keyward/keyward/internal/metricsserver"
	"github.com/keyward/keyward/internal/version"
	"github.com/keyward/keyward/kms/pkcs11"
	"github.com/keyward/keyward/kms/plugin"
)

// Options are the process wiring; HSM settings live in the config file, the PIN in its own file.
type Options struct {
	Socket         string
	Config         string
	MetricsAddress string
	NodeName       string
	Audit          audit.Flags
	LogLevel       string
	Grace          time.Duration
	// API is Keyward's own API listener (off unless --api-address is set).
	API apiserver.Options
}

func (o *Options) bind(fs *flag.FlagSet) {
	fs.StringVar(&o.Socket, "socket", "/var/run/keyward/kms.sock", "unix socket kube-apiserver connects to")
	fs.StringVar(&o.Config, "config", "/etc/keyward/kms.yaml", "YAML config: PKCS#11 module, token, key label, PIN file")
	fs.StringVar(&o.MetricsAddress, "metrics-address", "127.0.0.1:9464", "loopback address for /metrics, /healthz and /livez (empty: off)")
	fs.StringVar(&o.NodeName, "node-name", nodeName(), "this node's name, bound into the audit stream (default $NODE_NAME, else the host name)")
	o.Audit.Bind(fs, "/var/log/keyward/kms-audit")
	fs.StringVar(&o.LogLevel, "log-level", "info", "debug, info, warn or error")
	fs.DurationVar(&o.Grace, "grace", 10*time.Second, "how long in-flight calls may take to finish on SIGTERM")
	o.API.Bind(fs)
}

// Validate reports the first problem with the options.
func (o Options) Validate() error {
	switch {
	case o.Socket == "":
		return errors.New("--socket is required")
	case o.Config == "":
		return errors.New("--config is required")
	case o.NodeName == "":
		return errors.New("--node-name is required")
	case o.Audit.Validate() != nil:
		return o.Audit.Validate()
	case o.Grace <= 0:
		return errors.New("--grace must be positive")
	}
	if err := o.API.Validate(); err != nil {
		return err
	}
	if o.MetricsAddress != "" {
		return metricsserver.CheckLoopback("--metrics-address", o.MetricsAddress)
	}
	return nil
}

// nodeName is $NODE_NAME, else the host name.
func nodeName() string {
	if n := os.Getenv("NODE_NAME"); n != "" {
		return n
	}
	n, _ := os.Hostname()
	return n
}

func main() {
	var o Options
	daemon.Main(daemon.Spec{Name: "keyward-kms", Bind: o.bind, LogLevel: &o.LogLevel,
		Validate: func() error { return o.Validate() }, Run: func(log *zap.Logger) error { return run(o, log) }})
}

func run(o Options, log *zap.Logger) error {
	// The HSM PIN and every DEK seed pass through this process's memory: never into a core file.
	if err := hardening.DisableCoreDumps(); err != nil {
		return err
	}
	cfg, err := loadConfig(o.Config)
	if err != nil {
		return err
	}
	// Claim the socket before touching the HSM: a second instance must not disturb the first.
	lis, err := grpcserver.Listen(o.Socket)
	if err != nil {
		return err
	}
	defer lis.Close()
	wrapper, err := openHSM(cfg.PKCS11, log)
	if err != nil {
		return err
	}
	defer wrapper.Close()
	auditOpts := o.Audit.Options(o.NodeName, "kms")
	if cfg.PKCS11.AuditCheckpointKeyLabel != "" {
		// Checkpoints signed inside the HSM; the wrapper logs whether the key is usable (if not, they
		// go out unsigned, saying why, and keyward_audit_checkpoint_sign_failures_total counts them).
		auditOpts.SignCheckpoint = wrapper.SignCheckpoint
	}
	auditLog, err := audit.Open(auditOpts)
	if err != nil {
		return err
	}
	defer auditLog.Close()
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	metrics, err := plugin.NewMetrics(reg, wrapper)
	if err != nil {
		return err
	}
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "keyward", Subsystem: "audit", Name: "healthy",
		Help: "1 while audit records are written and synced, 0 while they cannot be (every operation then fails; Status healthz says why)."},
		func() float64 {
			if auditLog.Health() != nil {
				return 0
			}
			return 1
		}))
	reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "keyward", Subsystem: "audit", Name: "checkpoint_sign_failures_total",
		Help: "Audit checkpoints written unsigned although pkcs11.auditCheckpointKeyLabel is set (the HSM could not sign in time; the line says why)."},
		func() float64 { return float64(auditLog.CheckpointSignFailures()) }))
	svc, err := plugin.NewService(plugin.ServiceOptions{Wrapper: wrapper, Auditor: auditLog, AuditHealth: auditLog.Health, Logger: log.Named("kms"),
		HealthInterval: cfg.HealthInterval.Duration, Metrics: metrics})
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	context.AfterFunc(ctx, stop) // after the first signal, a second one kills the process
	go svc.Run(ctx)
	go reloadOnHUP(ctx, log, wrapper, svc)
	if o.MetricsAddress != "" {
		srv, err := serveHTTP(o.MetricsAddress, reg, svc)
		if err != nil {
			return err
		}
		defer srv.Close()
	}
	if o.API.Enabled() {
		wait, err := serveAPI(ctx, o, log.Named("api"), auditLog, svc)
		if err != nil {
			return err
		}
		defer wait() // before the audit log closes
	}
	gs := grpcserver.NewServer(log.Named("grpc"), nil)
	plugin.NewGRPCServer(svc).Register(gs)
	kid, _ := wrapper.KeyID(ctx)
	log.Info("serving KMS v2", zap.String("socket", o.Socket), zap.String("key_id", kid), zap.String("version", version.Version))
	err = grpcserver.Serve(ctx, gs, lis, o.Grace)
	log.Info("stopped")
	return err
}

// openHSM reads the PIN from its file (and forgets it after the login) and opens the HSM.
func openHSM(cfg pkcs11.Config, log *zap.Logger) (*pkcs11.Wrapper, error) {
	pin, err := os.ReadFile(cfg.PINFile)
	if err != nil {
		return nil, fmt.Errorf("PIN file: %w", err)
	}
	defer clear(pin)
	return pkcs11.New(cfg, strings.TrimRight(string(pin), "\r\n"), log)
}

// reloadOnHUP looks for new key generations on SIGHUP and re-checks health at once.
func reloadOnHUP(ctx context.Context, log *zap.Logger, w *pkcs11.Wrapper, svc *plugin.Service) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			if err := w.Refresh(ctx); err != nil {
				log.Warn("SIGHUP: key refresh failed", zap.Error(err))
			}
			svc.CheckHealth(ctx)
			kid, _ := w.KeyID(ctx)
			log.Info("SIGHUP: keys refreshed", zap.String("key_id", kid))
		}
	}
}

func serveHTTP(addr string, reg *prometheus.Registry, svc *plugin.Service) (*http.Server, error) {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	metricsserver.HandleHealth(mux, svc.Healthz, svc.Livez)
	return metricsserver.Serve(addr, mux)
}

// serveAPI serves Keyward's API (the node's kms audit stream, and Admin's GetHealth) until ctx ends;
// the function returned waits for it to stop.
func serveAPI(ctx context.Context, o Options, log *zap.Logger, auditLog *audit.Log, svc *plugin.Service) (func(), error) {
	srv, err := apiserver.Listen(o.API, log)
	if err != nil {
		return nil, err
	}
	as, err := apiserver.NewAuditServer(apiserver.AuditOptions{Stream: auditLog, Done: ctx.Done()})
	if err != nil {
		return nil, err
	}
	as.Register(srv.GRPC)
	apiserver.NewAdminServer(apiserver.AdminOptions{Node: o.NodeName, Component: "kms", Version: version.Version,
		Health: func() []apiserver.Check {
			return []apiserver.Check{{Name: "hsm", Err: svc.Healthz()}, {Name: "live", Err: svc.Livez()}, {Name: "audit", Err: auditLog.Health()}}
		}}).Register(srv.GRPC)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ctx, o.Grace); err != nil {
			log.Error("API stopped", zap.Error(err))
		}
	}()
	log.Info("serving Keyward's API", zap.Stringer("api", o.API), zap.String("listening", srv.Addr().String()))
	return func() { <-done }, nil
}
