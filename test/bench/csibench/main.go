package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	vaultapi "github.com/hashicorp/vault/api"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keyward/keyward/csi"
	"github.com/keyward/keyward/csi/tmpfs"
	"github.com/keyward/keyward/test/harness"
)

const secrets = `
- {ref: payments/s0, key: v, file: s0}
- {ref: payments/s1, key: v, file: s1}
- {ref: payments/s2, key: v, file: s2}
- {ref: payments/s3, key: v, file: s3}
- {ref: payments/s4, key: v, file: s4}
`

type bench struct {
	env    *harness.Env
	dir    string
	node   csipb.NodeClient
	pods   []*corev1.Pod
	tokens []string
	next   atomic.Int64 // next cold pod
	vc     *vaultapi.Client
}

var (
	only     = flag.String("only", "", "measure only this contender (for profiling; no ratios)")
	shapesOn = flag.Bool("shapes", true, "also measure issue 16's shapes: a Deployment's cold start and a provider-API rotation poll")
	memory   = flag.Bool("memory", false, "measure only the driver's peak RSS when 64 publishes of 16 MiB volumes arrive at once, bounded (defaults) and unbounded")
)

func main() {
	ops := flag.Int("ops", 256, "operations per contender, concurrency and round")
	rounds := flag.Int("rounds", 2, "rounds")
	volumes := flag.Int("volumes", 1000, "volumes published for the RSS measurement")
	flag.Parse()
	if err := run(*ops, *rounds, *volumes); err != nil {
		fmt.Fprintln(os.Stderr, "csibench:", err)
		os.Exit(1)
	}
}

