package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	p11 "github.com/miekg/pkcs11"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"
	"k8s.io/kms/pkg/service"

	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/internal/grpcserver"
	"github.com/keyward/keyward/kms/kmstest"
	"github.com/keyward/keyward/kms/pkcs11"
	"github.com/keyward/keyward/kms/plugin"
	"github.com/keyward/keyward/test/harness"
)

// pairFunc does one encrypt+decrypt and returns the two latencies.
type pairFunc func(ctx context.Context) (time.Duration, time.Duration, error)

type contender struct {
	name string
	// worker returns a pairFunc for one concurrent worker.
	worker func() (pairFunc, func(), error)
}

type result struct {
	pairs   int
	elapsed time.Duration
	cpu     time.Duration // process CPU (user+system, all threads) while measuring
	allocs  uint64        // heap allocations of the process while measuring
	bytes   uint64
	lat     []time.Duration
}

var discardAudit = flag.Bool("discard-audit", false, "diagnosis: keyward without writing audit records (not a valid configuration)")

type nopAuditor struct{}

func (nopAuditor) Record(context.Context, audit.Event) error { return nil }

var only = flag.String("only", "", "measure only this contender (for profiling)")

var spin = flag.Duration("spin", 0, "CPU the ceiling contender burns per operation (default: the raw HSM's CPU per operation, measured at the start of the run)")

var concList = flag.String("conc", "1,8,32", "concurrency levels (the targets apply at 8 and 32)")

var sessions = flag.Int("sessions", 8, "keyward-kms pkcs11.maxSessions (the plugin's default is 8)")

func main() {
	dur := flag.Duration("duration", 700*time.Millisecond, "measuring time per contender, concurrency and round")
	rounds := flag.Int("rounds", 3, "rounds (contenders alternate in each)")
	cpuprofile := flag.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	flag.Parse()
	if *cpuprofile != "" {
		f, err := os.Create(*cpuprofile)
		if err == nil {
			pprof.StartCPUProfile(f)
			defer pprof.StopCPUProfile()
		}
	}
	if err := run(*dur, *rounds); err != nil {
		fmt.Fprintln(os.Stderr, "kmsbench:", err)
		pprof.StopCPUProfile()
		os.Exit(1)
	}
}

