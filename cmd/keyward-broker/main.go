package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
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
	"github.com/keyward/keyward/csi/tmpfs"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/internal/grpcserver"
	"github.com/keyward/keyward/internal/hardening"
	"github.com/keyward/keyward/internal/logging"
	"github.com/keyward/keyward/internal/metricsserver"
	"github.com/keyward/keyward/internal/version"
)

// Options are the process wiring.
type Options struct {
	CSISocket    string
	ProviderSock string
	NodeID       string
	Config       string
	Kubeconfig   string
	AuditLog     string
	AuditKeyFile string
	AuditStdout  bool
	LogLevel     string
	Grace        time.Duration
	KubeQPS      float64
	KubeBurst    int
	KubeletDir   string
	// MaxPublishes and MaxPublishBytes bound the publishes handled at once (see csi.Options).
	MaxPublishes    int
	MaxPublishBytes int64
	AllowSwap       bool
	MetricsAddress  string
}

func (o *Options) bind(fs *flag.FlagSet) {
	fs.StringVar(&o.CSISocket, "csi-socket", "/var/lib/kubelet/plugins/secrets.keyward.dev/csi.sock", "unix socket kubelet connects to")
	fs.StringVar(&o.ProviderSock, "provider-socket", "", "also serve the Secrets Store CSI Driver provider API on this socket (e.g. /etc/kubernetes/secrets-store-csi-providers/keyward.sock; empty: off)")
	fs.StringVar(&o.NodeID, "node-id", os.Getenv("NODE_NAME"), "this node's name (default $NODE_NAME)")
	fs.StringVar(&o.Config, "config", "/etc/keyward/broker.yaml", "YAML config: policy file, Vault settings")
	fs.StringVar(&o.Kubeconfig, "kubeconfig", "", "kubeconfig file (empty: in-cluster service account)")
	fs.StringVar(&o.AuditLog, "audit-log", "/var/log/keyward/broker-audit.log", "audit log file (JSON lines, hash-chained)")
	fs.StringVar(&o.AuditKeyFile, "audit-key-file", "/etc/keyward/audit.key", "file holding the audit HMAC key")
	fs.BoolVar(&o.AuditStdout, "audit-stdout", false, "also write audit records to stdout")
	fs.StringVar(&o.LogLevel, "log-level", "info", "debug, info, warn or error")
	fs.Float64Var(&o.KubeQPS, "kube-api-qps", 1000, "client-side limit on apiserver requests per second (one TokenReview per uncached publish); a runaway guard, the apiserver's priority and fairness is the flow control")
	fs.IntVar(&o.KubeBurst, "kube-api-burst", 2000, "client-side burst of apiserver requests")
	fs.DurationVar(&o.Grace, "grace", 10*time.Second, "how long in-flight calls may take to finish on SIGTERM")
	fs.StringVar(&o.KubeletDir, "kubelet-dir", csi.DefaultKubeletDir, "kubelet's root directory: every target path must be kubelet's path of a CSI volume below it")
	fs.IntVar(&o.MaxPublishes, "max-concurrent-publishes", 16, "publishes handled at once; more wait for a slot")
	fs.Int64Var(&o.MaxPublishBytes, "max-publish-bytes", 32<<20, "sum of the size limits of the volumes published at once: a publish holds up to about twice its volume's size in memory meanwhile (default sized for the DaemonSet's 128 MiB limit with GOMEMLIMIT=100MiB)")
	fs.BoolVar(&o.AllowSwap, "allow-swap-without-noswap", false, "start even though swap is on and the kernel cannot keep tmpfs volumes out of it (tmpfs noswap needs Linux 6.4+): secrets may reach the swap device")
	fs.StringVar(&o.MetricsAddress, "metrics-address", "127.0.0.1:9465", "loopback address for /metrics (empty: off)")
}

// Validate reports the first problem with the options.
func (o Options) Validate() error {
	switch {
	case o.CSISocket == "":
		return errors.New("--csi-socket is required")
	case o.NodeID == "":
		return errors.New("--node-id (or $NODE_NAME) is required")
	case o.Config == "":
		return errors.New("--config is required")
	case o.AuditLog == "" || o.AuditKeyFile == "":
		return errors.New("--audit-log and --audit-key-file are required: every access is audited")
	case o.MaxPublishes <= 0:
		return errors.New("--max-concurrent-publishes must be positive")
	case o.MaxPublishBytes < csi.MaxWeight:
		return fmt.Errorf("--max-publish-bytes must hold at least one publish of the largest volume, %d", csi.MaxWeight)
	}
	if o.MetricsAddress != "" {
		return metricsserver.CheckLoopback("--metrics-address", o.MetricsAddress)
	}
	return nil
}

