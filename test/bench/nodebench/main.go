package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/keyward/keyward/broker/policy"
	"github.com/keyward/keyward/csi"
	"github.com/keyward/keyward/test/harness"
	"github.com/keyward/keyward/test/realnode"
)

const (
	benchNS  = "bench"
	audience = "keyward"
)

type bench struct {
	env    *harness.Env
	node   *harness.Node
	dir    string
	client kubernetes.Interface // admin, without client-side rate limits
	pause  string               // the pause image's reference: the pods' container
	broker int                  // the broker container's pid
	procs  []proc
}

type proc struct {
	name string
	pid  int
}

// phase is one measurement: n pods of one volume kind, created together, Running, deleted.
type phase struct {
	kind     string // secret or emptyDir
	allUp    time.Duration
	firstUp  time.Duration // until the first pod was Running
	p50, p99 time.Duration
	gone     time.Duration
	cpu      map[string]float64 // CPU seconds from the first create until all Running, by process
	rssMiB   float64            // the broker's VmHWM over the phase
	reqs     map[string]float64 // apiserver requests from the first create until all Running, by verb resource
	reqsDel  float64            // apiserver requests of the deletion
	broker   map[string]float64 // the broker's own counters until all Running: publishes by result, TokenReviews, Vault logins
}

var errSkip = errors.New("skipped")

func main() {
	pods := flag.Int("pods", 200, "pods per phase")
	rounds := flag.Int("rounds", 2, "rounds of secret and emptyDir phases (alternating)")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	err := run(ctx, *pods, *rounds)
	if errors.Is(err, errSkip) {
		fmt.Println("nodebench:", err)
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "nodebench:", err)
		os.Exit(1)
	}
}

// (Over 60 lines: a measurement script: set-up, the alternating phases and the report, top to bottom.)
func run(ctx context.Context, pods, rounds int) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("%w: needs root (a real node: containerd, runc, kubelet)", errSkip)
	}
	for _, c := range []string{"kubelet", "kube-controller-manager", "kube-scheduler"} {
		if _, err := harness.Binary(c); err != nil {
			return fmt.Errorf("%w: %v", errSkip, err)
		}
	}
	for _, f := range []string{"/usr/bin/containerd", "/usr/sbin/runc", "/usr/lib/cni/bridge"} {
		if _, err := os.Stat(f); err != nil {
			return fmt.Errorf("%w: the node runtime is not installed (%s): run `make deps`", errSkip, f)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, 90*time.Minute)
	defer cancel()
	repo, err := harness.RepoFile(".")
	if err != nil {
		return err
	}
	env, err := harness.StartEnv(ctx, harness.EnvOptions{Kube: true, Vault: true})
	if err != nil {
		return err
	}
	defer env.Stop()
	b := &bench{env: env, dir: env.Dir}
	start := time.Now()
	img, err := realnode.BuildImages(ctx, repo, filepath.Join(env.Dir, "images"), "", "keyward-broker", "pause")
	if err != nil {
		return err
	}
	b.pause = img["pause"].Ref
	fmt.Printf("images built in %s\n", time.Since(start).Round(100*time.Millisecond))
	if err := b.provision(ctx); err != nil {
		return err
	}
	nodeDir := filepath.Join(env.Dir, "node")
	if err := os.MkdirAll(nodeDir, 0o700); err != nil {
		return err
	}
	fmt.Println("waiting for the machine's node lock and starting the node...")
	start = time.Now()
	b.node, err = harness.StartNode(ctx, nodeDir, harness.NodeOptions{Kube: env.Kube, PauseImage: img["pause"].Tar,
		Images: []string{img["keyward-broker"].Tar}, MaxPods: pods + 50, KubeletRootDir: "/var/lib/kubelet"})
	if err != nil {
		return err
	}
	defer b.node.Stop()
	fmt.Printf("node Ready in %s (%s with the wait for the lock)\n", b.node.StartTime.Round(100*time.Millisecond), time.Since(start).Round(time.Second))
	cfg := rest.CopyConfig(env.Kube.Config)
	cfg.QPS, cfg.Burst = 1000, 1000
	if b.client, err = kubernetes.NewForConfig(cfg); err != nil {
		return err
	}
	// The broker as the real-node e2e deploys it: deploy/overlays/dev, patched for this machine.
	cluster := &realnode.Cluster{Repo: repo, Etcd: env.Etcd, Kube: env.Kube, Vault: env.Vault, Node: b.node, HostDir: env.Dir}
	pod, err := cluster.DeployBroker(ctx, benchPolicy, nil, nil)
	if err != nil {
		return err
	}
	if b.broker, err = realnode.ContainerPid(pod, "broker", "keyward-broker"); err != nil {
		return err
	}
	pids := b.node.Pids()
	b.procs = []proc{{"broker", b.broker}, {"kubelet", pids["kubelet"]}, {"containerd", pids["containerd"]},
		{"apiserver", env.Kube.Pid()}, {"etcd", env.Etcd.Pid()}, {"vault", env.Vault.Pid()}}
	fmt.Printf("broker deployed (pid %d); %d pods per phase, %d rounds\n\n", b.broker, pods, rounds)
	var results []phase
	for r := range rounds {
		kinds := []string{"secret", "emptyDir"}
		if r%2 == 1 {
			kinds = []string{"emptyDir", "secret"}
		}
		for _, k := range kinds {
			p, err := b.phase(ctx, k, fmt.Sprintf("r%d", r+1), pods)
			if err != nil {
				return err
			}
			p.print(pods)
			results = append(results, p)
		}
	}
	report(results, pods)
	return nil
}

