package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/broker/policy"
	"github.com/keyward/keyward/broker/tokenreview"
	"github.com/keyward/keyward/broker/vault"
	"github.com/keyward/keyward/csi"
	"github.com/keyward/keyward/csi/podevents"
	"github.com/keyward/keyward/csi/podevents/restsink"
	"github.com/keyward/keyward/csi/podwatch"
	"github.com/keyward/keyward/csi/registration"
	"github.com/keyward/keyward/csi/tmpfs"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/internal/grpcserver"
	"github.com/keyward/keyward/internal/hardening"
	"github.com/keyward/keyward/internal/metricsserver"
	"github.com/keyward/keyward/internal/version"
)

// wiring is keyward-broker's wiring: what run builds, in the order it builds it.
type wiring struct {
	o   Options
	log *zap.Logger

	swapActive, noswap, allowSwapMounts bool

	cfg      Config
	pol      *policy.Policy
	meta     metadata.Interface
	reviewer tokenreview.Reviewer
	events   *podevents.Recorder
	audit    *audit.Log

	namespaces *policy.NamespaceWatcher
	authz      *policy.Authorizer
	src        *vault.Source
	svc        *broker.Service
	creds      *csi.PodCredentials
	limiter    *csi.PublishLimiter
	node       *csi.Server

	metrics *brokerMetrics
	reg     *registration.Server // nil: not registering with kubelet
}

func run(o Options, log *zap.Logger) error {
	d := &wiring{o: o, log: log, metrics: newBrokerMetrics()}
	if err := d.checkHost(); err != nil {
		return err
	}
	if err := d.load(); err != nil {
		return err
	}
	lis, err := grpcserver.Listen(o.CSISocket)
	if err != nil {
		return err
	}
	defer lis.Close()
	if d.audit, err = audit.Open(o.Audit.Options(o.NodeID, "broker")); err != nil {
		return err
	}
	defer d.audit.Close()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	context.AfterFunc(ctx, stop) // after the first signal, a second one kills the process
	if err := d.wire(ctx); err != nil {
		return err
	}
	if err := d.register(); err != nil {
		return err
	}
	if d.reg != nil {
		defer d.reg.Stop()
		context.AfterFunc(ctx, d.reg.Stop) // on SIGTERM kubelet deregisters the driver at once, as with the sidecar
	}
	wait, err := d.serveAPI(ctx)
	if err != nil {
		return err
	}
	defer wait() // before the audit log closes: subscriptions end with the context, telling where to resume
	for _, addr := range []string{o.MetricsAddress, o.HealthAddress} {
		if addr == "" {
			continue
		}
		srv, err := d.serveHTTP(addr, addr == o.MetricsAddress)
		if err != nil {
			return err
		}
		defer srv.Close()
	}
	return d.serve(ctx, stop, lis)
}

