package e2e

import (
	"context"
	"crypto/rand"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	vaultapi "github.com/hashicorp/vault/api"
	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/broker/vault"
	"github.com/keyward/keyward/test/harness"
)

// vaultAttack is a Vault laid out by deploy/vault/setup.sh itself, and pods of two namespaces of the
// prod environment.
type vaultAttack struct {
	kube             *harness.KubeAPIServer
	vault            *harness.Vault
	attacker, victim *corev1.Pod
	attackerToken    string // the attacker's own keyward-audience token
	victimSecret     string
	attackerSecret   string
	sharedSecret     string
	devSecret        string
	attackerVault    string
}

// Vault is a real second line: a pod that mints its own token with the broker's audience and logs
// in to Vault directly, around the broker, reads at most its own namespace's subtree of its
// environment (and the environment's shared subtree), never another namespace's secrets. Vault is
// configured by deploy/vault/setup.sh, the script we ship; the broker's own reads as the pod
// (vault.mode: pod) still work under the same policy. (Before, every role's policy was
// <mount>/data/<environment>/*: the attacker read the other namespace's secret.)
func TestPodCannotReadAnotherNamespaceThroughVault(t *testing.T) {
	a := &vaultAttack{kube: harness.KubeT(t, harness.KubeOptions{}), vault: harness.VaultT(t)}
	runSteps(t,
		step{"deploy/vault/setup.sh lays out Vault", a.setup},
		step{"the attacker logs in to Vault directly with a token it minted", a.login},
		step{"it reads its own namespace's and the shared subtree", a.readsOwn},
		step{"it is refused another namespace's secret of the same environment", a.refusedOthers},
		step{"the broker's reads as the pod work under the same policy", a.brokerReads},
	)
}