// (Over 60 lines: a measurement script: set-up, the alternating rounds and the report, read top to bottom.)
func run(ops, rounds, volumes int) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root (tmpfs mounts)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	env, err := harness.StartEnv(ctx, harness.EnvOptions{Kube: true, Vault: true})
	if err != nil {
		return err
	}
	defer env.Stop()
	b := &bench{env: env, dir: env.Dir}
	defer tmpfs.UnmountAllUnder(env.Dir)
	if *memory {
		return b.memory(ctx)
	}
	if err := b.provision(ctx, 3*len([]int{1, 8, 32})*ops*rounds/2+64); err != nil {
		return err
	}
	var sh *shapes
	var extra []string
	if *shapesOn && *only == "" {
		if sh, err = b.provisionShapes(ctx, rounds); err != nil {
			return err
		}
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		addr := l.Addr().String()
		l.Close()
		sh.metrics = "http://" + addr + "/metrics"
		extra = []string{"--provider-socket", filepath.Join(b.dir, "provider.sock"), "--metrics-address", addr}
	}
	drv, sock, err := b.startDriver(extra...)
	if err != nil {
		return err
	}
	defer func() { drv.Process.Signal(syscall.SIGTERM); drv.Wait() }()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	b.node = csipb.NewNodeClient(conn)
	if err := waitReady(ctx, conn); err != nil {
		return err
	}
	if sh != nil {
		stop, err := sh.startBrokerMode(ctx)
		if err != nil {
			return fmt.Errorf("the broker-mode driver: %w", err)
		}
		defer stop()
	}
	// Warm volumes: one per worker, published once before the clock starts.
	for i := range 32 {
		if err := b.publish(ctx, b.pods[i], b.tokens[i], b.target(b.pods[i], "warm")); err != nil {
			return fmt.Errorf("warm-up publish: %w", err)
		}
	}
	b.next.Store(32)
	floorTok, err := b.login(ctx, b.tokens[0])
	if err != nil {
		return err
	}
	contenders := []struct {
		name string
		op   func(ctx context.Context, worker int) error
	}{
		{"warm", func(ctx context.Context, w int) error {
			return b.publish(ctx, b.pods[w], b.tokens[w], b.target(b.pods[w], "warm"))
		}},
		{"cold", func(ctx context.Context, _ int) error {
			i := int(b.next.Add(1)) - 1
			if i >= len(b.pods) {
				return fmt.Errorf("ran out of cold pods")
			}
			return b.publish(ctx, b.pods[i], b.tokens[i], b.target(b.pods[i], "cold"))
		}},
		{"floor", func(ctx context.Context, _ int) error { return b.reads(ctx, floorTok) }},
		{"naive", func(ctx context.Context, w int) error { return b.naive(ctx, w) }},
	}
	concs := []int{1, 8, 32}
	type res struct {
		n   int
		el  time.Duration
		lat []time.Duration
		cpu []time.Duration // per component, as procs
	}
	// CPU per operation of each process on the machine's two cores: where a contender's cost goes.
	procs := []struct {
		name string
		pid  int
	}{{"driver", drv.Process.Pid}, {"vault", env.Vault.Pid()}, {"apiserver", env.Kube.Pid()}, {"etcd", env.Etcd.Pid()}, {"bench", os.Getpid()}}
	sample := func() []time.Duration {
		out := make([]time.Duration, len(procs))
		for i, p := range procs {
			out[i] = procCPU(p.pid)
		}
		return out
	}
	results := map[string]map[int]*res{}
	for _, c := range contenders {
		results[c.name] = map[int]*res{}
		for _, n := range concs {
			results[c.name][n] = &res{cpu: make([]time.Duration, len(procs))}
		}
	}
	for r := range rounds {
		for i := range contenders {
			c := contenders[(i+r)%len(contenders)]
			if *only != "" && c.name != *only {
				continue
			}
			for _, n := range concs {
				rr := results[c.name][n]
				var mu sync.Mutex
				var wg sync.WaitGroup
				var firstErr error
				var left atomic.Int64
				left.Store(int64(ops))
				cpu0 := sample()
				start := time.Now()
				for w := range n {
					wg.Go(func() {
						for left.Add(-1) >= 0 {
							t0 := time.Now()
							err := c.op(ctx, w)
							d := time.Since(t0)
							mu.Lock()
							if err != nil && firstErr == nil {
								firstErr = err
							}
							rr.lat = append(rr.lat, d)
							mu.Unlock()
						}
					})
				}
				wg.Wait()
				rr.el += time.Since(start)
				rr.n += ops
				for i, c := range sample() {
					rr.cpu[i] += c - cpu0[i]
				}
				if firstErr != nil {
					return fmt.Errorf("%s at %d: %w", c.name, n, firstErr)
				}
			}
		}
	}
	pct := func(d []time.Duration, p float64) time.Duration {
		sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
		return d[int(p*float64(len(d)-1))].Round(10 * time.Microsecond)
	}
	fmt.Printf("csibench: 5-secret volumes, %d ops x %d rounds per contender and concurrency, real kube-apiserver and Vault\n\n", ops, rounds)
	fmt.Printf("%-6s %5s %8s %9s %9s   CPU per op (µs): ", "", "conc", "ops/s", "p50", "p99")
	for _, p := range procs {
		fmt.Printf("%10s", p.name)
	}
	fmt.Printf("%10s\n", "total")
	for _, c := range contenders {
		for _, n := range concs {
			r := results[c.name][n]
			if r.n == 0 {
				continue
			}
			fmt.Printf("%-6s %5d %8.0f %9s %9s                    ", c.name, n, float64(r.n)/r.el.Seconds(), pct(r.lat, .5), pct(r.lat, .99))
			var total time.Duration
			for _, d := range r.cpu {
				fmt.Printf("%10d", d.Microseconds()/int64(r.n))
				total += d
			}
			fmt.Printf("%10d\n", total.Microseconds()/int64(r.n))
		}
	}
	if *only != "" {
		return nil
	}
	rate := func(name string, n int) float64 { r := results[name][n]; return float64(r.n) / r.el.Seconds() }
	fmt.Printf("\nwarm/floor ops/s at 8: %.2f (target >= 0.8); warm p99 / floor p99 at 8: %.2f (target <= 1.5)\n",
		rate("warm", 8)/rate("floor", 8), float64(pct(results["warm"][8].lat, .99))/float64(pct(results["floor"][8].lat, .99)))
	fmt.Printf("cold/naive ops/s at 1, 8, 32: %.2f %.2f %.2f (target >= 1)\n", rate("cold", 1)/rate("naive", 1), rate("cold", 8)/rate("naive", 8), rate("cold", 32)/rate("naive", 32))

	if sh != nil {
		conn, err := sh.dial(filepath.Join(b.dir, "provider.sock"))
		if err != nil {
			return err
		}
		defer conn.Close()
		sh.floorTok = floorTok
		if err := sh.measure(ctx, rounds); err != nil {
			return err
		}
	}

	// RSS with many published volumes (one pod, many volumes: the driver's per-volume state).
	for i := range volumes {
		if err := b.publish(ctx, b.pods[0], b.tokens[0], b.target(b.pods[0], "rss-"+strconv.Itoa(i))); err != nil {
			return fmt.Errorf("rss publish %d: %w", i, err)
		}
	}
	st := procStatus(drv.Process.Pid)
	fmt.Printf("\ndriver RSS with %d published volumes: %.1f MiB (target < 60 MiB): anonymous %.1f MiB, file-backed %.1f MiB\n",
		volumes, float64(st["VmRSS"])/1024, float64(st["RssAnon"])/1024, float64(st["RssFile"])/1024)
	return nil
}