// swapPolicy decides, at start, whether volumes may be mounted without noswap. With noswap, never.
// Without it, only when no swap is active (nothing to leak to) or the operator explicitly accepts
// the risk; otherwise the broker refuses to start.
func swapPolicy(swapActive, noswap, allow bool) (allowSwapMounts bool, warning string, err error) {
	switch {
	case noswap:
		return false, "", nil
	case !swapActive:
		return true, "the kernel cannot mount tmpfs with noswap (Linux 6.4+); no swap is active now, so volumes are mounted without it: turning swap on later would let secrets reach it", nil
	case allow:
		return true, "swap is active and the kernel cannot mount tmpfs with noswap: secrets may reach the swap device (--allow-swap-without-noswap)", nil
	default:
		return false, "", errors.New("swap is active and the kernel cannot keep tmpfs volumes out of it (tmpfs noswap needs Linux 6.4+): secrets could reach the swap device. Turn swap off, upgrade the kernel, or accept the risk with --allow-swap-without-noswap")
	}
}

func main() {
	var o Options
	fs := flag.NewFlagSet("keyward-broker", flag.ContinueOnError)
	o.bind(fs)
	showVersion := fs.Bool("version", false, "print the version and exit")
	if err := fs.Parse(os.Args[1:]); err != nil {
		os.Exit(2)
	}
	if *showVersion {
		fmt.Println("keyward-broker", version.Version)
		return
	}
	if err := o.Validate(); err != nil {
		fmt.Fprintln(os.Stderr, "keyward-broker:", err)
		os.Exit(2)
	}
	log, err := logging.New(o.LogLevel)
	if err != nil {
		fmt.Fprintln(os.Stderr, "keyward-broker:", err)
		os.Exit(2)
	}
	if err := run(o, log); err != nil {
		log.Error("keyward-broker stopped", zap.Error(err))
		log.Sync()
		os.Exit(1)
	}
	log.Sync()
}

