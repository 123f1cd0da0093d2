package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"go.uber.org/zap"

	"github.com/keyward/keyward/csi"
	"github.com/keyward/keyward/csi/registration"
	"github.com/keyward/keyward/internal/apiserver"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/internal/daemon"
	"github.com/keyward/keyward/internal/metricsserver"
)

// Options are the process wiring.
type Options struct {
	CSISocket    string
	ProviderSock string
	NodeID       string
	Config       string
	Kubeconfig   string
	Audit        audit.Flags
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
	// HealthAddress serves /healthz and /livez only, on any address (kubelet's probes reach the pod IP).
	HealthAddress string
	// KubeletRegistrationDir is kubelet's plugin registration directory ("": do not register);
	// KubeletRegistrationPath is the CSI socket's path as kubelet sees it.
	KubeletRegistrationDir  string
	KubeletRegistrationPath string
	// API is Keyward's own API listener (off unless --api-address is set).
	API apiserver.Options
}

func (o *Options) bind(fs *flag.FlagSet) {
	fs.StringVar(&o.CSISocket, "csi-socket", "/var/lib/kubelet/plugins/secrets.keyward.dev/csi.sock", "unix socket kubelet connects to")
	fs.StringVar(&o.ProviderSock, "provider-socket", "", "also serve the Secrets Store CSI Driver provider API on this socket (e.g. /etc/kubernetes/secrets-store-csi-providers/keyward.sock; empty: off)")
	fs.StringVar(&o.NodeID, "node-id", os.Getenv("NODE_NAME"), "this node's name (default $NODE_NAME)")
	fs.StringVar(&o.Config, "config", "/etc/keyward/broker.yaml", "YAML config: policy file, Vault settings")
	fs.StringVar(&o.Kubeconfig, "kubeconfig", "", "kubeconfig file (empty: in-cluster service account)")
	o.Audit.Bind(fs, "/var/log/keyward/broker-audit")
	fs.StringVar(&o.LogLevel, "log-level", "info", "debug, info, warn or error")
	fs.Float64Var(&o.KubeQPS, "kube-api-qps", 1000, "client-side limit on apiserver requests per second (one TokenReview per uncached publish); a runaway guard, the apiserver's priority and fairness is the flow control")
	fs.IntVar(&o.KubeBurst, "kube-api-burst", 2000, "client-side burst of apiserver requests")
	fs.DurationVar(&o.Grace, "grace", 10*time.Second, "how long in-flight calls may take to finish on SIGTERM")
	fs.StringVar(&o.KubeletDir, "kubelet-dir", csi.DefaultKubeletDir, "kubelet's root directory: every target path must be kubelet's path of a CSI volume below it")
	fs.IntVar(&o.MaxPublishes, "max-concurrent-publishes", 16, "publishes handled at once; more wait for a slot")
	fs.Int64Var(&o.MaxPublishBytes, "max-publish-bytes", 32<<20, "sum of the size limits of the volumes published at once: a publish holds up to about twice its volume's size in memory meanwhile (default sized for the DaemonSet's 128 MiB limit with GOMEMLIMIT=100MiB)")
	fs.BoolVar(&o.AllowSwap, "allow-swap-without-noswap", false, "start even though swap is on and the kernel cannot keep tmpfs volumes out of it (tmpfs noswap needs Linux 6.4+): secrets may reach the swap device")
	fs.StringVar(&o.MetricsAddress, "metrics-address", "127.0.0.1:9465", "loopback address for /metrics, /healthz and /livez (empty: off)")
	fs.StringVar(&o.HealthAddress, "health-address", "", "also serve /healthz and /livez (never /metrics) on this address, which may be the pod's (e.g. :9808, for kubelet's httpGet probes; empty: off)")
	fs.StringVar(&o.KubeletRegistrationDir, "kubelet-registration-dir", registration.DefaultDir, "kubelet's plugin registration directory: register the driver with kubelet through a socket there, as node-driver-registrar would (empty: off, e.g. when that sidecar runs; the default is skipped with a warning if it does not exist)")
	o.API.Bind(fs)
	fs.StringVar(&o.KubeletRegistrationPath, "kubelet-registration-path", "/var/lib/kubelet/plugins/"+csi.DriverName+"/csi.sock", "the CSI socket's path as kubelet sees it on the host (what kubelet is told to call)")
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
	case o.Audit.Validate() != nil:
		return o.Audit.Validate()
	case o.MaxPublishes <= 0:
		return errors.New("--max-concurrent-publishes must be positive")
	case o.MaxPublishBytes < csi.MaxWeight:
		return fmt.Errorf("--max-publish-bytes must hold at least one publish of the largest volume, %d", csi.MaxWeight)
	}
	if err := o.API.Validate(); err != nil {
		return err
	}
	if o.KubeletRegistrationDir != "" && !filepath.IsAbs(o.KubeletRegistrationPath) {
		return errors.New("--kubelet-registration-path must be the CSI socket's absolute path on the host")
	}
	if o.HealthAddress != "" {
		if _, _, err := net.SplitHostPort(o.HealthAddress); err != nil {
			return fmt.Errorf("--health-address: %w", err)
		}
		if o.HealthAddress == o.MetricsAddress {
			return errors.New("--health-address must differ from --metrics-address (which serves /healthz and /livez too)")
		}
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
	daemon.Main(daemon.Spec{Name: "keyward-broker", Bind: o.bind, LogLevel: &o.LogLevel,
		Validate: func() error { return o.Validate() }, Run: func(log *zap.Logger) error { return run(o, log) }})
}