// checkHost turns core dumps off and decides whether volumes may be mounted without noswap.
func (d *wiring) checkHost() error {
	if err := hardening.DisableCoreDumps(); err != nil {
		return err
	}
	var err error
	if d.swapActive, err = tmpfs.SwapActive(); err != nil {
		return fmt.Errorf("reading /proc/swaps: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(d.o.CSISocket), 0o700); err != nil {
		return err
	}
	if d.noswap, err = tmpfs.ProbeNoswap(filepath.Dir(d.o.CSISocket)); err != nil {
		return err
	}
	allow, warning, err := swapPolicy(d.swapActive, d.noswap, d.o.AllowSwap)
	if err != nil {
		return err
	}
	if warning != "" {
		d.log.Warn(warning)
	}
	d.allowSwapMounts = allow
	return nil
}

// load reads the config and the policy and builds the three narrow apiserver clients.
func (d *wiring) load() error {
	var err error
	if d.cfg, err = loadConfig(d.o.Config); err != nil {
		return err
	}
	if d.pol, err = policy.Load(d.cfg.PolicyFile); err != nil {
		return err
	}
	restCfg, err := kubeConfig(d.o.Kubeconfig)
	if err != nil {
		return err
	}
	restCfg.UserAgent = "keyward-broker/" + version.Version
	// client-go's default of 5 requests/s would cap cold publishes at 5/s (one TokenReview each).
	restCfg.QPS, restCfg.Burst = float32(d.o.KubeQPS), d.o.KubeBurst
	// Two narrow clients, not the typed clientset: metadata for the namespace informer and a REST
	// client that knows TokenReview. The clientset's scheme of every API group would cost ~10 MiB of
	// resident memory on every node.
	if d.meta, err = metadata.NewForConfig(restCfg); err != nil {
		return err
	}
	if d.reviewer, err = tokenreview.NewReviewer(restCfg); err != nil {
		return err
	}
	// Events on the pods (SecretsRotated, SecretsDenied) over a third narrow client: core/v1 Events
	// as raw JSON, create and patch only.
	sink, err := restsink.New(restCfg, "keyward-broker", d.o.NodeID)
	if err != nil {
		return err
	}
	d.events, err = podevents.New(podevents.Options{Sink: sink})
	return err
}

// wire builds the policy, the Vault source, the broker service and the CSI node server.
func (d *wiring) wire(ctx context.Context) error {
	go d.events.Run(ctx)
	d.namespaces = policy.NewNamespaceWatcher(d.meta, 10*time.Minute)
	d.namespaces.Start(ctx)
	d.authz = policy.NewAuthorizer(d.pol, d.namespaces)
	go policy.Watch(ctx, d.cfg.PolicyFile, d.cfg.PolicyReloadInterval.Duration, d.authz, d.log.Named("policy"), d.audit)
	var err error
	if d.src, err = d.vaultSource(); err != nil {
		return err
	}
	if d.svc, err = broker.NewService(broker.Options{
		Authenticator: tokenreview.New(tokenreview.Options{Client: d.metrics.reviewer(d.reviewer), CacheTTL: d.cfg.TokenReviewCacheTTL.Duration}),
		Authorizer:    d.authz, Source: d.src, Leases: d.src, Auditor: d.audit, Audiences: []string{d.cfg.Audience},
		Node: d.o.NodeID, Pods: tokenreview.PodLookup{Client: d.meta},
		RefusalBurst: d.cfg.RefusalAuditBurst, RefusalInterval: d.cfg.RefusalAuditInterval.Duration,
	}); err != nil {
		return err
	}
	// One tracker and one limiter for both servers: a pod's Vault token goes when neither holds it
	// in use, and their publishes share the bounds.
	d.creds = csi.NewPodCredentials(d.svc, d.log.Named("csi"))
	d.limiter = csi.NewPublishLimiter(d.o.MaxPublishes, d.o.MaxPublishBytes)
	d.node, err = csi.NewServer(csi.Options{NodeID: d.o.NodeID, Version: version.Version, Broker: d.svc, Auditor: d.audit,
		Audience: d.cfg.Audience, Log: d.log.Named("csi"), Credentials: d.creds, KubeletDir: d.o.KubeletDir,
		Limiter: d.limiter, AllowSwap: d.allowSwapMounts, Ready: d.checks().ready, Observer: d.metrics, Events: d.events})
	return err
}

// register serves kubelet's plugin registration, unless it is off. Kubelet's default directory
// missing (no kubelet here, or one with another root) is a warning; a directory named explicitly must
// exist.
func (d *wiring) register() error {
	dir := d.o.KubeletRegistrationDir
	if dir == "" {
		return nil
	}
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) && dir == registration.DefaultDir {
		d.log.Warn("kubelet's plugin registration directory does not exist: not registering with kubelet (mount it, point --kubelet-registration-dir at it, or set it empty and run node-driver-registrar)",
			zap.String("dir", dir))
		return nil
	}
	var err error
	d.reg, err = registration.Start(registration.Options{Dir: dir, Driver: csi.DriverName, Endpoint: d.o.KubeletRegistrationPath,
		Log: d.log.Named("registration")})
	return err
}

// checks are the broker's health checks.
func (d *wiring) checks() checks {
	c := checks{synced: d.namespaces.HasSynced, audit: d.audit.Health, sockets: []string{d.o.CSISocket}}
	if d.reg != nil {
		c.registration = d.reg.Health
		c.sockets = append(c.sockets, d.reg.Path())
	}
	return c
}

// metricSources are where the metrics read their numbers.
func (d *wiring) metricSources() metricSources {
	s := metricSources{noswap: d.noswap, auditHealth: d.audit.Health, auditFailures: d.audit.WriteFailures,
		inFlight: d.limiter.InFlight, waits: d.limiter.Waits, suppressed: d.svc.SuppressedRefusals,
		volumes: d.node.Volumes, podTokens: d.src.Tokens, podEvents: d.events.Stats, leases: d.src.Leases, budgetRefusals: d.authz.BudgetRefusals,
		policy: func() (uint64, string) { return d.authz.Generation(), d.authz.Policy().Hash() }}
	if d.reg != nil {
		s.registered, s.registerFailures = d.reg.Registered, d.reg.Failures
	}
	return s
}

func (d *wiring) vaultSource() (*vault.Source, error) {
	v := d.cfg.Vault
	vc, err := vault.NewClient(vault.ClientOptions{Address: v.Address, CACertFile: v.CAFile, AllowHTTP: v.AllowHTTP})
	if err != nil {
		return nil, err
	}
	vo := vault.Options{Client: vc, Mode: vault.Mode(v.Mode), AuthMount: v.AuthMount, Log: d.log.Named("vault"), Observe: d.metrics.vaultRequest,
		Budget: d.authz.TakeIssues, RenewWindow: v.LeaseRenewWindow}
	if vo.Mode == vault.ModeBroker {
		b, err := os.ReadFile(v.TokenFile)
		if err != nil {
			return nil, fmt.Errorf("vault token file: %w", err)
		}
		vo.BrokerToken = broker.Token(strings.TrimSpace(string(b)))
	}
	return vault.New(vo)
}