func run(o Options, log *zap.Logger) error {
	if err := hardening.DisableCoreDumps(); err != nil {
		return err
	}
	swapActive, err := tmpfs.SwapActive()
	if err != nil {
		return fmt.Errorf("reading /proc/swaps: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(o.CSISocket), 0o700); err != nil {
		return err
	}
	noswap, err := tmpfs.ProbeNoswap(filepath.Dir(o.CSISocket))
	if err != nil {
		return err
	}
	allowSwapMounts, warning, err := swapPolicy(swapActive, noswap, o.AllowSwap)
	if err != nil {
		return err
	}
	if warning != "" {
		log.Warn(warning)
	}
	cfg, err := loadConfig(o.Config)
	if err != nil {
		return err
	}
	pol, err := policy.Load(cfg.PolicyFile)
	if err != nil {
		return err
	}
	restCfg, err := kubeConfig(o.Kubeconfig)
	if err != nil {
		return err
	}
	restCfg.UserAgent = "keyward-broker/" + version.Version
	// client-go's default of 5 requests/s would cap cold publishes at 5/s (one TokenReview each).
	restCfg.QPS, restCfg.Burst = float32(o.KubeQPS), o.KubeBurst
	// Two narrow clients, not the typed clientset: metadata for the namespace informer and a REST
	// client that knows TokenReview. The clientset's scheme of every API group would cost ~10 MiB of
	// resident memory on every node.
	meta, err := metadata.NewForConfig(restCfg)
	if err != nil {
		return err
	}
	reviewer, err := tokenreview.NewReviewer(restCfg)
	if err != nil {
		return err
	}
	lis, err := grpcserver.Listen(o.CSISocket)
	if err != nil {
		return err
	}
	defer lis.Close()
	auditLog, err := audit.Open(audit.Options{Path: o.AuditLog, KeyFile: o.AuditKeyFile, Stdout: o.AuditStdout, SyncInterval: time.Second})
	if err != nil {
		return err
	}
	defer auditLog.Close()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	context.AfterFunc(ctx, stop) // after the first signal, a second one kills the process
	namespaces := policy.NewNamespaceWatcher(meta, 10*time.Minute)
	namespaces.Start(ctx)
	authz := policy.NewAuthorizer(pol, namespaces)
	go policy.Watch(ctx, cfg.PolicyFile, cfg.PolicyReloadInterval.Duration, authz, log.Named("policy"), auditLog)

	vc, err := vault.NewClient(vault.ClientOptions{Address: cfg.Vault.Address, CACertFile: cfg.Vault.CAFile, AllowHTTP: cfg.Vault.AllowHTTP})
	if err != nil {
		return err
	}
	vo := vault.Options{Client: vc, Mode: vault.Mode(cfg.Vault.Mode), AuthMount: cfg.Vault.AuthMount, Log: log.Named("vault")}
	if vo.Mode == vault.ModeBroker {
		b, err := os.ReadFile(cfg.Vault.TokenFile)
		if err != nil {
			return fmt.Errorf("vault token file: %w", err)
		}
		vo.BrokerToken = broker.Token(strings.TrimSpace(string(b)))
	}
	src, err := vault.New(vo)
	if err != nil {
		return err
	}
	svc, err := broker.NewService(broker.Options{
		Authenticator: tokenreview.New(tokenreview.Options{Client: reviewer, CacheTTL: cfg.TokenReviewCacheTTL.Duration}),
		Authorizer:    authz, Source: src, Auditor: auditLog, Audiences: []string{cfg.Audience},
		Node: o.NodeID, Pods: tokenreview.PodLookup{Client: meta},
		RefusalBurst: cfg.RefusalAuditBurst, RefusalInterval: cfg.RefusalAuditInterval.Duration,
	})
	if err != nil {
		return err
	}
	// One tracker for both servers: a pod's Vault token goes when neither holds it in use.
	creds := csi.NewPodCredentials(svc, log.Named("csi"))
	limiter := csi.NewPublishLimiter(o.MaxPublishes, o.MaxPublishBytes) // both servers' publishes share the bounds
	node, err := csi.NewServer(csi.Options{NodeID: o.NodeID, Version: version.Version, Broker: svc, Auditor: auditLog,
		Audience: cfg.Audience, Log: log.Named("csi"), Credentials: creds, KubeletDir: o.KubeletDir,
		Limiter: limiter, AllowSwap: allowSwapMounts,
		Ready: func() error {
			if !namespaces.HasSynced() {
				return errors.New("namespace informer not synced")
			}
			return nil
		}})
	if err != nil {
		return err
	}
	if o.MetricsAddress != "" {
		reg := prometheus.NewRegistry()
		if err := registerMetrics(reg, node, svc, noswap); err != nil {
			return err
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
		srv, err := metricsserver.Serve(o.MetricsAddress, mux)
		if err != nil {
			return err
		}
		defer srv.Close()
	}
	gs := grpcserver.NewServer(log.Named("grpc"), csi.Describe)
	node.Register(gs)
	providerDone := make(chan struct{})
	var providerErr error // written before providerDone closes
	if o.ProviderSock == "" {
		close(providerDone)
	} else {
		plis, err := grpcserver.Listen(o.ProviderSock)
		if err != nil {
			return err
		}
		defer plis.Close()
		prov, err := csi.NewProviderServer(csi.Options{Version: version.Version, Broker: svc, Audience: cfg.Audience, Log: log.Named("provider"),
			Credentials: creds, Limiter: limiter})
		if err != nil {
			return err
		}
		ps := grpcserver.NewServer(log.Named("provider"), csi.DescribeProvider)
		prov.Register(ps)
		go func() {
			defer close(providerDone)
			if perr := grpcserver.Serve(ctx, ps, plis, o.Grace); perr != nil {
				providerErr = perr
				log.Error("provider API stopped", zap.Error(perr))
			}
		}()
		log.Info("serving the Secrets Store CSI Driver provider API", zap.String("socket", o.ProviderSock))
	}
	log.Info("serving CSI", zap.String("socket", o.CSISocket), zap.String("node", o.NodeID), zap.String("policy", pol.Hash()),
		zap.String("vault_mode", cfg.Vault.Mode), zap.String("version", version.Version), zap.Bool("tmpfs_noswap", noswap),
		zap.Bool("swap_active", swapActive))
	err = grpcserver.Serve(ctx, gs, lis, o.Grace)
	stop() // the CSI server may have ended on its own: stop the provider API too
	<-providerDone
	if errors.Is(err, grpcserver.ErrHandlersRunning) || errors.Is(providerErr, grpcserver.ErrHandlersRunning) {
		log.Error("handlers still running after the grace periods; leaving the pods' Vault tokens to their TTL")
		return err
	}
	// Both servers have stopped and their handlers returned: no publish can log in any more.
	node.WaitReleases()
	// The pods' Vault tokens do not outlive the process holding them: a restarted broker logs in
	// again at the next republish (kubelet sends a fresh token each time).
	rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if n, rerr := src.ReleaseAll(rctx); rerr != nil {
		log.Warn("revoking the pods' Vault tokens at shutdown failed; they lapse at their TTL", zap.Int("revoked", n), zap.Error(rerr))
	} else if n > 0 {
		log.Info("revoked the pods' Vault tokens", zap.Int("revoked", n))
	}
	log.Info("stopped")
	return err
}

func kubeConfig(path string) (*rest.Config, error) {
	if path == "" {
		return rest.InClusterConfig()
	}
	return clientcmd.BuildConfigFromFlags("", path)
}