// target is kubelet's path of the pod's volume named kind; kubelet creates its parent.
func (b *bench) target(p *corev1.Pod, kind string) string { return targetIn(b.dir, p, kind) }

// targetIn is target for the driver whose kubelet directory is in dir.
func targetIn(dir string, p *corev1.Pod, kind string) string {
	t := filepath.Join(dir, "kubelet/pods", string(p.UID), "volumes/kubernetes.io~csi", kind, "mount")
	os.MkdirAll(filepath.Dir(t), 0o750)
	return t
}

func (b *bench) provision(ctx context.Context, pods int) error {
	k, v := b.env.Kube, b.env.Vault
	if _, err := k.CreateNamespace(ctx, "payments", map[string]string{"keyward.dev/environment": "prod"}); err != nil {
		return err
	}
	if _, err := k.CreateServiceAccount(ctx, "payments", "api"); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "csibench: creating %d pods and tokens\n", pods)
	for i := range pods {
		p, err := k.CreatePod(ctx, "payments", fmt.Sprintf("api-%d", i), "api", "node-1")
		if err != nil {
			return err
		}
		tok, err := k.PodToken(ctx, p, []string{"keyward"}, time.Hour)
		if err != nil {
			return err
		}
		b.pods, b.tokens = append(b.pods, p), append(b.tokens, tok)
	}
	if err := v.EnableKVv2(ctx, "kv"); err != nil {
		return err
	}
	for i := range 5 {
		if _, err := v.PutKV(ctx, "kv", fmt.Sprintf("prod/payments/s%d", i), map[string]any{"v": strings.Repeat("x", 64)}); err != nil {
			return err
		}
	}
	if err := v.KubernetesAuth(ctx, "kubernetes", k); err != nil {
		return err
	}
	if err := v.GrantEnvironment(ctx, "kubernetes", "kv", "prod", []string{"payments"}, []string{"*"}, "keyward"); err != nil {
		return err
	}
	cfg := vaultapi.DefaultConfig()
	cfg.Address = v.Addr
	c, err := vaultapi.NewClient(cfg)
	if err != nil {
		return err
	}
	b.vc = c
	return nil
}

func (b *bench) startDriver(args ...string) (*exec.Cmd, string, error) {
	return b.startDriverEnv(nil, args...)
}

// startDriverEnv starts the driver with env added to the environment and args to its flags.
func (b *bench) startDriverEnv(env []string, args ...string) (*exec.Cmd, string, error) {
	return b.startDriverIn(b.dir, "", env, args...)
}

// startDriverIn starts a driver whose files (config, audit, kubelet directory, socket) are in dir,
// with vaultExtra added to its config's vault map (", mode: broker, tokenFile: F").
func (b *bench) startDriverIn(dir, vaultExtra string, env []string, args ...string) (*exec.Cmd, string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, "", err
	}
	os.WriteFile(filepath.Join(dir, "policy.yaml"), []byte("environments: [{name: prod, vaultMount: kv, vaultPrefix: prod, vaultRole: prod}]\ngrants: [{namespace: payments, serviceAccount: \"*\", paths: [\"payments/*\"]}]\n"), 0o600)
	os.WriteFile(filepath.Join(dir, "broker.yaml"), []byte(fmt.Sprintf("policyFile: %s\nvault: {address: %s, allowInsecureHTTP: true%s}\n",
		filepath.Join(dir, "policy.yaml"), b.env.Vault.Addr, vaultExtra)), 0o600)
	os.WriteFile(filepath.Join(dir, "audit.key"), []byte(strings.Repeat("k", 32)), 0o600)
	kc, err := b.env.Kube.WriteKubeconfig(filepath.Join(dir, "kubeconfig"), "")
	if err != nil {
		return nil, "", err
	}
	bin := filepath.Join(b.dir, "keyward-broker")
	if _, err := os.Stat(bin); err != nil {
		if out, err := exec.Command("go", "build", "-o", bin, "github.com/keyward/keyward/cmd/keyward-broker").CombinedOutput(); err != nil {
			return nil, "", fmt.Errorf("build: %v: %s", err, out)
		}
	}
	sock := filepath.Join(dir, "csi.sock")
	logf, _ := os.Create(filepath.Join(dir, "driver.log"))
	cmd := exec.Command(bin, "--csi-socket", sock, "--node-id", "node-1", "--config", filepath.Join(dir, "broker.yaml"),
		"--kubeconfig", kc, "--audit-dir", filepath.Join(dir, "audit"), "--audit-key-file", filepath.Join(dir, "audit.key"), "--log-level", "warn",
		"--kubelet-dir", filepath.Join(dir, "kubelet"), "--metrics-address", "", "--kubelet-registration-dir", "")
	cmd.Args = append(cmd.Args, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return cmd, sock, cmd.Start()
}

