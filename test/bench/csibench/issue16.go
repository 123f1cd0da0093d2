package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	vaultapi "github.com/hashicorp/vault/api"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	provider "sigs.k8s.io/secrets-store-csi-driver/provider/v1alpha1"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/keyward/keyward/csi"
)

// Issue 16's two shapes, measured in the same run as the rest, alternating with their baselines:
//
//	deploy  300 new pods of 10 service accounts, new to the driver in each round, published at
//	        concurrency 8 (a Deployment's replicas starting together: 10 logins) vs the naive
//	        per-pod floor (TokenReview + login + 5 reads)
//	deploybroker  the same start (its own 300 pods and 10 service accounts) through a second driver
//	        in vault.mode broker: no login, the broker's own Vault token for every pod
//	poll    a Secrets Store rotation poll: the provider API re-mounting 300 live pods with fresh
//	        tokens at concurrency 8 vs the cached-token floor (TokenReview + 5 reads)
//
// Vault logins and TokenReviews per mount come from the driver's own metrics (TokenReviews by
// Vault during logins are one per login).
const (
	shapePods = 300
	shapeSAs  = 10
	shapeConc = 8
)

type shapes struct {
	b        *bench
	metrics  string // the driver's /metrics URL
	prov     provider.CSIDriverProviderClient
	live     []*corev1.Pod // the poll's live pods
	deploy   [][]*corev1.Pod
	dtokens  [][]string
	floorTok string
	// The same Deployment start through a second driver in vault.mode broker (its own Vault token
	// for every pod: no login), with pods and service accounts of its own.
	bdeploy  [][]*corev1.Pod
	btokens  [][]string
	bnode    csipb.NodeClient
	bdir     string
	bmetrics string
}

// provisionShapes creates the deploy pods (rounds x 300, 10 service accounts) and the poll's 300 live pods.
func (b *bench) provisionShapes(ctx context.Context, rounds int) (*shapes, error) {
	k := b.env.Kube
	s := &shapes{b: b}
	// Each deploy round and the live pods have service accounts of their own: a round's pods stay
	// published (their tokens cached) after it, so a later round sharing them would not start cold.
	sa := func(set string, i int) string { return fmt.Sprintf("sa-%s-%d", set, i%shapeSAs) }
	sets := []string{"live"}
	for r := range rounds {
		sets = append(sets, fmt.Sprint("r", r), fmt.Sprint("b", r))
	}
	for _, set := range sets {
		for i := range shapeSAs {
			if _, err := k.CreateServiceAccount(ctx, "payments", sa(set, i)); err != nil {
				return nil, err
			}
		}
	}
	fmt.Fprintf(os.Stderr, "csibench: creating %d deploy pods (pod and broker mode) and %d live pods\n", 2*rounds*shapePods, shapePods)
	newPods := func(prefix, set string) ([]*corev1.Pod, []string, error) {
		var pods []*corev1.Pod
		var toks []string
		for i := range shapePods {
			p, err := k.CreatePod(ctx, "payments", fmt.Sprintf("%s-%d", prefix, i), sa(set, i), "node-1")
			if err != nil {
				return nil, nil, err
			}
			tok, err := k.PodToken(ctx, p, []string{"keyward"}, time.Hour)
			if err != nil {
				return nil, nil, err
			}
			pods, toks = append(pods, p), append(toks, tok)
		}
		return pods, toks, nil
	}
	for r := range rounds {
		pods, toks, err := newPods(fmt.Sprint("deploy-", r), fmt.Sprint("r", r))
		if err != nil {
			return nil, err
		}
		s.deploy, s.dtokens = append(s.deploy, pods), append(s.dtokens, toks)
		if pods, toks, err = newPods(fmt.Sprint("bdeploy-", r), fmt.Sprint("b", r)); err != nil {
			return nil, err
		}
		s.bdeploy, s.btokens = append(s.bdeploy, pods), append(s.btokens, toks)
	}
	for i := range shapePods {
		p, err := k.CreatePod(ctx, "payments", fmt.Sprintf("live-%d", i), sa("live", i), "node-1")
		if err != nil {
			return nil, err
		}
		s.live = append(s.live, p)
	}
	return s, nil
}