// (Over 60 lines: a measurement script: set-up, the alternating rounds and the report, read top to bottom.)
func run(dur time.Duration, rounds int) error {
	dir, err := harness.ShortTempDir("kw-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	hsm, err := harness.NewSoftHSM(dir, "bench")
	if err != nil {
		return err
	}
	os.Setenv("SOFTHSM2_CONF", hsm.ConfPath)
	cfg := pkcs11.Config{Module: hsm.Module, TokenLabel: hsm.TokenLabel, PINFile: hsm.PINFile, KeyLabel: "kek", MaxSessions: *sessions}
	a, err := pkcs11.OpenAdmin(cfg, hsm.UserPIN)
	if err != nil {
		return err
	}
	if _, err := a.Create(); err != nil {
		return err
	}
	a.Close()
	log := zap.NewNop()
	wrapper, err := pkcs11.New(cfg, hsm.UserPIN, log)
	if err != nil {
		return err
	}
	defer wrapper.Close()

	// keyward: the full stack as cmd/keyward-kms wires it.
	keyFile := filepath.Join(dir, "audit.key")
	os.WriteFile(keyFile, bytes.Repeat([]byte("k"), 32), 0o600)
	auditLog, err := audit.Open(audit.Options{Dir: filepath.Join(dir, "audit"), KeyFile: keyFile, Node: "bench", Stream: "kms", SyncInterval: time.Second})
	if err != nil {
		return err
	}
	defer auditLog.Close()
	metrics, err := plugin.NewMetrics(prometheus.NewRegistry(), wrapper)
	if err != nil {
		return err
	}
	var auditor audit.Auditor = auditLog
	if *discardAudit {
		auditor = nopAuditor{}
	}
	svc, err := plugin.NewService(plugin.ServiceOptions{Wrapper: wrapper, Auditor: auditor, Logger: log, HealthInterval: 10 * time.Second, Metrics: metrics})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go svc.Run(ctx)
	keywardSock, err := serve(ctx, filepath.Join(dir, "keyward.sock"), svc)
	if err != nil {
		return err
	}
	noopSock, err := serve(ctx, filepath.Join(dir, "noop.sock"), noop{m: kmstest.NewMemory()})
	if err != nil {
		return err
	}
	raw, err := newRaw(hsm, cfg)
	if err != nil {
		return err
	}
	defer raw.close()

	res := map[string]map[int]*result{}
	contenders := []contender{
		{"raw", raw.worker},
		{"no-op", grpcWorker(noopSock)},
		{"keyward", grpcWorker(keywardSock)},
	}
	// The ceiling: the no-op plugin burning, per operation, the CPU that one raw HSM operation costs
	// (measured now, single-threaded). No plugin that makes one HSM call per operation can beat it on
	// these shared cores, so it bounds what the keyward/no-op ratio can reach here.
	hsmCost := *spin
	if hsmCost == 0 {
		cal := &result{}
		if err := measure(ctx, contender{"raw", raw.worker}, 1, time.Second, cal); err != nil {
			return fmt.Errorf("calibrating: %w", err)
		}
		hsmCost = cal.cpuPerPair() / 2
	}
	ceilingSock, err := serve(ctx, filepath.Join(dir, "ceiling.sock"), noop{kmstest.NewMemory(), hsmCost})
	if err != nil {
		return err
	}
	contenders = append(contenders, contender{"ceiling", grpcWorker(ceilingSock)})
	// minimal: the no-op plugin's stack with one raw PKCS#11 call per operation in the handler, and
	// nothing else (no audit, metrics, health, recovery or generations): what the HSM costs in situ.
	minimal, err := raw.plugin(*sessions)
	if err != nil {
		return err
	}
	minimalSock, err := serve(ctx, filepath.Join(dir, "minimal.sock"), minimal)
	if err != nil {
		return err
	}
	contenders = append(contenders, contender{"minimal", grpcWorker(minimalSock)})
	var concs []int
	for _, f := range strings.Split(*concList, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return fmt.Errorf("-conc %q: want a list of positive integers", *concList)
		}
		concs = append(concs, n)
	}
	for _, c := range contenders {
		res[c.name] = map[int]*result{}
		for _, n := range concs {
			res[c.name][n] = &result{}
		}
	}
	fmt.Printf("kmsbench: %d rounds x %s per contender and concurrency, 32-byte payload, SoftHSM token\n", rounds, dur)
	fmt.Printf("ceiling = no-op + %s of CPU per operation (the raw HSM's CPU per operation)\n", hsmCost)
	for r := range rounds {
		for i := range contenders {
			c := contenders[(i+r)%len(contenders)] // rotate the order each round
			if *only != "" && c.name != *only {
				continue
			}
			for _, n := range concs {
				if err := measure(ctx, c, n, dur, res[c.name][n]); err != nil {
					return fmt.Errorf("%s at %d: %w", c.name, n, err)
				}
			}
		}
	}
	fmt.Printf("\n%-8s %5s %10s %10s %10s %10s %6s %12s\n", "", "conc", "pairs/s", "p50/op", "p99/op", "CPU/pair", "cores", "allocs/pair")
	for _, c := range contenders {
		for _, n := range concs {
			r := res[c.name][n]
			fmt.Printf("%-8s %5d %10.0f %10s %10s %10s %6.2f %5d %5dB\n", c.name, n, r.rate(), r.pct(0.50), r.pct(0.99),
				r.cpuPerPair(), r.cpu.Seconds()/r.elapsed.Seconds(), r.allocs/uint64(max(r.pairs, 1)), r.bytes/uint64(max(r.pairs, 1)))
		}
	}
	fmt.Printf("\n%5s %14s %14s %14s %12s %18s   %s\n", "conc", "keyward/no-op", "ceiling/no-op", "minimal/no-op", "keyward/raw", "p99 keyward/no-op", "targets (>=0.80, <=1.50)")
	for _, n := range concs {
		k, o, rw, ce, mi := res["keyward"][n], res["no-op"][n], res["raw"][n], res["ceiling"][n], res["minimal"][n]
		thr := k.rate() / o.rate()
		p99 := float64(k.pct(0.99)) / float64(o.pct(0.99))
		verdict := "-"
		if n >= 8 {
			verdict = fmt.Sprintf("throughput %s, p99 %s", mark(thr >= 0.8), mark(p99 <= 1.5))
		}
		fmt.Printf("%5d %14.2f %14.2f %14.2f %12.2f %18.2f   %s\n", n, thr, ce.rate()/o.rate(), mi.rate()/o.rate(), k.rate()/rw.rate(), p99, verdict)
	}
	return nil
}

func mark(ok bool) string {
	if ok {
		return "met"
	}
	return "MISSED"
}

func (r *result) rate() float64 { return float64(r.pairs) / r.elapsed.Seconds() }

// cpuPerPair is the whole process's CPU per pair: load generator, gRPC client and server, and the
// contender's own work, all on the same cores.
func (r *result) cpuPerPair() time.Duration {
	if r.pairs == 0 {
		return 0
	}
	return (r.cpu / time.Duration(r.pairs)).Round(100 * time.Nanosecond)
}