// serveHTTP serves /healthz and /livez on addr, and /metrics too if metrics (the loopback
// --metrics-address; --health-address never serves them).
func (d *wiring) serveHTTP(addr string, metrics bool) (*http.Server, error) {
	mux := http.NewServeMux()
	d.checks().handle(mux)
	if metrics {
		reg := prometheus.NewRegistry()
		if err := registerMetrics(reg, d.metrics, d.metricSources()); err != nil {
			return nil, err
		}
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	}
	return metricsserver.Serve(addr, mux)
}

// serve serves CSI (and the provider API) until ctx ends, then shuts down: both servers stop, their
// handlers return, and only then are the pods' Vault tokens revoked.
func (d *wiring) serve(ctx context.Context, stop func(), lis net.Listener) error {
	gs := grpcserver.NewServer(d.log.Named("grpc"), csi.Describe)
	d.node.Register(gs)
	providerDone := make(chan error, 1)
	if d.o.ProviderSock == "" {
		providerDone <- nil
	} else if err := d.serveProvider(ctx, providerDone); err != nil {
		return err
	}
	d.log.Info("serving CSI", zap.String("socket", d.o.CSISocket), zap.String("node", d.o.NodeID), zap.String("policy", d.pol.Hash()),
		zap.String("vault_mode", d.cfg.Vault.Mode), zap.String("version", version.Version), zap.Bool("tmpfs_noswap", d.noswap),
		zap.Bool("swap_active", d.swapActive), zap.Bool("kubelet_registration", d.reg != nil))
	err := grpcserver.Serve(ctx, gs, lis, d.o.Grace)
	stop() // the CSI server may have ended on its own: stop the provider API too
	providerErr := <-providerDone
	if errors.Is(err, grpcserver.ErrHandlersRunning) || errors.Is(providerErr, grpcserver.ErrHandlersRunning) {
		d.log.Error("handlers still running after the grace periods; leaving the pods' Vault tokens to their TTL")
		return err
	}
	d.shutdown()
	return err
}

// serveProvider serves the Secrets Store CSI Driver provider API until ctx ends; done receives how
// it ended.
func (d *wiring) serveProvider(ctx context.Context, done chan<- error) error {
	plis, err := grpcserver.Listen(d.o.ProviderSock)
	if err != nil {
		return err
	}
	prov, err := csi.NewProviderServer(csi.Options{Version: version.Version, Broker: d.svc, Audience: d.cfg.Audience,
		Log: d.log.Named("provider"), Credentials: d.creds, Limiter: d.limiter})
	if err != nil {
		plis.Close()
		return err
	}
	d.watchPods(ctx)
	ps := grpcserver.NewServer(d.log.Named("provider"), csi.DescribeProvider)
	prov.Register(ps)
	go func() {
		defer plis.Close()
		perr := grpcserver.Serve(ctx, ps, plis, d.o.Grace)
		if perr != nil {
			d.log.Error("provider API stopped", zap.Error(perr))
		}
		done <- perr
	}()
	d.log.Info("serving the Secrets Store CSI Driver provider API", zap.String("socket", d.o.ProviderSock))
	return nil
}

// watchPods runs the node's metadata-only pod informer (pods list and watch, spec.nodeName=<node>)
// for the provider API: a provider mount then holds its pod's service-account Vault token while the
// pod lives and releases it when the pod is deleted (or idle), instead of a login and a revocation
// per Mount. Until the informer has synced, and while its watch fails, each mount releases as before.
func (d *wiring) watchPods(ctx context.Context) {
	w := podwatch.New(d.meta, d.o.NodeID)
	w.OnDelete(d.creds.PodDeleted)
	d.creds.WatchPods(w, 0)
	w.Start(ctx)
	go func() {
		t := time.NewTicker(time.Minute)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-t.C:
				d.creds.Sweep(now)
			}
		}
	}()
}

// shutdown revokes the pods' Vault tokens once both servers have stopped and their handlers
// returned (no publish can log in any more): they do not outlive the process holding them; a
// restarted broker logs in again at the next republish (kubelet sends a fresh token each time).
func (d *wiring) shutdown() {
	d.node.WaitReleases()
	rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if n, rerr := d.src.ReleaseAll(rctx); rerr != nil {
		d.log.Warn("revoking the pods' Vault tokens at shutdown failed; they lapse at their TTL", zap.Int("revoked", n), zap.Error(rerr))
	} else if n > 0 {
		d.log.Info("revoked the pods' Vault tokens", zap.Int("revoked", n))
	}
	d.log.Info("stopped")
}

func kubeConfig(path string) (*rest.Config, error) {
	if path == "" {
		return rest.InClusterConfig()
	}
	return clientcmd.BuildConfigFromFlags("", path)
}