// provision: KV v2 with the pods' secret, Vault's kubernetes auth against the apiserver, the prod
// role for the bench namespace, and the namespace (labelled prod) with its api service account.
func (b *bench) provision(ctx context.Context) error {
	v, k := b.env.Vault, b.env.Kube
	if err := v.EnableKVv2(ctx, "kv"); err != nil {
		return err
	}
	if _, err := v.PutKV(ctx, "kv", "prod/bench/db", map[string]any{"password": "bench-db-password"}); err != nil {
		return err
	}
	if err := v.KubernetesAuth(ctx, "kubernetes", k); err != nil {
		return err
	}
	if err := v.GrantEnvironment(ctx, "kubernetes", "kv", "prod", []string{benchNS}, []string{"*"}, audience); err != nil {
		return err
	}
	if _, err := k.CreateNamespace(ctx, benchNS, map[string]string{policy.EnvironmentLabel: "prod"}); err != nil {
		return err
	}
	_, err := k.CreateServiceAccount(ctx, benchNS, "api")
	return err
}

// pod is one of a phase's pods: the pause image, the volume at /data read-only.
func (b *bench) pod(kind, set string, i int) *corev1.Pod {
	vol := corev1.Volume{Name: "data"}
	if kind == "secret" {
		readOnly := true
		vol.CSI = &corev1.CSIVolumeSource{Driver: csi.DriverName, ReadOnly: &readOnly,
			VolumeAttributes: map[string]string{"secrets": "- ref: bench/db\n  key: password\n  file: db-password\n"}}
	} else {
		vol.EmptyDir = &corev1.EmptyDirVolumeSource{}
	}
	grace := int64(1)
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("%s-%03d", set, i), Namespace: benchNS, Labels: map[string]string{"set": set}},
		Spec: corev1.PodSpec{
			ServiceAccountName:            "api",
			TerminationGracePeriodSeconds: &grace,
			Volumes:                       []corev1.Volume{vol},
			Containers: []corev1.Container{{Name: "app", Image: b.pause, ImagePullPolicy: corev1.PullNever,
				VolumeMounts: []corev1.VolumeMount{{Name: "data", MountPath: "/data", ReadOnly: true}}}},
		},
	}
}

