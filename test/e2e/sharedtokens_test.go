package e2e

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	corev1 "k8s.io/api/core/v1"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/broker/policy"
	"github.com/keyward/keyward/broker/tokenreview"
	"github.com/keyward/keyward/broker/vault"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/test/harness"
)

// sharedPolicy has a second environment read with the same Vault role (only the environment differs) and grants two service accounts of payments-prod.
const sharedPolicy = `
environments:
  - {name: prod, vaultMount: kv, vaultPrefix: prod, vaultRole: ROLE}
  - {name: mirror, vaultMount: kv, vaultPrefix: mirror, vaultRole: ROLE}
grants:
  - {namespace: payments-prod, serviceAccount: api, paths: ["payments-prod/*"]}
  - {namespace: payments-prod, serviceAccount: worker, paths: ["payments-prod/*"]}
  - {namespace: other-prod, serviceAccount: api, paths: ["other-prod/*"]}
`

type discardAudit struct{}

func (discardAudit) Record(context.Context, audit.Event) error { return nil }

// mutableNamespaces is the namespaces' environments, changed by the test (a relabel).
type mutableNamespaces struct {
	mu  sync.Mutex
	env map[string]string
}

func (m *mutableNamespaces) EnvironmentOf(ns string) (string, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.env[ns]
	return e, ok, nil
}

func (m *mutableNamespaces) set(ns, env string) { m.mu.Lock(); m.env[ns] = env; m.mu.Unlock() }

// loginTokens lists the live kubernetes-auth Vault tokens as Vault's metadata names them:
// "namespace/service account/role", sorted. It fails if a token's metadata names a pod.
func loginTokens(t *testing.T, v *harness.Vault, pods ...*corev1.Pod) []string {
	t.Helper()
	list, err := v.Client.Logical().List("auth/token/accessors")
	if err != nil || list == nil {
		t.Fatalf("listing token accessors: %v", err)
	}
	keys, _ := list.Data["keys"].([]any)
	var out []string
	for _, k := range keys {
		l, err := v.Client.Logical().Write("auth/token/lookup-accessor", map[string]any{"accessor": k})
		if err != nil || l == nil {
			continue
		}
		if p, _ := l.Data["path"].(string); !strings.HasPrefix(p, "auth/kubernetes/login") {
			continue
		}
		md, _ := l.Data["meta"].(map[string]any)
		for _, val := range md {
			for _, p := range pods {
				if s := fmt.Sprint(val); s == p.Name || s == string(p.UID) {
					t.Fatalf("a shared Vault token's metadata names pod %s: %v", p.Name, md)
				}
			}
		}
		out = append(out, fmt.Sprintf("%v/%v/%v", md["service_account_namespace"], md["service_account_name"], md["role"]))
	}
	sort.Strings(out)
	return out
}

