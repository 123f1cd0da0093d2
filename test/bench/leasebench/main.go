package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	vaultapi "github.com/hashicorp/vault/api"
	"go.uber.org/zap"
	"k8s.io/client-go/metadata"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/broker/policy"
	"github.com/keyward/keyward/broker/tokenreview"
	"github.com/keyward/keyward/broker/vault"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/test/harness"
)

const pol = `
environments: [{name: prod, vaultMount: kv, vaultPrefix: prod, vaultRole: prod, pkiMount: pki-prod, databaseMount: database-prod}]
grants: [{namespace: payments, serviceAccount: api, pkiRoles: ["payments_web"], databaseRoles: ["payments_ro"]}]
issueBudgets: {pod: {burst: 100, perHour: 100}, namespace: {burst: 1000, perHour: 1000}}
`

func main() {
	pods := flag.Int("pods", 10, "pods, each with one volume (a certificate and database credentials)")
	republishes := flag.Int("republishes", 1000, "republishes in all, spread over the pods")
	flag.Parse()
	if err := run(*pods, *republishes); err != nil {
		fmt.Fprintln(os.Stderr, "leasebench:", err)
		os.Exit(1)
	}
}

// (Over 60 lines: a measurement script: set-up, the alternating rounds and the report, read top to bottom.)
func run(nPods, republishes int) error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	env, err := harness.StartEnv(ctx, harness.EnvOptions{Kube: true, Vault: true})
	if err != nil {
		return err
	}
	defer env.Stop()
	pgDir := filepath.Join(env.Dir, "postgres")
	if err := os.Mkdir(pgDir, 0o700); err != nil {
		return err
	}
	pg, err := harness.StartPostgres(ctx, pgDir)
	if err != nil {
		return err
	}
	defer pg.Stop()
	k, v := env.Kube, env.Vault
	if _, err := k.CreateNamespace(ctx, "payments", map[string]string{policy.EnvironmentLabel: "prod"}); err != nil {
		return err
	}
	if _, err := k.CreateServiceAccount(ctx, "payments", "api"); err != nil {
		return err
	}
	if _, err := v.EnablePKI(ctx, "pki-prod"); err != nil {
		return err
	}
	for _, f := range []func() error{
		func() error { return v.KubernetesAuth(ctx, "kubernetes", k) },
		func() error {
			return v.PKIRole(ctx, "pki-prod", "payments_web", []string{"payments.svc"}, 24*time.Hour)
		},
		func() error { return v.EnableDatabase(ctx, "database-prod", pg) },
		func() error { return v.DatabaseRole(ctx, "database-prod", "payments_ro", time.Hour, 24*time.Hour) },
		func() error { return v.PutDynamicPolicy(ctx, "kubernetes", "pki-prod", "database-prod", "prod") },
		func() error {
			return v.KubernetesRole(ctx, "kubernetes", "prod", []string{"payments"}, []string{"api"}, []string{"prod-dynamic"}, "keyward")
		},
	} {
		if err := f(); err != nil {
			return err
		}
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
	var keywardIssued atomic.Int64
	src, err := vault.New(vault.Options{Client: vc, Mode: vault.ModePod, Log: zap.NewNop(), Budget: authz.TakeIssues,
		Observe: func(op string, _ time.Duration, err error) {
			if op == "issue" && err == nil {
				keywardIssued.Add(1)
			}
		}})
	if err != nil {
		return err
	}
	reviewer, err := tokenreview.NewReviewer(k.Config)
	if err != nil {
		return err
	}
	svc, err := broker.NewService(broker.Options{Authenticator: tokenreview.New(tokenreview.Options{Client: reviewer, CacheTTL: time.Minute}),
		Authorizer: authz, Source: src, Leases: src, Auditor: aud, Audiences: []string{"keyward"}})
	if err != nil {
		return err
	}
	pkiReq := broker.PKIRequest{CommonName: "api.payments.svc"}
	refs := []broker.SecretRef{
		{Kind: broker.KindPKI, Ref: "payments_web", Key: "cert", PKI: pkiReq}, {Kind: broker.KindPKI, Ref: "payments_web", Key: "key", PKI: pkiReq},
		{Kind: broker.KindDatabase, Ref: "payments_ro", Key: "username"}, {Kind: broker.KindDatabase, Ref: "payments_ro", Key: "password"},
	}
	type podReq struct {
		keyward broker.Request
		jwt     string
	}
	var reqs []podReq
	for i := range nPods {
		pod, err := k.CreatePod(ctx, "payments", fmt.Sprintf("api-%d", i), "api", "node-1")
		if err != nil {
			return err
		}
		jwt, err := k.PodToken(ctx, pod, []string{"keyward"}, time.Hour)
		if err != nil {
			return err
		}
		reqs = append(reqs, podReq{jwt: jwt, keyward: broker.Request{RequestID: "bench", Event: audit.EventMount, Token: broker.Token(jwt),
			Claimed: broker.Identity{Namespace: "payments", PodName: pod.Name, PodUID: string(pod.UID)}, Refs: refs, Volume: "vol-" + string(pod.UID)}})
	}
	// The naive contender logs in with the pod's token once per pod (as a provider caches it) and
	// issues both credentials on every publish.
	naiveTokens := make([]string, nPods)
	var naiveIssued int64
	var naiveLeases []string
	naive := func(i int) error {
		c, err := vc.Clone()
		if err != nil {
			return err
		}
		if naiveTokens[i] == "" {
			s, err := c.Logical().WriteWithContext(ctx, "auth/kubernetes/login", map[string]any{"role": "prod", "jwt": reqs[i].jwt})
			if err != nil {
				return err
			}
			naiveTokens[i] = s.Auth.ClientToken
		}
		c.SetToken(naiveTokens[i])
		for _, call := range []func() (*vaultapi.Secret, error){
			func() (*vaultapi.Secret, error) {
				return c.Logical().WriteWithContext(ctx, "pki-prod/issue/payments_web", map[string]any{"common_name": "api.payments.svc"})
			},
			func() (*vaultapi.Secret, error) {
				return c.Logical().ReadWithContext(ctx, "database-prod/creds/payments_ro")
			},
		} {
			s, err := call()
			if err != nil {
				return err
			}
			naiveIssued++
			naiveLeases = append(naiveLeases, s.LeaseID)
		}
		return nil
	}
	keyward := func(i int) error {
		secs, err := svc.Fetch(ctx, reqs[i].keyward)
		for _, s := range secs {
			clear(s.Value)
		}
		return err
	}
	liveLeases := func() (int, error) {
		n := 0
		for _, prefix := range []string{"pki-prod/issue/payments_web/", "database-prod/creds/payments_ro/"} {
			s, err := v.Client.Logical().List("sys/leases/lookup/" + prefix)
			if err != nil {
				return 0, err
			}
			if s != nil {
				keys, _ := s.Data["keys"].([]any)
				n += len(keys)
			}
		}
		return n, nil
	}
	// First publishes: both contenders issue for every pod.
	for i := range nPods {
		if err := keyward(i); err != nil {
			return fmt.Errorf("keyward first publish: %w", err)
		}
		if err := naive(i); err != nil {
			return fmt.Errorf("naive first publish: %w", err)
		}
	}
	firstK, firstN := keywardIssued.Load(), naiveIssued
	lat := map[string][]time.Duration{}
	for r := range republishes {
		i := r % nPods
		order := []string{"keyward", "naive"}
		if r%2 == 1 {
			order = []string{"naive", "keyward"}
		}
		for _, name := range order {
			t0 := time.Now()
			var err error
			if name == "keyward" {
				err = keyward(i)
			} else {
				err = naive(i)
			}
			if err != nil {
				return fmt.Errorf("%s republish %d: %w", name, r, err)
			}
			lat[name] = append(lat[name], time.Since(t0))
		}
	}
	live, err := liveLeases()
	if err != nil {
		return err
	}
	pct := func(d []time.Duration, p float64) time.Duration {
		sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
		return d[int(p*float64(len(d)-1))]
	}
	kRe, nRe := keywardIssued.Load()-firstK, naiveIssued-firstN
	fmt.Printf("leasebench: %d pods, one volume each (a certificate + database credentials), %d republishes in all, alternating; real kube-apiserver, Vault (pki, database) and PostgreSQL\n\n", nPods, republishes)
	fmt.Printf("%-8s %14s %22s %10s %10s\n", "", "first publish", "per 1000 republishes", "p50", "p99")
	fmt.Printf("%-8s %14d %22.0f %10s %10s\n", "keyward", firstK, float64(kRe)*1000/float64(republishes), pct(lat["keyward"], .5).Round(time.Microsecond), pct(lat["keyward"], .99).Round(time.Microsecond))
	fmt.Printf("%-8s %14d %22.0f %10s %10s\n", "naive", firstN, float64(nRe)*1000/float64(republishes), pct(lat["naive"], .5).Round(time.Microsecond), pct(lat["naive"], .99).Round(time.Microsecond))
	fmt.Printf("\nleases issued per 1000 republishes: keyward %d, naive %d (goal for keyward: 0 outside the renewal window)\n", kRe*1000/int64(republishes), nRe*1000/int64(republishes))
	fmt.Printf("live leases at Vault after the run: %d (keyward's %d + the naive contender's %d)\n", live, firstK+kRe, len(naiveLeases))
	fmt.Printf("republish p50 keyward / naive = %.2f\n", float64(pct(lat["keyward"], .5))/float64(pct(lat["naive"], .5)))
	// Leave nothing behind: the naive leases by ID, keyward's through its volumes.
	for _, id := range naiveLeases {
		v.Client.Sys().RevokeWithContext(ctx, id)
	}
	for _, r := range reqs {
		if revoke := svc.ReleaseVolume(r.keyward.Volume); revoke != nil {
			if err := revoke(ctx); err != nil {
				return err
			}
		}
	}
	if live, err = liveLeases(); err != nil || live != 0 {
		return fmt.Errorf("leases left at Vault after revoking every volume's: %d (%v)", live, err)
	}
	fmt.Println("after releasing every volume: 0 leases left at Vault")
	return nil
}