// startBrokerMode starts the second driver, in vault.mode broker with a Vault token that reads the
// environment's KV tree (what deploy/vault's broker-mode policy grants), and returns its stop.
func (s *shapes) startBrokerMode(ctx context.Context) (func(), error) {
	v := s.b.env.Vault.Client
	if err := v.Sys().PutPolicyWithContext(ctx, "bench-broker-mode", `path "kv/data/prod/*" { capabilities = ["read"] }`); err != nil {
		return nil, err
	}
	sec, err := v.Auth().Token().CreateWithContext(ctx, &vaultapi.TokenCreateRequest{Policies: []string{"bench-broker-mode"}, TTL: "2h"})
	if err != nil {
		return nil, err
	}
	s.bdir = filepath.Join(s.b.dir, "broker-mode")
	if err := os.MkdirAll(s.bdir, 0o700); err != nil {
		return nil, err
	}
	tokFile := filepath.Join(s.bdir, "vault-token")
	if err := os.WriteFile(tokFile, []byte(sec.Auth.ClientToken), 0o600); err != nil {
		return nil, err
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	addr := l.Addr().String()
	l.Close()
	s.bmetrics = "http://" + addr + "/metrics"
	drv, sock, err := s.b.startDriverIn(s.bdir, ", mode: broker, tokenFile: "+tokFile, nil, "--metrics-address", addr)
	if err != nil {
		return nil, err
	}
	stop := func() { drv.Process.Signal(syscall.SIGTERM); drv.Wait() }
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		stop()
		return nil, err
	}
	if err := waitReady(ctx, conn); err != nil {
		stop()
		return nil, err
	}
	s.bnode = csipb.NewNodeClient(conn)
	return func() { conn.Close(); stop() }, nil
}

// countersAt reads a driver's Vault logins and TokenReviews from its /metrics.
func countersAt(url string) (logins, reviews float64) {
	resp, err := http.Get(url)
	if err != nil {
		return -1, -1
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		f := strings.Fields(l)
		if len(f) != 2 {
			continue
		}
		v, _ := strconv.ParseFloat(f[1], 64)
		switch {
		case strings.HasPrefix(l, "keyward_broker_vault_request_duration_seconds_count{") && strings.Contains(l, `op="login"`):
			logins += v
		case strings.HasPrefix(l, "keyward_broker_tokenreview_duration_seconds_count{"):
			reviews += v
		}
	}
	return logins, reviews
}

func (s *shapes) mount(ctx context.Context, p *corev1.Pod, tok string) error {
	tokens, _ := json.Marshal(map[string]map[string]string{"keyward": {"token": tok}})
	attrs, _ := json.Marshal(map[string]string{"secretProviderClass": "payments", csi.AttrSecrets: secrets, csi.AttrTokens: string(tokens),
		csi.AttrPodName: p.Name, csi.AttrPodNamespace: p.Namespace, csi.AttrPodUID: string(p.UID), csi.AttrSAName: p.Spec.ServiceAccountName})
	resp, err := s.prov.Mount(ctx, &provider.MountRequest{Attributes: string(attrs), TargetPath: "/ignored", Permission: "420"})
	if err == nil && len(resp.GetFiles()) != 5 {
		err = fmt.Errorf("%d files", len(resp.GetFiles()))
	}
	return err
}

// naiveRead is TokenReview + Vault login + 5 reads (no writes: the floor of a mount that logs in).
func (s *shapes) naive(ctx context.Context, jwt string) error {
	if err := s.review(ctx, jwt); err != nil {
		return err
	}
	tok, err := s.b.login(ctx, jwt)
	if err != nil {
		return err
	}
	return s.b.reads(ctx, tok)
}

func (s *shapes) review(ctx context.Context, jwt string) error {
	tr, err := s.b.env.Kube.Client.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{
		Spec: authenticationv1.TokenReviewSpec{Token: jwt, Audiences: []string{"keyward"}}}, metav1.CreateOptions{})
	if err != nil || !tr.Status.Authenticated {
		return fmt.Errorf("review: %v", err)
	}
	return nil
}

