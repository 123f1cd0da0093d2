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
	if err := v.KubernetesAuth(ctx, "kubernetes", k); err != nil {
		t.Fatal(err)
	}
	if err := v.GrantEnvironment(ctx, "kubernetes", "kv", "prod", []string{"payments-prod", "other-prod"}, []string{"*"}, audience); err != nil {
		t.Fatal(err)
	}
	if err := v.GrantEnvironment(ctx, "kubernetes", "kv", "dev", []string{"payments-dev"}, []string{"*"}, audience); err != nil {
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
	e := &brokerEnv{kube: harness.KubeT(t, harness.KubeOptions{}), vault: harness.VaultT(t), pods: map[string]*corev1.Pod{}}
	for ns, env := range map[string]string{"payments-prod": "prod", "payments-dev": "dev", "other-prod": "prod", "nolabel": ""} {
		labels := map[string]string{}
		if env != "" {
			labels[policy.EnvironmentLabel] = env
		}
		if _, err := e.kube.CreateNamespace(context.Background(), ns, labels); err != nil {
			t.Fatal(err)
		}
		if _, err := e.kube.CreateServiceAccount(context.Background(), ns, "api"); err != nil {
			t.Fatal(err)
		}
		e.pods[ns] = e.newPod(t, ns, "api-0")
	}
	provisionVault(t, e.vault, e.kube)
	e.newService(t)
	return e
}