// Vault tokens per service account per node, against the real Vault and apiserver: pods of one
// service account share one login; another namespace, service account, Vault role or environment
// never shares it (a login of its own each, told apart by Vault's own metadata); the token is revoked
// when its last pod is released, not before; a token revoked behind the broker's back is replaced by
// exactly one login; Vault's metadata names the service account, never a pod.
func TestSharedVaultTokens(t *testing.T) {
	e := newBrokerEnv(t)
	ctx := context.Background()
	if _, err := e.kube.CreateServiceAccount(ctx, "payments-prod", "worker"); err != nil {
		t.Fatal(err)
	}
	if err := e.vault.KubernetesRole(ctx, "kubernetes", "prod-b", []string{"payments-prod"}, []string{"*"}, []string{"prod-read"}, audience); err != nil {
		t.Fatal(err)
	}
	if err := e.vault.PutEnvironmentPolicy(ctx, "kubernetes", "kv", "mirror"); err != nil {
		t.Fatal(err)
	}
	if err := e.vault.KubernetesRole(ctx, "kubernetes", "prod", []string{"payments-prod", "other-prod"}, []string{"*"}, []string{"prod-read", "mirror-read"}, audience); err != nil {
		t.Fatal(err)
	}
	if _, err := e.vault.PutKV(ctx, "kv", "mirror/payments-prod/db", map[string]any{"password": "mirrored"}); err != nil {
		t.Fatal(err)
	}
	a0 := e.pods["payments-prod"]
	a1 := e.newPod(t, "payments-prod", "api-1")
	w0, err := e.kube.CreatePod(ctx, "payments-prod", "worker-0", "worker", "node-1")
	if err != nil {
		t.Fatal(err)
	}
	o0 := e.pods["other-prod"]
	nss := &mutableNamespaces{env: map[string]string{"payments-prod": "prod", "other-prod": "prod"}}
	parse := func(role string) *policy.Policy {
		p, err := policy.Parse([]byte(strings.ReplaceAll(sharedPolicy, "ROLE", role)))
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	authz := policy.NewAuthorizer(parse("prod"), nss)
	core, logs := observer.New(zap.DebugLevel)
	var logins int
	var mu sync.Mutex
	vc, err := vault.NewClient(vault.ClientOptions{Address: e.vault.Addr, AllowHTTP: true, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	src, err := vault.New(vault.Options{Client: vc, Mode: vault.ModePod, Log: zap.New(core), Observe: func(op string, _ time.Duration, err error) {
		if op == "login" && err == nil {
			mu.Lock()
			logins++
			mu.Unlock()
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	reviewer, err := tokenreview.NewReviewer(e.kube.Config)
	if err != nil {
		t.Fatal(err)
	}
	svc, err := broker.NewService(broker.Options{Authenticator: tokenreview.New(tokenreview.Options{Client: reviewer}), Authorizer: authz,
		Source: src, Auditor: discardAudit{}, Audiences: []string{audience}, RefusalBurst: 1000})
	if err != nil {
		t.Fatal(err)
	}
	fetch := func(p *corev1.Pod) {
		t.Helper()
		tok, err := e.kube.PodToken(ctx, p, []string{audience}, 10*time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		secs, err := svc.Fetch(ctx, broker.Request{RequestID: "shared", Event: audit.EventFetch, Token: broker.Token(tok), Claimed: claimOf(p),
			Refs: []broker.SecretRef{{Ref: p.Namespace + "/db", Key: "password"}}})
		if err != nil || len(secs) != 1 {
			t.Fatalf("%s/%s: %v", p.Namespace, p.Name, err)
		}
	}
	want := func(why string, tokens ...string) {
		t.Helper()
		sort.Strings(tokens)
		eventually(t, 15*time.Second, why, func() error {
			if got := loginTokens(t, e.vault, a0, a1, w0, o0); strings.Join(got, " ") != strings.Join(tokens, " ") {
				return fmt.Errorf("live Vault tokens %v, want %v", got, tokens)
			}
			return nil
		})
	}
	release := func(p *corev1.Pod) {
		t.Helper()
		if revoke := svc.Release(string(p.UID)); revoke != nil {
			if err := revoke(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
	api, apiB, worker, other := "payments-prod/api/prod", "payments-prod/api/prod-b", "payments-prod/worker/prod", "other-prod/api/prod"

	fetch(a0)
	fetch(a1)
	fetch(a0)
	want("two pods of one service account share one login", api)
	if logins != 1 {
		t.Fatalf("%d logins for three fetches of one service account", logins)
	}
	fetch(o0)
	want("namespace boundary: another namespace logs in on its own", api, other)
	fetch(w0)
	want("service-account boundary: another service account logs in on its own", api, worker, other)
	nss.set("payments-prod", "mirror")
	fetch(a1)
	want("environment boundary: the same service account and role in another environment logs in on its own", api, api, worker, other)
	nss.set("payments-prod", "prod")
	authz.Set(parse("prod-b"))
	fetch(a1)
	want("role boundary: the same service account with another Vault role logs in on its own", api, api, apiB, worker, other)
	authz.Set(parse("prod"))
	if logins != 5 {
		t.Fatalf("%d logins, want one per (namespace, service account, role, environment): 5", logins)
	}

	// Release: a0 goes, a1 (same service account) still holds the shared token; the mirror and
	// prod-b tokens only a1 holds. a1 goes: every payments-prod/api token is revoked.
	release(a0)
	want("the first pod's release leaves the shared token to the second", api, api, apiB, worker, other)
	fetch(a1)
	if logins != 5 {
		t.Fatalf("the remaining pod logged in again (%d logins)", logins)
	}
	release(a1)
	want("the last pod's release revokes its service account's tokens", worker, other)

	// Revoked behind the broker's back: the next fetch finds out (Vault 403) and logs in exactly once.
	revokePodTokens(t, e.vault)
	want("all revoked")
	fetch(w0)
	want("a revoked cached token is replaced by one login", worker)
	if logins != 6 {
		t.Fatalf("%d logins after the revocation, want 6", logins)
	}
	release(w0)
	release(o0)
	want("every pod released")
	for _, le := range logs.All() {
		if strings.Contains(fmt.Sprint(le.Message, le.ContextMap()), "hvs.") {
			t.Fatalf("a Vault token reached the log: %s", le.Message)
		}
	}
}