// processCPU is the user+system CPU time the process has used so far.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func (r *result) pct(p float64) time.Duration {
	if len(r.lat) == 0 {
		return 0
	}
	sort.Slice(r.lat, func(i, j int) bool { return r.lat[i] < r.lat[j] })
	return r.lat[int(p*float64(len(r.lat)-1))].Round(time.Microsecond)
}

func measure(ctx context.Context, c contender, n int, dur time.Duration, into *result) error {
	workers := make([]pairFunc, n)
	for i := range workers {
		f, closeFn, err := c.worker()
		if err != nil {
			return err
		}
		defer closeFn()
		workers[i] = f
		// warm up: sessions and connections are made before the clock starts
		if _, _, err := f(ctx); err != nil {
			return err
		}
	}
	var mu sync.Mutex
	var wg sync.WaitGroup
	var firstErr error
	stop := time.Now().Add(dur)
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	cpu0 := processCPU()
	start := time.Now()
	for _, f := range workers {
		wg.Go(func() {
			var lat []time.Duration
			pairs := 0
			for time.Now().Before(stop) {
				e, d, err := f(ctx)
				if err != nil {
					mu.Lock()
					firstErr = err
					mu.Unlock()
					return
				}
				lat = append(lat, e, d)
				pairs++
			}
			mu.Lock()
			into.pairs += pairs
			into.lat = append(into.lat, lat...)
			mu.Unlock()
		})
	}
	wg.Wait()
	into.elapsed += time.Since(start)
	into.cpu += processCPU() - cpu0
	runtime.ReadMemStats(&m1)
	into.allocs += m1.Mallocs - m0.Mallocs
	into.bytes += m1.TotalAlloc - m0.TotalAlloc
	return firstErr
}

func serve(ctx context.Context, path string, svc service.Service) (string, error) {
	l, err := grpcserver.Listen(path)
	if err != nil {
		return "", err
	}
	gs := grpcserver.NewServer(zap.NewNop(), nil)
	plugin.NewGRPCServer(svc).Register(gs)
	go grpcserver.Serve(ctx, gs, l, time.Second)
	return path, nil
}

// grpcWorker gives each worker its own connection, as separate apiserver replicas would have.
func grpcWorker(sock string) func() (pairFunc, func(), error) {
	return func() (pairFunc, func(), error) {
		conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return nil, nil, err
		}
		c := kmsapi.NewKeyManagementServiceClient(conn)
		seed := make([]byte, 32)
		rand.Read(seed)
		return func(ctx context.Context) (time.Duration, time.Duration, error) {
			t0 := time.Now()
			enc, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{Uid: "bench", Plaintext: seed})
			if err != nil {
				return 0, 0, err
			}
			t1 := time.Now()
			dec, err := c.Decrypt(ctx, &kmsapi.DecryptRequest{Uid: "bench", Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Annotations: enc.Annotations})
			if err != nil {
				return 0, 0, err
			}
			if !bytes.Equal(dec.Plaintext, seed) {
				return 0, 0, fmt.Errorf("round trip changed the payload")
			}
			return t1.Sub(t0), time.Since(t1), nil
		}, func() { conn.Close() }, nil
	}
}

// noop is the reference plugin: in-memory AES, no audit, no metrics, no HSM.
type noop struct {
	m *kmstest.Memory
	// spin burns this much CPU per operation: the ceiling contender's stand-in for an HSM call.
	spin time.Duration
}

func burn(d time.Duration) {
	for t := time.Now(); time.Since(t) < d; {
	}
}

func (n noop) Status(ctx context.Context) (*service.StatusResponse, error) {
	id, err := n.m.KeyID(ctx)
	return &service.StatusResponse{Version: "v2", Healthz: "ok", KeyID: id}, err
}

func (n noop) Encrypt(ctx context.Context, _ string, pt []byte) (*service.EncryptResponse, error) {
	burn(n.spin)
	ct, id, err := n.m.Wrap(ctx, pt)
	if err != nil {
		return nil, err
	}
	return &service.EncryptResponse{Ciphertext: ct, KeyID: id}, nil
}

func (n noop) Decrypt(ctx context.Context, _ string, req *service.DecryptRequest) ([]byte, error) {
	burn(n.spin)
	return n.m.Unwrap(ctx, req.Ciphertext, req.KeyID)
}

// raw drives the HSM directly: a session per worker and the same session-object copy of the token
// key that keyward-kms uses.
type rawHSM struct {
	p    *p11.Ctx
	slot uint
	key  p11.ObjectHandle
	own  p11.SessionHandle
}