// newService builds the broker core against the env's apiserver and Vault, auditing to a file.
func (e *brokerEnv) newService(t *testing.T) {
	t.Helper()
	dir := harness.Dir(t)
	e.auditLog, e.auditKey = filepath.Join(dir, "audit"), filepath.Join(dir, "audit.key")
	os.WriteFile(e.auditKey, []byte(strings.Repeat("z", 40)), 0o600)
	auditor, err := audit.Open(audit.Options{Dir: e.auditLog, KeyFile: e.auditKey, Node: "node-1", Stream: "broker"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { auditor.Close() })
	pol, err := policy.Parse([]byte(brokerPolicy))
	if err != nil {
		t.Fatal(err)
	}
	nsw := policy.NewNamespaceWatcher(metadata.NewForConfigOrDie(e.kube.Config), 0)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	nsw.Start(ctx)
	if !nsw.WaitForSync(ctx) {
		t.Fatal("namespace informer did not sync")
	}
	core, logs := observer.New(zap.DebugLevel)
	e.logs = logs
	vc, err := vault.NewClient(vault.ClientOptions{Address: e.vault.Addr, AllowHTTP: true, Timeout: 3 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	src, err := vault.New(vault.Options{Client: vc, Mode: vault.ModePod, Log: zap.New(core)})
	if err != nil {
		t.Fatal(err)
	}
	reviewer, err := tokenreview.NewReviewer(e.kube.Config)
	if err != nil {
		t.Fatal(err)
	}
	e.auth = tokenreview.New(tokenreview.Options{Client: reviewer, CacheTTL: time.Second})
	// One record per request is what the broker test counts: the per-pod refusal rate limit (tested
	// on its own) is set out of the way.
	e.svc, err = broker.NewService(broker.Options{Authenticator: e.auth, Authorizer: policy.NewAuthorizer(pol, nsw), Source: src,
		Auditor: auditor, Audiences: []string{audience}, RefusalBurst: 1000})
	if err != nil {
		t.Fatal(err)
	}
}

// newPod creates a pod of the namespace's api service account on node-1.
func (e *brokerEnv) newPod(t *testing.T, ns, name string) *corev1.Pod {
	return e.newPodOn(t, ns, name, "node-1")
}

// newPodOn creates a pod of the namespace's api service account on node.
func (e *brokerEnv) newPodOn(t *testing.T, ns, name, node string) *corev1.Pod {
	t.Helper()
	p, err := e.kube.CreatePod(context.Background(), ns, name, "api", node)
	if err != nil {
		t.Fatal(err)
	}
	return p
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

// brokerScenario drives the broker core (authenticate -> authorize -> fetch -> audit) against the
// real apiserver and Vault, counting the requests it makes.
type brokerScenario struct {
	e               *brokerEnv
	prodPod, devPod *corev1.Pod
	prodTok, devTok broker.Token
	forged, unbound string
	requests        int
}

func TestBrokerAgainstKubeAndVault(t *testing.T) {
	e := newBrokerEnv(t)
	s := &brokerScenario{e: e, prodPod: e.pods["payments-prod"], devPod: e.pods["payments-dev"],
		prodTok: e.token(t, "payments-prod"), devTok: e.token(t, "payments-dev")}
	runSteps(t,
		step{"scoping: namespace, environment, refs", s.scoping},
		step{"tokens: audience, binding, forgery, expiry", s.tokens},
		step{"a deleted pod's token stops working", s.deletedPod},
		step{"Vault down, then back", s.vaultDownAndBack},
		step{"one verifiable audit record per request, no secret in it", s.audit},
		step{"the security team's view: keywardctl audit query and verify", s.auditTools},
	)
}

// expect makes one request and checks its outcome.
func (s *brokerScenario) expect(t *testing.T, name string, tok broker.Token, claim broker.Identity, ref string, want error, value string) {
	t.Helper()
	s.requests++
	secs, err := s.e.fetch(t, tok, claim, ref)
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

func (s *brokerScenario) scoping(t *testing.T) {
	e, prod, dev := s.e, claimOf(s.prodPod), claimOf(s.devPod)
	s.expect(t, "allowed", s.prodTok, prod, "payments-prod/db", nil, prodCanary)
	s.expect(t, "shared grant", s.prodTok, prod, "shared/tls/ca", nil, "ca-pem")
	s.expect(t, "dev pod reads its own dev secret", s.devTok, dev, "payments-dev/db", nil, devValue)
	s.expect(t, "another namespace's pod", e.token(t, "other-prod"), claimOf(e.pods["other-prod"]), "payments-prod/db", fault.ErrDenied, "")
	s.expect(t, "dev pod, ref that exists only in prod, even with a grant", s.devTok, dev, "payments-dev/only-in-prod", fault.ErrNotFound, "")
	s.expect(t, "dev pod, a prod namespace's ref", s.devTok, dev, "payments-prod/db", fault.ErrDenied, "")
	s.expect(t, "namespace without environment label", e.token(t, "nolabel"), claimOf(e.pods["nolabel"]), "nolabel/x", fault.ErrDenied, "")
	for _, ref := range []string{"../prod/payments-prod/db", "/prod/payments-prod/db", "payments-prod//db", "payments-prod/./db", "payments-prod/db%2f..", ""} {
		s.expect(t, "traversal "+ref, s.prodTok, prod, ref, fault.ErrInvalid, "")
	}
	other := prod
	other.PodName = "api-1"
	s.expect(t, "claimed pod differs from the token's", s.prodTok, other, "payments-prod/db", fault.ErrDenied, "")
	other = prod
	other.PodUID = "00000000-0000-0000-0000-000000000000"
	s.expect(t, "claimed pod UID differs", s.prodTok, other, "payments-prod/db", fault.ErrDenied, "")
}

func (s *brokerScenario) tokens(t *testing.T) {
	ctx, e, prod := context.Background(), s.e, claimOf(s.prodPod)
	wrongAud, err := e.kube.PodToken(ctx, s.prodPod, []string{"someone-else"}, 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	s.expect(t, "wrong audience", broker.Token(wrongAud), prod, "payments-prod/db", fault.ErrUnauthenticated, "")
	if s.unbound, err = e.kube.ServiceAccountToken(ctx, "payments-prod", "api", []string{audience}, 10*time.Minute); err != nil {
		t.Fatal(err)
	}
	s.expect(t, "token not bound to a pod", broker.Token(s.unbound), prod, "payments-prod/db", fault.ErrUnauthenticated, "")
	sa, err := e.kube.Client.CoreV1().ServiceAccounts("payments-prod").Get(ctx, "api", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	claims := harness.TokenClaims{Namespace: "payments-prod", ServiceAccount: "api", ServiceAccountUID: string(sa.UID),
		PodName: s.prodPod.Name, PodUID: string(s.prodPod.UID), Audiences: []string{audience}, Expiry: time.Now().Add(time.Hour)}
	if s.forged, err = e.kube.SignToken(claims, true); err != nil {
		t.Fatal(err)
	}
	s.expect(t, "forged token", broker.Token(s.forged), prod, "payments-prod/db", fault.ErrUnauthenticated, "")
	// Control: the same claims signed with the apiserver's key are accepted, so the forged and
	// expired cases fail for the signature and the expiry alone.
	genuine, err := e.kube.SignToken(claims, false)
	if err != nil {
		t.Fatal(err)
	}
	s.expect(t, "self-signed control", broker.Token(genuine), prod, "payments-prod/db", nil, prodCanary)
	claims.Expiry = time.Now().Add(-2 * time.Minute)
	expired, err := e.kube.SignToken(claims, false)
	if err != nil {
		t.Fatal(err)
	}
	s.expect(t, "expired token", broker.Token(expired), prod, "payments-prod/db", fault.ErrUnauthenticated, "")
	s.expect(t, "no token", "", prod, "payments-prod/db", fault.ErrUnauthenticated, "")
}

// A deleted pod's token stops working within seconds (the apiserver invalidates it; the positive
// review cache holds for at most CacheTTL).
func (s *brokerScenario) deletedPod(t *testing.T) {
	victim := s.e.newPod(t, "payments-prod", "api-doomed")
	victimTok, err := s.e.kube.PodToken(context.Background(), victim, []string{audience}, 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	s.expect(t, "pod alive", broker.Token(victimTok), claimOf(victim), "payments-prod/db", nil, prodCanary)
	// Grace period 0: there is no kubelet to confirm a graceful deletion.
	zero := int64(0)
	if err := s.e.kube.Client.CoreV1().Pods("payments-prod").Delete(context.Background(), victim.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	eventually(t, 60*time.Second, "deleted pod's token refused", func() error {
		s.requests++
		_, err := s.e.fetch(t, broker.Token(victimTok), claimOf(victim), "payments-prod/db")
		if errors.Is(err, fault.ErrUnauthenticated) {
			return nil
		}
		return fmt.Errorf("still %v", err)
	})
	t.Logf("deleted pod lost access after %s", time.Since(start).Round(100*time.Millisecond))
}

// Vault down: Unavailable. Vault back (a new dev server, provisioned again): the broker recovers,
// logging in afresh since its cached Vault tokens died with the old server.
func (s *brokerScenario) vaultDownAndBack(t *testing.T) {
	s.e.vault.Stop()
	s.expect(t, "vault stopped", s.prodTok, claimOf(s.prodPod), "payments-prod/db", fault.ErrUnavailable, "")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := s.e.vault.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	provisionVault(t, s.e.vault, s.e.kube)
	s.expect(t, "vault back", s.prodTok, claimOf(s.prodPod), "payments-prod/db", nil, prodCanary)
}

func (s *brokerScenario) audit(t *testing.T) {
	key, _ := audit.ReadKey(s.e.auditKey)
	rep, err := audit.VerifyDir(s.e.auditLog, audit.VerifyOptions{Key: key, Node: "node-1", Stream: "broker"})
	if err != nil {
		t.Fatal(err)
	}
	if int(rep.Records) != s.requests+1 { // and the genesis
		t.Errorf("%d audit records for %d requests", rep.Records, s.requests)
	}
	raw := []byte(readFile(t, s.e.auditLog))
	for _, secret := range []string{prodCanary, devValue, string(s.prodTok), string(s.devTok), s.forged, s.unbound, s.e.vault.RootToken} {
		if bytes.Contains(raw, []byte(secret)) {
			t.Fatalf("the audit log contains a secret value or token")
		}
	}
	for _, want := range []string{`"decision":"deny"`, `"event":"authenticate"`, `"event":"authorize"`, `"event":"fetch"`,
		`"code":"PermissionDenied"`, `"code":"Unauthenticated"`, `"code":"InvalidArgument"`, `"code":"Unavailable"`,
		`"environment":"prod"`, `"pod_uid":"` + string(s.prodPod.UID) + `"`} {
		if !bytes.Contains(raw, []byte(want)) {
			t.Errorf("audit log lacks %s", want)
		}
	}
	for _, entry := range s.e.logs.All() {
		line := fmt.Sprint(entry.Message, entry.ContextMap())
		if strings.Contains(line, prodCanary) || strings.Contains(line, string(s.prodTok)) {
			t.Fatal("a log line contains a secret")
		}
	}
}

func (s *brokerScenario) auditTools(t *testing.T) {
	code, out := ctl(t, nil, "audit", "query", s.e.auditLog, "--decision", "deny", "--namespace", "payments-prod", "--since", "1h", "-o", "json")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if code != 0 || len(lines) < 5 || strings.Contains(out, `"decision":"allow"`) || !strings.Contains(out, `"namespace":"payments-prod"`) ||
		!strings.Contains(out, `"seq":`) || !strings.Contains(out, `"mac":"`) {
		t.Fatalf("audit query: exit %d, %d lines: %s", code, len(lines), out)
	}
	raw := []byte(readFile(t, s.e.auditLog))
	tampered := filepath.Join(t.TempDir(), "audit-00000000000000000001.jsonl")
	os.WriteFile(tampered, bytes.Replace(raw, []byte(`"decision":"deny"`), []byte(`"decision":"allow"`), 1), 0o600)
	if code, out := ctl(t, nil, "audit", "verify", tampered, "--key-file", s.e.auditKey); code != 1 || !strings.Contains(out, "was modified") {
		t.Fatalf("verify of a tampered log: exit %d: %s", code, out)
	}
}
