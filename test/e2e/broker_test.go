package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/metadata"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/broker/policy"
	"github.com/keyward/keyward/broker/tokenreview"
	"github.com/keyward/keyward/broker/vault"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/internal/fault"
	"github.com/keyward/keyward/test/harness"
)

const (
	prodCanary = "CANARY-prod-db-password-51c2"
	devValue   = "dev-db-password"
	audience   = "keyward"
)

const brokerPolicy = `
environments:
  - name: prod
    vaultMount: kv
    vaultPrefix: prod
    vaultRole: prod
  - name: dev
    vaultMount: kv
    vaultPrefix: dev
    vaultRole: dev
grants:
  - namespace: payments-prod
    serviceAccount: api
    paths: ["payments-prod/*", "shared/tls/*"]
  - namespace: payments-dev
    serviceAccount: api
    paths: ["payments-dev/*"]
  - namespace: nolabel
    serviceAccount: "*"
    paths: ["nolabel/*"]
`

// provisionVault lays out KV v2 per environment, Vault policies and kubernetes-auth roles that match
// the broker's scoping: Vault is the second check.
func provisionVault(t *testing.T, v *harness.Vault, k *harness.KubeAPIServer) {
	t.Helper()
	ctx := context.Background()
	if err := v.EnableKVv2(ctx, "kv"); err != nil {
		t.Fatal(err)
	}
	for path, val := range map[string]string{
		"prod/payments-prod/db": prodCanary, "dev/payments-dev/db": devValue,
		"prod/payments-dev/only-in-prod": prodCanary + "-2", "prod/shared/tls/ca": "ca-pem",
		"prod/other-prod/db": prodCanary + "-3",
	} {
		if _, err := v.PutKV(ctx, "kv", path, map[string]any{"password": val}); err != nil {
			t.Fatal(err)
		}
	}
	for env := range map[string]bool{"prod": true, "dev": true} {
		if err := v.Client.Sys().PutPolicyWithContext(ctx, env+"-read", fmt.Sprintf(`path "kv/data/%s/*" { capabilities = ["read"] }`, env)); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.KubernetesAuth(ctx, "kubernetes", k); err != nil {
		t.Fatal(err)
	}
	if err := v.KubernetesRole(ctx, "kubernetes", "prod", []string{"payments-prod", "other-prod"}, []string{"*"}, []string{"prod-read"}, audience); err != nil {
		t.Fatal(err)
	}
	if err := v.KubernetesRole(ctx, "kubernetes", "dev", []string{"payments-dev"}, []string{"*"}, []string{"dev-read"}, audience); err != nil {
		t.Fatal(err)
	}
}

type brokerEnv struct {
	kube     *harness.KubeAPIServer
	vault    *harness.Vault
	svc      *broker.Service
	auth     *tokenreview.Authenticator
	auditLog string
	auditKey string
	logs     *observer.ObservedLogs
	pods     map[string]*corev1.Pod
}

func newBrokerEnv(t *testing.T) *brokerEnv {
	t.Helper()
	kube := harness.KubeT(t, harness.KubeOptions{})
	v := harness.VaultT(t)
	ctx := context.Background()
	e := &brokerEnv{kube: kube, vault: v, pods: map[string]*corev1.Pod{}}
	for ns, env := range map[string]string{"payments-prod": "prod", "payments-dev": "dev", "other-prod": "prod", "nolabel": ""} {
		labels := map[string]string{}
		if env != "" {
			labels[policy.EnvironmentLabel] = env
		}
		if _, err := kube.CreateNamespace(ctx, ns, labels); err != nil {
			t.Fatal(err)
		}
		if _, err := kube.CreateServiceAccount(ctx, ns, "api"); err != nil {
			t.Fatal(err)
		}
		pod, err := kube.CreatePod(ctx, ns, "api-0", "api", "node-1")
		if err != nil {
			t.Fatal(err)
		}
		e.pods[ns] = pod
	}
	provisionVault(t, v, kube)

	dir := harness.Dir(t)
	e.auditLog, e.auditKey = filepath.Join(dir, "audit.log"), filepath.Join(dir, "audit.key")
	os.WriteFile(e.auditKey, []byte(strings.Repeat("z", 40)), 0o600)
	auditor, err := audit.Open(audit.Options{Path: e.auditLog, KeyFile: e.auditKey})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { auditor.Close() })
	pol, err := policy.Parse([]byte(brokerPolicy))
	if err != nil {
		t.Fatal(err)
	}
	nsw := policy.NewNamespaceWatcher(metadata.NewForConfigOrDie(kube.Config), 0)
	wctx, cancel := context.WithCancel(ctx)
	t.Cleanup(cancel)
	nsw.Start(wctx)
	if !nsw.WaitForSync(wctx) {
		t.Fatal("namespace informer did not sync")
	}
	authz := policy.NewAuthorizer(pol, nsw)
	core, logs := observer.New(zap.DebugLevel)
	e.logs = logs
	vc, err := vault.NewClient(vault.ClientOptions{Address: v.Addr, AllowHTTP: true, Timeout: 3 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	src, err := vault.New(vault.Options{Client: vc, Mode: vault.ModePod, Log: zap.New(core)})
	if err != nil {
		t.Fatal(err)
	}
	reviewer, err := tokenreview.NewReviewer(kube.Config)
	if err != nil {
		t.Fatal(err)
	}
	e.auth = tokenreview.New(tokenreview.Options{Client: reviewer, CacheTTL: time.Second})
	// One record per request is what the test counts: the per-pod refusal rate limit (tested on its
	// own) is set out of the way.
	e.svc, err = broker.NewService(broker.Options{Authenticator: e.auth, Authorizer: authz, Source: src, Auditor: auditor, Audiences: []string{audience},
		RefusalBurst: 1000})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func (e *brokerEnv) token(t *testing.T, ns string) broker.Token {
	t.Helper()
	tok, err := e.kube.PodToken(context.Background(), e.pods[ns], []string{audience}, 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	return broker.Token(tok)
}

func claimOf(p *corev1.Pod) broker.Identity {
	return broker.Identity{Namespace: p.Namespace, ServiceAccount: p.Spec.ServiceAccountName, PodName: p.Name, PodUID: string(p.UID)}
}

func (e *brokerEnv) fetch(t *testing.T, tok broker.Token, claim broker.Identity, ref string) ([]broker.Secret, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	return e.svc.Fetch(ctx, broker.Request{RequestID: fmt.Sprintf("req-%d", time.Now().UnixNano()), Event: audit.EventFetch,
		Token: tok, Claimed: claim, Refs: []broker.SecretRef{{Ref: ref, Key: "password"}}})
}

func TestBrokerAgainstKubeAndVault(t *testing.T) {
	e := newBrokerEnv(t)
	ctx := context.Background()
	prodPod, devPod := e.pods["payments-prod"], e.pods["payments-dev"]
	prodTok, devTok := e.token(t, "payments-prod"), e.token(t, "payments-dev")
	requests := 0
	expect := func(name string, tok broker.Token, claim broker.Identity, ref string, want error, value string) {
		t.Helper()
		requests++
		secs, err := e.fetch(t, tok, claim, ref)
		if want == nil {
			if err != nil || len(secs) != 1 || string(secs[0].Value) != value {
				t.Errorf("%s: got %v, %v; want the value", name, secs, err)
			}
			return
		}
		if !errors.Is(err, want) || secs != nil {
			t.Errorf("%s: err = %v, want %v", name, err, want)
		}
	}

	expect("allowed", prodTok, claimOf(prodPod), "payments-prod/db", nil, prodCanary)
	expect("shared grant", prodTok, claimOf(prodPod), "shared/tls/ca", nil, "ca-pem")
	expect("dev pod reads its own dev secret", devTok, claimOf(devPod), "payments-dev/db", nil, devValue)
	expect("another namespace's pod", e.token(t, "other-prod"), claimOf(e.pods["other-prod"]), "payments-prod/db", fault.ErrDenied, "")
	expect("dev pod, ref that exists only in prod, even with a grant", devTok, claimOf(devPod), "payments-dev/only-in-prod", fault.ErrNotFound, "")
	expect("dev pod, a prod namespace's ref", devTok, claimOf(devPod), "payments-prod/db", fault.ErrDenied, "")
	expect("namespace without environment label", e.token(t, "nolabel"), claimOf(e.pods["nolabel"]), "nolabel/x", fault.ErrDenied, "")
	for _, ref := range []string{"../prod/payments-prod/db", "/prod/payments-prod/db", "payments-prod//db", "payments-prod/./db", "payments-prod/db%2f..", ""} {
		expect("traversal "+ref, prodTok, claimOf(prodPod), ref, fault.ErrInvalid, "")
	}
	otherClaim := claimOf(prodPod)
	otherClaim.PodName = "api-1"
	expect("claimed pod differs from the token's", prodTok, otherClaim, "payments-prod/db", fault.ErrDenied, "")
	otherClaim = claimOf(prodPod)
	otherClaim.PodUID = "00000000-0000-0000-0000-000000000000"
	expect("claimed pod UID differs", prodTok, otherClaim, "payments-prod/db", fault.ErrDenied, "")

	wrongAud, err := e.kube.PodToken(ctx, prodPod, []string{"someone-else"}, 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	expect("wrong audience", broker.Token(wrongAud), claimOf(prodPod), "payments-prod/db", fault.ErrUnauthenticated, "")
	unbound, err := e.kube.ServiceAccountToken(ctx, "payments-prod", "api", []string{audience}, 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	expect("token not bound to a pod", broker.Token(unbound), claimOf(prodPod), "payments-prod/db", fault.ErrUnauthenticated, "")
	sa, err := e.kube.Client.CoreV1().ServiceAccounts("payments-prod").Get(ctx, "api", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	claims := harness.TokenClaims{Namespace: "payments-prod", ServiceAccount: "api", ServiceAccountUID: string(sa.UID),
		PodName: prodPod.Name, PodUID: string(prodPod.UID), Audiences: []string{audience}, Expiry: time.Now().Add(time.Hour)}
	forged, err := e.kube.SignToken(claims, true)
	if err != nil {
		t.Fatal(err)
	}
	expect("forged token", broker.Token(forged), claimOf(prodPod), "payments-prod/db", fault.ErrUnauthenticated, "")
	// Control: the same claims signed with the apiserver's key are accepted, so the forged and
	// expired cases fail for the signature and the expiry alone.
	genuine, err := e.kube.SignToken(claims, false)
	if err != nil {
		t.Fatal(err)
	}
	expect("self-signed control", broker.Token(genuine), claimOf(prodPod), "payments-prod/db", nil, prodCanary)
	claims.Expiry = time.Now().Add(-2 * time.Minute)
	expired, err := e.kube.SignToken(claims, false)
	if err != nil {
		t.Fatal(err)
	}
	expect("expired token", broker.Token(expired), claimOf(prodPod), "payments-prod/db", fault.ErrUnauthenticated, "")
	expect("no token", "", claimOf(prodPod), "payments-prod/db", fault.ErrUnauthenticated, "")

	// A deleted pod's token stops working within seconds (the apiserver invalidates it; the positive
	// review cache holds for at most CacheTTL).
	victim, err := e.kube.CreatePod(ctx, "payments-prod", "api-doomed", "api", "node-1")
	if err != nil {
		t.Fatal(err)
	}
	victimTok, err := e.kube.PodToken(ctx, victim, []string{audience}, 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	expect("pod alive", broker.Token(victimTok), claimOf(victim), "payments-prod/db", nil, prodCanary)
	// Grace period 0: there is no kubelet to confirm a graceful deletion.
	zero := int64(0)
	if err := e.kube.Client.CoreV1().Pods("payments-prod").Delete(ctx, victim.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	eventually(t, 60*time.Second, "deleted pod's token refused", func() error {
		requests++
		_, err := e.fetch(t, broker.Token(victimTok), claimOf(victim), "payments-prod/db")
		if errors.Is(err, fault.ErrUnauthenticated) {
			return nil
		}
		return fmt.Errorf("still %v", err)
	})
	t.Logf("deleted pod lost access after %s", time.Since(start).Round(100*time.Millisecond))

	// Vault down: Unavailable. Vault back (a new dev server, provisioned again): the broker recovers,
	// logging in afresh since its cached Vault tokens died with the old server.
	e.vault.Stop()
	expect("vault stopped", prodTok, claimOf(prodPod), "payments-prod/db", fault.ErrUnavailable, "")
	rctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := e.vault.Restart(rctx); err != nil {
		t.Fatal(err)
	}
	provisionVault(t, e.vault, e.kube)
	expect("vault back", prodTok, claimOf(prodPod), "payments-prod/db", nil, prodCanary)

	// One verifiable audit record per request, none holding a secret value or a token.
	rep, err := audit.VerifyFile(e.auditLog, e.auditKey)
	if err != nil {
		t.Fatal(err)
	}
	if int(rep.Records) != requests {
		t.Errorf("%d audit records for %d requests", rep.Records, requests)
	}
	raw, _ := os.ReadFile(e.auditLog)
	for _, secret := range []string{prodCanary, devValue, string(prodTok), string(devTok), forged, unbound, e.vault.RootToken} {
		if bytes.Contains(raw, []byte(secret)) {
			t.Fatalf("the audit log contains a secret value or token")
		}
	}
	for _, want := range []string{`"decision":"deny"`, `"event":"authenticate"`, `"event":"authorize"`, `"event":"fetch"`,
		`"code":"PermissionDenied"`, `"code":"Unauthenticated"`, `"code":"InvalidArgument"`, `"code":"Unavailable"`,
		`"environment":"prod"`, `"pod_uid":"` + string(prodPod.UID) + `"`} {
		if !bytes.Contains(raw, []byte(want)) {
			t.Errorf("audit log lacks %s", want)
		}
	}
	// The security team's view: keywardctl audit query / verify.
	code, out := ctl(t, nil, "audit", "query", e.auditLog, "--decision", "deny", "--namespace", "payments-prod", "--since", "1h", "-o", "json")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if code != 0 || len(lines) < 5 || strings.Contains(out, `"decision":"allow"`) || !strings.Contains(out, `"namespace":"payments-prod"`) {
		t.Fatalf("audit query: exit %d, %d lines: %s", code, len(lines), out)
	}
	tampered := filepath.Join(t.TempDir(), "tampered.log")
	os.WriteFile(tampered, bytes.Replace(raw, []byte(`"decision":"deny"`), []byte(`"decision":"allow"`), 1), 0o600)
	if code, out := ctl(t, nil, "audit", "verify", tampered, "--key-file", e.auditKey); code != 1 || !strings.Contains(out, "was modified") {
		t.Fatalf("verify of a tampered log: exit %d: %s", code, out)
	}
	for _, entry := range e.logs.All() {
		line := fmt.Sprint(entry.Message, entry.ContextMap())
		if strings.Contains(line, prodCanary) || strings.Contains(line, string(prodTok)) {
			t.Fatal("a log line contains a secret")
		}
	}
}