func waitReady(ctx context.Context, conn *grpc.ClientConn) error {
	id := csipb.NewIdentityClient(conn)
	for {
		r, err := id.Probe(ctx, &csipb.ProbeRequest{})
		if err == nil && r.GetReady().GetValue() {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (b *bench) publish(ctx context.Context, p *corev1.Pod, tok, target string) error {
	return b.publishVolume(ctx, p, tok, target, map[string]string{csi.AttrSecrets: secrets})
}

// publishVolume publishes with the given user attributes (the pod's and the token's are added).
func (b *bench) publishVolume(ctx context.Context, p *corev1.Pod, tok, target string, attrs map[string]string) error {
	return b.publishVia(ctx, b.node, p, tok, target, attrs)
}

// publishVia publishes through node.
func (b *bench) publishVia(ctx context.Context, node csipb.NodeClient, p *corev1.Pod, tok, target string, attrs map[string]string) error {
	tokens, _ := json.Marshal(map[string]map[string]string{"keyward": {"token": tok}})
	vc := map[string]string{csi.AttrTokens: string(tokens), csi.AttrPodName: p.Name,
		csi.AttrPodNamespace: p.Namespace, csi.AttrPodUID: string(p.UID), csi.AttrSAName: p.Spec.ServiceAccountName}
	for k, v := range attrs {
		vc[k] = v
	}
	_, err := node.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{
		VolumeId: "v-" + filepath.Base(filepath.Dir(target)) + "-" + string(p.UID), TargetPath: target, Readonly: true,
		VolumeCapability: &csipb.VolumeCapability{AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{}},
			AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY}},
		VolumeContext: vc,
	})
	return err
}

func (b *bench) login(ctx context.Context, jwt string) (string, error) {
	c, _ := b.vc.Clone()
	s, err := c.Logical().WriteWithContext(ctx, "auth/kubernetes/login", map[string]any{"role": "prod", "jwt": jwt})
	if err != nil {
		return "", err
	}
	return s.Auth.ClientToken, nil
}

func (b *bench) reads(ctx context.Context, token string) error {
	c, _ := b.vc.Clone()
	c.SetToken(token)
	for i := range 5 {
		if _, err := c.KVv2("kv").Get(ctx, fmt.Sprintf("prod/payments/s%d", i)); err != nil {
			return err
		}
	}
	return nil
}

func (b *bench) naive(ctx context.Context, w int) error {
	jwt := b.tokens[w]
	tr, err := b.env.Kube.Client.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{
		Spec: authenticationv1.TokenReviewSpec{Token: jwt, Audiences: []string{"keyward"}}}, metav1.CreateOptions{})
	if err != nil || !tr.Status.Authenticated {
		return fmt.Errorf("review: %v", err)
	}
	tok, err := b.login(ctx, jwt)
	if err != nil {
		return err
	}
	c, _ := b.vc.Clone()
	c.SetToken(tok)
	dir := filepath.Join(b.dir, "naive", strconv.Itoa(w))
	os.MkdirAll(dir, 0o700)
	for i := range 5 {
		s, err := c.KVv2("kv").Get(ctx, fmt.Sprintf("prod/payments/s%d", i))
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("s%d", i)), []byte(fmt.Sprint(s.Data["v"])), 0o400); err != nil {
			return err
		}
	}
	return nil
}

// procCPU is a process's user+system CPU time so far (0 if it cannot be read).
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command name (which may hold spaces) start after the last ')'.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * time.Second / 100 // USER_HZ is 100 on Linux
}

// procStatus returns the kB figures of /proc/PID/status (VmRSS, RssAnon, RssFile, ...).
func procStatus(pid int) map[string]int {
	out := map[string]int{}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return out
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) == 3 && f[2] == "kB" {
			n, _ := strconv.Atoi(f[1])
			out[strings.TrimSuffix(f[0], ":")] = n
		}
	}
	return out
}