func (a *vaultAttack) setup(t *testing.T) {
	ctx := context.Background()
	for _, ns := range []struct{ name, env string }{{"payments-prod", "prod"}, {"attacker-prod", "prod"}, {"payments-dev", "dev"}} {
		if _, err := a.kube.CreateNamespace(ctx, ns.name, map[string]string{"keyward.dev/environment": ns.env}); err != nil {
			t.Fatal(err)
		}
		if _, err := a.kube.CreateServiceAccount(ctx, ns.name, "api"); err != nil {
			t.Fatal(err)
		}
	}
	var err error
	if a.victim, err = a.kube.CreatePod(ctx, "payments-prod", "api-0", "api", "node-1"); err != nil {
		t.Fatal(err)
	}
	if a.attacker, err = a.kube.CreatePod(ctx, "attacker-prod", "evil-0", "api", "node-1"); err != nil {
		t.Fatal(err)
	}
	// Vault reviews tokens as a production Vault does: with a token of its own service account,
	// bound to system:auth-delegator.
	if _, err := a.kube.CreateServiceAccount(ctx, "kube-system", "vault-auth"); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	if err := a.kube.BindClusterRole(ctx, "vault-auth", "system:auth-delegator", "kube-system", "vault-auth"); err != nil {
		t.Fatal(err)
	}
	reviewer, err := a.kube.ServiceAccountToken(ctx, "kube-system", "vault-auth", nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	runSetupScript(t, a.vault, a.kube, reviewer, "PROD_NAMESPACES=payments-prod,attacker-prod", "DEV_NAMESPACES=payments-dev")
	a.victimSecret, a.attackerSecret, a.sharedSecret, a.devSecret = "CANARY-victim-"+rand.Text(), "attacker-own", "shared-ca", "CANARY-dev-"+rand.Text()
	for path, val := range map[string]string{"prod/payments-prod/db": a.victimSecret, "prod/attacker-prod/db": a.attackerSecret,
		"prod/shared/tls/ca": a.sharedSecret, "dev/payments-dev/db": a.devSecret} {
		if _, err := a.vault.PutKV(ctx, "kv", path, map[string]any{"password": val}); err != nil {
			t.Fatal(err)
		}
	}
}

// runSetupScript runs deploy/vault/setup.sh with the vault CLI of the harness against v, reviewing
// tokens at kube with reviewer, plus the extra environment.
func runSetupScript(t *testing.T, v *harness.Vault, kube *harness.KubeAPIServer, reviewer string, extra ...string) {
	t.Helper()
	vaultBin, err := harness.Binary("vault")
	harness.Check(t, err)
	dir := t.TempDir()
	if err := os.Symlink(vaultBin, filepath.Join(dir, "vault")); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", "../../deploy/vault/setup.sh")
	cmd.Env = append([]string{"PATH=" + dir + ":" + os.Getenv("PATH"), "HOME=" + dir, "VAULT_ADDR=" + v.Addr, "VAULT_TOKEN=" + v.RootToken,
		"KUBE_HOST=" + kube.URL, "KUBE_CA=" + kube.CAFile, "REVIEWER_JWT=" + reviewer,
		// The harness's Vault 1.14 needs this to start under Go >= 1.23 (see harness.StartVault).
		"GODEBUG=x509negativeserial=1"}, extra...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("deploy/vault/setup.sh: %v\n%s", err, out) // its output names paths and policies, no token
	}
}

// anonymous is a Vault client with no token, as a pod would build one.
func (a *vaultAttack) anonymous(t *testing.T) *vaultapi.Client {
	t.Helper()
	cfg := vaultapi.DefaultConfig()
	cfg.Address, cfg.MaxRetries = a.vault.Addr, 0
	c, err := vaultapi.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.ClearToken()
	return c
}

// The attacker mints a token with the broker's audience bound to its own pod — what kubelet hands any
// pod that declares a projected serviceAccountToken volume with audience keyward — and logs in with
// its environment's role. The role is bound to its namespace, so the login succeeds: Vault's
// policies are what must stop it.
func (a *vaultAttack) login(t *testing.T) {
	var err error
	if a.attackerToken, err = a.kube.PodToken(context.Background(), a.attacker, []string{audience}, 10*time.Minute); err != nil {
		t.Fatal(err)
	}
	c := a.anonymous(t)
	sec, err := c.Logical().Write("auth/kubernetes/login", map[string]any{"role": "prod", "jwt": a.attackerToken})
	if err != nil || sec == nil || sec.Auth == nil {
		t.Fatalf("the attacker's direct login with role prod: %v", err)
	}
	a.attackerVault = sec.Auth.ClientToken
	// The other environment's role is not bound to its namespace.
	if _, err := c.Logical().Write("auth/kubernetes/login", map[string]any{"role": "dev", "jwt": a.attackerToken}); err == nil {
		t.Error("the attacker logged in with the dev role")
	}
}

// read reads kv/data/path with token and returns the password or the HTTP status of the refusal.
func (a *vaultAttack) read(t *testing.T, token, path string) (string, int) {
	t.Helper()
	c := a.anonymous(t)
	c.SetToken(token)
	sec, err := c.Logical().Read("kv/data/" + path)
	var re *vaultapi.ResponseError
	if errors.As(err, &re) {
		return "", re.StatusCode
	}
	if err != nil {
		t.Fatalf("reading %s: %v", path, err)
	}
	if sec == nil {
		return "", 404
	}
	data, _ := sec.Data["data"].(map[string]any)
	v, _ := data["password"].(string)
	return v, 200
}

func (a *vaultAttack) readsOwn(t *testing.T) {
	if v, code := a.read(t, a.attackerVault, "prod/attacker-prod/db"); code != 200 || v != a.attackerSecret {
		t.Errorf("the attacker's own namespace's secret: HTTP %d", code)
	}
	if v, code := a.read(t, a.attackerVault, "prod/shared/tls/ca"); code != 200 || v != a.sharedSecret {
		t.Errorf("the environment's shared secret: HTTP %d", code)
	}
}

func (a *vaultAttack) refusedOthers(t *testing.T) {
	for _, path := range []string{
		"prod/payments-prod/db", // another namespace of the same environment: the attack
		"prod/payments-prod/nope",
		"prod/attacker-prod-x/db", // a namespace whose name starts with the attacker's
		"dev/payments-dev/db",     // another environment
		"dev/attacker-prod/db",    // its own namespace's name under another environment
	} {
		if v, code := a.read(t, a.attackerVault, path); code != 403 {
			leaked := v == a.victimSecret || v == a.devSecret
			t.Errorf("the attacker read %s: HTTP %d (leaked a secret: %v), want 403", path, code, leaked)
		}
	}
	// Listing the environment's secrets is not granted either.
	c := a.anonymous(t)
	c.SetToken(a.attackerVault)
	var re *vaultapi.ResponseError
	if _, err := c.Logical().List("kv/metadata/prod/"); !errors.As(err, &re) || re.StatusCode != 403 {
		t.Errorf("the attacker listed kv/metadata/prod/: %v", err)
	}
}

// The broker, logging in as the victim pod (vault.mode: pod) with the environment's role, reads the
// victim's namespace's and the shared secret through the policy setup.sh wrote.
func (a *vaultAttack) brokerReads(t *testing.T) {
	vc, err := vault.NewClient(vault.ClientOptions{Address: a.vault.Addr, AllowHTTP: true, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	src, err := vault.New(vault.Options{Client: vc, Mode: vault.ModePod, Log: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	tok, err := a.kube.PodToken(context.Background(), a.victim, []string{audience}, 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	id := broker.Identity{Namespace: a.victim.Namespace, ServiceAccount: "api", PodName: a.victim.Name, PodUID: string(a.victim.UID), Node: "node-1"}
	refs := []broker.Resolved{
		{SecretRef: broker.SecretRef{Ref: "payments-prod/db", Key: "password"}, Environment: "prod", Mount: "kv", Path: "prod/payments-prod/db", Role: "prod"},
		{SecretRef: broker.SecretRef{Ref: "shared/tls/ca", Key: "password"}, Environment: "prod", Mount: "kv", Path: "prod/shared/tls/ca", Role: "prod"},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	secrets, err := src.Fetch(ctx, id, broker.Token(tok), refs, broker.DefaultMaxBytes)
	if err != nil || len(secrets) != 2 || string(secrets[0].Value) != a.victimSecret || string(secrets[1].Value) != a.sharedSecret {
		t.Fatalf("the broker's reads as the victim pod: %d secrets, %v", len(secrets), err)
	}
	// The same source, as the victim, is refused the attacker's namespace by Vault itself.
	refs = []broker.Resolved{{SecretRef: broker.SecretRef{Ref: "attacker-prod/db", Key: "password"}, Environment: "prod", Mount: "kv", Path: "prod/attacker-prod/db", Role: "prod"}}
	if _, err := src.Fetch(ctx, id, broker.Token(tok), refs, broker.DefaultMaxBytes); err == nil {
		t.Fatal("Vault let the broker, logged in as the victim, read the attacker's namespace")
	}
}