// (Over 60 lines: one phase in the order it happens: samples, creates, the watch until all Running,
// samples, the deletion.)
func (b *bench) phase(ctx context.Context, kind, round string, n int) (phase, error) {
	set := strings.ToLower(round + "-" + kind)
	res := phase{kind: kind}
	pods := b.client.CoreV1().Pods(benchNS)
	sel := metav1.ListOptions{LabelSelector: "set=" + set}
	w, err := pods.Watch(ctx, sel)
	if err != nil {
		return res, err
	}
	defer func() { w.Stop() }()
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", b.broker), []byte("5"), 0); err != nil {
		return res, fmt.Errorf("resetting the broker's VmHWM: %w", err)
	}
	reqs0, err := b.requests(ctx)
	if err != nil {
		return res, err
	}
	cpu0 := b.cpu()
	brk0 := brokerCounters(ctx)
	start := time.Now()
	created := make([]time.Time, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	sem := make(chan struct{}, 32)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			created[i] = time.Now()
			if _, err := pods.Create(ctx, b.pod(kind, set, i), metav1.CreateOptions{}); err != nil {
				errs <- err
			}
		}()
	}
	running := map[string]time.Time{}
	see := func(p *corev1.Pod) {
		if _, seen := running[p.Name]; !seen && p.Status.Phase == corev1.PodRunning {
			running[p.Name] = time.Now()
		}
	}
	deadline := time.After(15 * time.Minute)
	for len(running) < n {
		select {
		case err := <-errs:
			return res, fmt.Errorf("creating a pod: %w", err)
		case <-deadline:
			return res, fmt.Errorf("%s: %d of %d pods Running after 15m", set, len(running), n)
		case <-ctx.Done():
			return res, ctx.Err()
		case ev, ok := <-w.ResultChan():
			if !ok || ev.Type == watch.Error {
				// The watch ended (the apiserver closes watches, or it errored): list what is Running
				// now and watch again from the list.
				w.Stop()
				if ok {
					fmt.Fprintf(os.Stderr, "nodebench: the pods' watch: %v; watching again\n", ev.Object)
				}
				l, err := pods.List(ctx, sel)
				if err != nil {
					return res, err
				}
				for i := range l.Items {
					see(&l.Items[i])
				}
				o := sel
				o.ResourceVersion = l.ResourceVersion
				if w, err = pods.Watch(ctx, o); err != nil {
					return res, err
				}
				continue
			}
			if p, isPod := ev.Object.(*corev1.Pod); isPod && (ev.Type == watch.Added || ev.Type == watch.Modified) {
				see(p)
			}
		}
	}
	res.allUp = time.Since(start)
	cpu1 := b.cpu()
	wg.Wait()
	reqs1, err := b.requests(ctx)
	if err != nil {
		return res, err
	}
	res.rssMiB = float64(procStatus(b.broker)["VmHWM"]) / 1024
	res.broker = map[string]float64{}
	for k, v := range brokerCounters(ctx) {
		res.broker[k] = v - brk0[k]
	}
	var lat []time.Duration
	for i := range n {
		lat = append(lat, running[fmt.Sprintf("%s-%03d", set, i)].Sub(created[i]))
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	res.firstUp = res.allUp
	for _, t := range running {
		res.firstUp = min(res.firstUp, t.Sub(start))
	}
	res.p50, res.p99 = lat[len(lat)/2], lat[(len(lat)*99)/100]
	res.cpu = map[string]float64{}
	for i, p := range b.procs {
		res.cpu[p.name] = cpu1[i] - cpu0[i]
	}
	res.reqs = map[string]float64{}
	for k, v := range reqs1 {
		if d := v - reqs0[k]; d > 0 {
			res.reqs[k] = d
		}
	}
	// Deletion: kubelet tears each pod down (unpublish or emptyDir removal) before the object goes.
	start = time.Now()
	grace := int64(1)
	if err := pods.DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: &grace}, sel); err != nil {
		return res, err
	}
	if err := realnode.Poll(ctx, 15*time.Minute, set+" pods gone", func() error {
		l, err := pods.List(ctx, sel)
		if err != nil {
			return err
		}
		if len(l.Items) > 0 {
			return fmt.Errorf("%d pods left", len(l.Items))
		}
		return nil
	}); err != nil {
		return res, err
	}
	res.gone = time.Since(start)
	reqs2, err := b.requests(ctx)
	if err != nil {
		return res, err
	}
	for k, v := range reqs2 {
		res.reqsDel += v - reqs1[k]
	}
	return res, nil
}

// cpu reads utime+stime of each process in seconds (the kernel's USER_HZ is 100).
func (b *bench) cpu() []float64 {
	out := make([]float64, len(b.procs))
	for i, p := range b.procs {
		raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.pid))
		if err != nil {
			continue
		}
		s := string(raw)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
		ut, _ := strconv.ParseFloat(f[11], 64)
		st, _ := strconv.ParseFloat(f[12], 64)
		out[i] = (ut + st) / 100
	}
	return out
}

// procStatus is /proc/PID/status's kB fields.
func procStatus(pid int) map[string]int64 {
	out := map[string]int64{}
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return out
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if fs := strings.Fields(v); ok && len(fs) == 2 && fs[1] == "kB" {
			out[k], _ = strconv.ParseInt(fs[0], 10, 64)
		}
	}
	return out
}

// requests scrapes the apiserver's apiserver_request_total, summed by "verb resource[/subresource]".
func (b *bench) requests(ctx context.Context) (map[string]float64, error) {
	raw, err := b.client.CoreV1().RESTClient().Get().AbsPath("/metrics").DoRaw(ctx)
	if err != nil {
		return nil, fmt.Errorf("apiserver /metrics: %w", err)
	}
	out := map[string]float64{}
	for _, l := range strings.Split(string(raw), "\n") {
		rest, ok := strings.CutPrefix(l, "apiserver_request_total{")
		if !ok {
			continue
		}
		i := strings.LastIndexByte(rest, '}')
		if i < 0 {
			continue
		}
		labels := map[string]string{}
		for _, kv := range strings.Split(rest[:i], ",") {
			if k, v, ok := strings.Cut(kv, "="); ok {
				labels[k] = strings.Trim(v, `"`)
			}
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(rest[i+1:]), 64)
		if err != nil {
			continue
		}
		key := labels["verb"] + " " + labels["resource"]
		if labels["subresource"] != "" {
			key += "/" + labels["subresource"]
		}
		if labels["resource"] == "" {
			key = labels["verb"] + " (non-resource)"
		}
		out[key] += v
	}
	return out, nil
}

