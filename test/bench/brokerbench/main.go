package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"go.uber.org/zap"
	authenticationv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/metadata"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/broker/policy"
	"github.com/keyward/keyward/broker/tokenreview"
	"github.com/keyward/keyward/broker/vault"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/test/harness"
)

const pol = `
environments: [{name: prod, vaultMount: kv, vaultPrefix: prod, vaultRole: prod}]
grants: [{namespace: payments, serviceAccount: api, paths: ["payments/*"]}]
`

func main() {
	n := flag.Int("n", 200, "requests per contender")
	flag.Parse()
	if err := run(*n); err != nil {
		fmt.Fprintln(os.Stderr, "brokerbench:", err)
		os.Exit(1)
	}
}

// (Over 60 lines: a measurement script: set-up, the alternating rounds and the report, read top to bottom.)
func run(n int) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	env, err := harness.StartEnv(ctx, harness.EnvOptions{Kube: true, Vault: true})
	if err != nil {
		return err
	}
	defer env.Stop()
	k, v := env.Kube, env.Vault
	if _, err := k.CreateNamespace(ctx, "payments", map[string]string{policy.EnvironmentLabel: "prod"}); err != nil {
		return err
	}
	if _, err := k.CreateServiceAccount(ctx, "payments", "api"); err != nil {
		return err
	}
	pod, err := k.CreatePod(ctx, "payments", "api-0", "api", "node-1")
	if err != nil {
		return err
	}
	jwt, err := k.PodToken(ctx, pod, []string{"keyward"}, time.Hour)
	if err != nil {
		return err
	}
	if err := v.EnableKVv2(ctx, "kv"); err != nil {
		return err
	}
	var refs []broker.SecretRef
	for i := range 5 {
		if _, err := v.PutKV(ctx, "kv", fmt.Sprintf("prod/payments/s%d", i), map[string]any{"v": "x"}); err != nil {
			return err
		}
		refs = append(refs, broker.SecretRef{Ref: fmt.Sprintf("payments/s%d", i), Key: "v"})
	}
	if err := v.KubernetesAuth(ctx, "kubernetes", k); err != nil {
		return err
	}
	if err := v.GrantEnvironment(ctx, "kubernetes", "kv", "prod", []string{"payments"}, []string{"api"}, "keyward"); err != nil {
		return err
	}
	p, err := policy.Parse([]byte(pol))
	if err != nil {
		return err
	}
	nsw := policy.NewNamespaceWatcher(metadata.NewForConfigOrDie(k.Config), 0)
	nsw.Start(ctx)
	nsw.WaitForSync(ctx)
	authz := policy.NewAuthorizer(p, nsw)
	keyFile := filepath.Join(env.Dir, "audit.key")
	os.WriteFile(keyFile, []byte(strings.Repeat("k", 32)), 0o600)
	aud, err := audit.Open(audit.Options{Dir: filepath.Join(env.Dir, "audit"), KeyFile: keyFile, Node: "bench", Stream: "broker", SyncInterval: time.Second})
	if err != nil {
		return err
	}
	defer aud.Close()
	vc, err := vault.NewClient(vault.ClientOptions{Address: v.Addr, AllowHTTP: true})
	if err != nil {
		return err
	}
	newSvc := func() (*broker.Service, error) {
		src, err := vault.New(vault.Options{Client: vc, Mode: vault.ModePod, Log: zap.NewNop()})
		if err != nil {
			return nil, err
		}
		reviewer, err := tokenreview.NewReviewer(k.Config)
		if err != nil {
			return nil, err
		}
		return broker.NewService(broker.Options{Authenticator: tokenreview.New(tokenreview.Options{Client: reviewer, CacheTTL: time.Hour}),
			Authorizer: authz, Source: src, Auditor: aud, Audiences: []string{"keyward"}})
	}
	warm, err := newSvc()
	if err != nil {
		return err
	}
	req := broker.Request{RequestID: "bench", Event: audit.EventFetch, Token: broker.Token(jwt), Claimed: broker.Identity{Namespace: "payments", PodName: "api-0"}, Refs: refs}
	direct := func() error {
		tr, err := k.Client.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{
			Spec: authenticationv1.TokenReviewSpec{Token: jwt, Audiences: []string{"keyward"}}}, metav1.CreateOptions{})
		if err != nil || !tr.Status.Authenticated {
			return fmt.Errorf("review: %v", err)
		}
		c, _ := vc.Clone()
		s, err := c.Logical().WriteWithContext(ctx, "auth/kubernetes/login", map[string]any{"role": "prod", "jwt": jwt})
		if err != nil {
			return err
		}
		c.SetToken(s.Auth.ClientToken)
		for i := range 5 {
			if _, err := c.KVv2("kv").Get(ctx, fmt.Sprintf("prod/payments/s%d", i)); err != nil {
				return err
			}
		}
		return nil
	}
	cold := func() error {
		s, err := newSvc()
		if err != nil {
			return err
		}
		_, err = s.Fetch(ctx, req)
		return err
	}
	warmF := func() error { _, err := warm.Fetch(ctx, req); return err }
	if err := warmF(); err != nil { // fill the warm caches
		return err
	}
	contenders := []struct {
		name string
		f    func() error
	}{{"direct", direct}, {"cold", cold}, {"warm", warmF}}
	lat := map[string][]time.Duration{}
	for i := range n {
		for j := range contenders {
			c := contenders[(i+j)%len(contenders)]
			t0 := time.Now()
			if err := c.f(); err != nil {
				return fmt.Errorf("%s: %w", c.name, err)
			}
			lat[c.name] = append(lat[c.name], time.Since(t0))
		}
	}
	pct := func(d []time.Duration, p float64) time.Duration {
		sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
		return d[int(p*float64(len(d)-1))]
	}
	fmt.Printf("brokerbench: %d requests each (5 secrets per request), alternating, real kube-apiserver and Vault\n\n", n)
	fmt.Printf("%-8s %10s %10s\n", "", "p50", "p99")
	for _, c := range contenders {
		fmt.Printf("%-8s %10s %10s\n", c.name, pct(lat[c.name], .5).Round(time.Microsecond), pct(lat[c.name], .99).Round(time.Microsecond))
	}
	d99, c99, w99 := pct(lat["direct"], .99), pct(lat["cold"], .99), pct(lat["warm"], .99)
	d50, c50 := pct(lat["direct"], .5), pct(lat["cold"], .5)
	fmt.Printf("\nwarm p99 / direct p99 = %.2f (target <= 1.5)\n", float64(w99)/float64(d99))
	fmt.Printf("cold p50 / direct p50 = %.2f, cold p99 / direct p99 = %.2f (target <= 1.2)\n", float64(c50)/float64(d50), float64(c99)/float64(d99))
	return nil
}