// runN runs op(i) for i in 0..n-1 at concurrency conc; it returns the elapsed time.
func runN(n, conc int, op func(i int) error) (time.Duration, error) {
	var next atomic.Int64
	var first error
	var mu sync.Mutex
	var wg sync.WaitGroup
	start := time.Now()
	for range conc {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				if err := op(i); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	return time.Since(start), first
}

// measureShapes runs rounds of the four contenders, alternating, and prints rates, ratios and the
// logins and reviews per mount.
func (s *shapes) measure(ctx context.Context, rounds int) error {
	// The live pods' first mounts (the pods' start) happen before the clock: the poll re-mounts them.
	// Their fresh tokens for each round are minted before the clock too.
	if _, err := runN(len(s.live), shapeConc, func(i int) error {
		tok, err := s.b.env.Kube.PodToken(ctx, s.live[i], []string{"keyward"}, time.Hour)
		if err != nil {
			return err
		}
		return s.mount(ctx, s.live[i], tok)
	}); err != nil {
		return fmt.Errorf("poll warm-up: %w", err)
	}
	type res struct {
		n               int
		el              time.Duration
		logins, reviews float64
	}
	results := map[string]*res{"deploy": {}, "deploybroker": {}, "naive": {}, "poll": {}, "cachedfloor": {}}
	order := []string{"deploy", "naive", "deploybroker", "poll", "cachedfloor"}
	for r := range rounds {
		fresh := make([]string, len(s.live))
		for i, p := range s.live {
			tok, err := s.b.env.Kube.PodToken(ctx, p, []string{"keyward"}, time.Hour)
			if err != nil {
				return err
			}
			fresh[i] = tok
		}
		for j := range order {
			name := order[(j+r)%len(order)]
			var op func(i int) error
			switch name {
			case "deploy":
				op = func(i int) error {
					p := s.deploy[r][i]
					return s.b.publish(ctx, p, s.dtokens[r][i], s.b.target(p, "deploy"))
				}
			case "deploybroker":
				op = func(i int) error {
					p := s.bdeploy[r][i]
					return s.b.publishVia(ctx, s.bnode, p, s.btokens[r][i], targetIn(s.bdir, p, "deploy"), map[string]string{csi.AttrSecrets: secrets})
				}
			case "naive":
				op = func(i int) error { return s.naive(ctx, s.dtokens[r][i]) }
			case "poll":
				op = func(i int) error { return s.mount(ctx, s.live[i], fresh[i]) }
			case "cachedfloor":
				op = func(i int) error {
					if err := s.review(ctx, fresh[i]); err != nil {
						return err
					}
					return s.b.reads(ctx, s.floorTok)
				}
			}
			url := s.metrics
			if name == "deploybroker" {
				url = s.bmetrics
			}
			l0, r0 := countersAt(url)
			el, err := runN(shapePods, shapeConc, op)
			if err != nil {
				return fmt.Errorf("%s round %d: %w", name, r, err)
			}
			l1, r1 := countersAt(url)
			rr := results[name]
			rr.n += shapePods
			rr.el += el
			if name == "deploy" || name == "poll" || name == "deploybroker" {
				rr.logins += l1 - l0
				rr.reviews += r1 - r0
			}
		}
	}
	rate := func(name string) float64 { return float64(results[name].n) / results[name].el.Seconds() }
	fmt.Printf("\nissue 16 shapes: %d pods of %d service accounts per round, concurrency %d, %d rounds\n", shapePods, shapeSAs, shapeConc, rounds)
	fmt.Printf("%-12s %8s %22s %26s\n", "", "mounts/s", "Vault logins/mount", "TokenReviews/mount")
	per := map[string]string{
		"naive":       fmt.Sprintf("%22s %26s", "1", "2 (own + Vault's)"),
		"cachedfloor": fmt.Sprintf("%22s %26s", "0", "1"),
	}
	names := append([]string(nil), order...)
	sort.Strings(names)
	for _, name := range names {
		rr := results[name]
		line, ok := per[name]
		if !ok {
			lg := rr.logins / float64(rr.n)
			line = fmt.Sprintf("%22.3f %26s", lg, fmt.Sprintf("%.3f (+%.3f Vault's)", rr.reviews/float64(rr.n), lg))
		}
		fmt.Printf("%-12s %8.1f %s\n", name, rate(name), line)
	}
	fmt.Printf("deploy/naive: %.2f (target >= 1.5); poll/cachedfloor: %.2f (target >= 0.9); broker mode: deploybroker/naive %.2f, deploy/deploybroker %.2f\n",
		rate("deploy")/rate("naive"), rate("poll")/rate("cachedfloor"), rate("deploybroker")/rate("naive"), rate("deploy")/rate("deploybroker"))
	return nil
}

// startProviderDriver restarts nothing: it dials the provider socket of the running driver.
func (s *shapes) dial(sock string) (*grpc.ClientConn, error) {
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	s.prov = provider.NewCSIDriverProviderClient(conn)
	return conn, nil
}