func newRaw(h *harness.SoftHSM, cfg pkcs11.Config) (*rawHSM, error) {
	p := p11.New(h.Module)
	if err := p.Initialize(); err != nil && !strings.Contains(err.Error(), "ALREADY_INITIALIZED") {
		return nil, err
	}
	r := &rawHSM{p: p, slot: h.Slot}
	s, err := p.OpenSession(h.Slot, p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
	if err != nil {
		return nil, err
	}
	r.own = s
	if err := p.FindObjectsInit(s, []*p11.Attribute{p11.NewAttribute(p11.CKA_LABEL, cfg.KeyLabel+".1"), p11.NewAttribute(p11.CKA_TOKEN, true)}); err != nil {
		return nil, err
	}
	objs, _, err := p.FindObjects(s, 1)
	p.FindObjectsFinal(s)
	if err != nil || len(objs) != 1 {
		return nil, fmt.Errorf("raw: key not found: %v", err)
	}
	r.key, err = p.CopyObject(s, objs[0], []*p11.Attribute{p11.NewAttribute(p11.CKA_TOKEN, false)})
	return r, err
}

func (r *rawHSM) worker() (pairFunc, func(), error) {
	s, err := r.p.OpenSession(r.slot, p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
	if err != nil {
		return nil, nil, err
	}
	seed := make([]byte, 32)
	rand.Read(seed)
	aad := []byte("aad")
	return func(context.Context) (time.Duration, time.Duration, error) {
		iv := make([]byte, 12)
		rand.Read(iv)
		t0 := time.Now()
		ct, err := r.seal(s, iv, aad, seed)
		if err != nil {
			return 0, 0, err
		}
		t1 := time.Now()
		if _, err := r.open(s, iv, aad, ct); err != nil {
			return 0, 0, err
		}
		return t1.Sub(t0), time.Since(t1), nil
	}, func() { r.p.CloseSession(s) }, nil
}

// seal is one AES-GCM encryption inside the HSM, in session s, with the key copy.
func (r *rawHSM) seal(s p11.SessionHandle, iv, aad, pt []byte) ([]byte, error) {
	gp := p11.NewGCMParams(iv, aad, 128)
	defer gp.Free()
	if err := r.p.EncryptInit(s, []*p11.Mechanism{p11.NewMechanism(p11.CKM_AES_GCM, gp)}, r.key); err != nil {
		return nil, err
	}
	return r.p.Encrypt(s, pt)
}

// open is one AES-GCM decryption inside the HSM, in session s, with the key copy.
func (r *rawHSM) open(s p11.SessionHandle, iv, aad, ct []byte) ([]byte, error) {
	gp := p11.NewGCMParams(iv, aad, 128)
	defer gp.Free()
	if err := r.p.DecryptInit(s, []*p11.Mechanism{p11.NewMechanism(p11.CKM_AES_GCM, gp)}, r.key); err != nil {
		return nil, err
	}
	return r.p.Decrypt(s, ct)
}

var minimalAAD = []byte("minimal")

// minimalPlugin is a KMS v2 service doing one raw AES-GCM call per operation on a session pool.
type minimalPlugin struct {
	r        *rawHSM
	sessions chan p11.SessionHandle
}

func (r *rawHSM) plugin(n int) (*minimalPlugin, error) {
	m := &minimalPlugin{r: r, sessions: make(chan p11.SessionHandle, n)}
	for range n {
		s, err := r.p.OpenSession(r.slot, p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
		if err != nil {
			return nil, err
		}
		m.sessions <- s
	}
	return m, nil
}

func (m *minimalPlugin) Status(context.Context) (*service.StatusResponse, error) {
	return &service.StatusResponse{Version: "v2", Healthz: "ok", KeyID: "minimal"}, nil
}

func (m *minimalPlugin) Encrypt(_ context.Context, _ string, pt []byte) (*service.EncryptResponse, error) {
	s := <-m.sessions
	defer func() { m.sessions <- s }()
	iv := make([]byte, 12)
	rand.Read(iv)
	ct, err := m.r.seal(s, iv, minimalAAD, pt)
	if err != nil {
		return nil, err
	}
	return &service.EncryptResponse{Ciphertext: append(iv, ct...), KeyID: "minimal"}, nil
}

func (m *minimalPlugin) Decrypt(_ context.Context, _ string, req *service.DecryptRequest) ([]byte, error) {
	if len(req.Ciphertext) < 12+16 {
		return nil, fmt.Errorf("short ciphertext")
	}
	s := <-m.sessions
	defer func() { m.sessions <- s }()
	return m.r.open(s, req.Ciphertext[:12], minimalAAD, req.Ciphertext[12:])
}

func (r *rawHSM) close() {
	r.p.DestroyObject(r.own, r.key)
	r.p.CloseSession(r.own)
}