// brokerCounters reads the broker's /metrics on its loopback metrics address (the DaemonSet's pod is
// on the host's network here): publishes by result, TokenReviews and Vault logins. Empty if it does
// not answer.
func brokerCounters(ctx context.Context) map[string]float64 {
	out := map[string]float64{}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://127.0.0.1:9465/metrics", nil)
	if err != nil {
		return out
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return out
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		name, val, ok := strings.Cut(sc.Text(), " ")
		v, err := strconv.ParseFloat(val, 64)
		if !ok || err != nil {
			continue
		}
		switch {
		case strings.HasPrefix(name, "keyward_broker_publishes_total{") && strings.Contains(name, `result="published"`):
			out["published"] += v
		case strings.HasPrefix(name, "keyward_broker_publishes_total{") && strings.Contains(name, `result="republished"`):
			out["republished"] += v
		case strings.HasPrefix(name, "keyward_broker_tokenreview_duration_seconds_count"):
			out["tokenreviews"] += v
		case strings.HasPrefix(name, "keyward_broker_vault_request_duration_seconds_count") && strings.Contains(name, `op="login"`):
			out["logins"] += v
		}
	}
	return out
}

func total(m map[string]float64) float64 {
	s := 0.0
	for _, v := range m {
		s += v
	}
	return s
}

func (p phase) print(n int) {
	fmt.Printf("%-8s all %d Running in %6.1f s (the first after %.1f s; per pod create→Running p50 %.1f s, p99 %.1f s); all gone %.1f s after the delete\n",
		p.kind, n, p.allUp.Seconds(), p.firstUp.Seconds(), p.p50.Seconds(), p.p99.Seconds(), p.gone.Seconds())
	fmt.Printf("         CPU ms per pod:")
	for _, k := range []string{"broker", "kubelet", "containerd", "apiserver", "etcd", "vault"} {
		fmt.Printf(" %s %.1f", k, 1000*p.cpu[k]/float64(n))
	}
	fmt.Printf("; broker VmHWM %.1f MiB\n", p.rssMiB)
	if p.kind == "secret" {
		fmt.Printf("         broker per pod: %.2f publishes, %.2f republishes, %.2f TokenReviews, %.2f Vault logins\n",
			p.broker["published"]/float64(n), p.broker["republished"]/float64(n), p.broker["tokenreviews"]/float64(n), p.broker["logins"]/float64(n))
	}
	fmt.Printf("         apiserver requests per pod: %.1f to Running (%.1f for the deletion):", total(p.reqs)/float64(n), p.reqsDel/float64(n))
	keys := make([]string, 0, len(p.reqs))
	for k := range p.reqs {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return p.reqs[keys[i]] > p.reqs[keys[j]] })
	for _, k := range keys {
		if p.reqs[k] >= float64(n)/10 {
			fmt.Printf(" %s %.2f;", k, p.reqs[k]/float64(n))
		}
	}
	fmt.Println()
}

// report prints each round's ratio secret/emptyDir and the medians over rounds.
func report(results []phase, n int) {
	fmt.Println("\n== secret / emptyDir, by round (time to all Running; p50; apiserver requests per pod to Running)")
	var ratios []float64
	for i := 0; i+1 < len(results); i += 2 {
		s, e := results[i], results[i+1]
		if s.kind != "secret" {
			s, e = e, s
		}
		r := s.allUp.Seconds() / e.allUp.Seconds()
		ratios = append(ratios, r)
		fmt.Printf("round %d: %.1f s / %.1f s = %.2fx; p50 %.1f / %.1f s; requests %.1f / %.1f per pod; broker CPU %.1f ms per pod, VmHWM %.1f MiB\n",
			i/2+1, s.allUp.Seconds(), e.allUp.Seconds(), r, s.p50.Seconds(), e.p50.Seconds(),
			total(s.reqs)/float64(n), total(e.reqs)/float64(n), 1000*s.cpu["broker"]/float64(n), s.rssMiB)
	}
	sort.Float64s(ratios)
	if len(ratios) > 0 {
		fmt.Printf("ratio secret/emptyDir time to all %d Running: %.2f–%.2f over %d rounds\n", n, ratios[0], ratios[len(ratios)-1], len(ratios))
	}
}
