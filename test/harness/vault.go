package harness

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	vaultapi "github.com/hashicorp/vault/api"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
)

// Vault is a HashiCorp Vault dev server (in-memory, unsealed) on loopback. It is a test server only.
type Vault struct {
	Addr string // http://127.0.0.1:PORT
	// Client is authenticated with the root token.
	Client    *vaultapi.Client
	RootToken string
	Dir       string
	proc      *process
	bin, home string
	port      int
}

// vaultArgs are the dev-server arguments for port.
func vaultArgs(port int) []string {
	return []string{"server", "-dev", "-dev-listen-address=" + hostPort(port), "-dev-no-store-token", "-log-level=warn"}
}

// StartVault starts `vault server -dev` in dir (which must exist) and waits until it is unsealed and
// active. The root token is random, passed through the environment (not argv) and never stored on disk.
func StartVault(ctx context.Context, dir string) (*Vault, error) {
	bin, err := Binary("vault")
	if err != nil {
		return nil, err
	}
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	root := "kw-root-" + randomHex(16)
	home := filepath.Join(dir, "home")
	if err := os.MkdirAll(home, 0o700); err != nil {
		return nil, err
	}
	addr := "http://" + hostPort(port)
	v := &Vault{Addr: addr, RootToken: root, Dir: dir, bin: bin, port: port, home: home}
	if err := v.start(ctx); err != nil {
		return nil, err
	}
	return v, nil
}

func (v *Vault) start(ctx context.Context) error {
	p, err := startProcess("vault", v.Dir, v.bin, vaultArgs(v.port),
		// x509negativeserial=1: Vault 1.14 links gosnowflake 1.6, whose init parses a bundled CA
		// certificate with a negative serial number; Go >= 1.23 rejects those and the binary panics at
		// start. The setting restores the old parsing for this test server only.
		[]string{"VAULT_DEV_ROOT_TOKEN_ID=" + v.RootToken, "HOME=" + v.home, "VAULT_ADDR=" + v.Addr, "VAULT_DISABLE_MLOCK=true",
			"GODEBUG=x509negativeserial=1"})
	if err != nil {
		return err
	}
	cfg := vaultapi.DefaultConfig()
	cfg.Address = v.Addr
	cfg.MaxRetries = 0
	cfg.Timeout = 10 * time.Second
	client, err := vaultapi.NewClient(cfg)
	if err != nil {
		p.stop()
		return err
	}
	client.SetToken(v.RootToken)
	v.Client, v.proc = client, p
	if err := p.waitReady(ctx, func(ctx context.Context) error {
		h, err := client.Sys().HealthWithContext(ctx)
		if err != nil {
			return err
		}
		if !h.Initialized || h.Sealed || h.Standby {
			return fmt.Errorf("health %+v: %w", h, errNotReady)
		}
		return nil
	}); err != nil {
		p.stop()
		return err
	}
	return nil
}

// Restart stops Vault and starts a new dev server on the same address with the same root token. A
// dev server keeps everything in memory: mounts, auth methods and secrets must be set up again.
func (v *Vault) Restart(ctx context.Context) error {
	v.proc.stop()
	return v.start(ctx)
}

// Stop stops the Vault server; all its data is gone. Safe to call twice.
func (v *Vault) Stop() { v.proc.stop() }

// EnableKVv2 mounts a KV version 2 secrets engine at mount and waits until it accepts writes.
func (v *Vault) EnableKVv2(ctx context.Context, mount string) error {
	if err := v.Client.Sys().MountWithContext(ctx, mount, &vaultapi.MountInput{
		Type: "kv", Options: map[string]string{"version": "2"},
	}); err != nil {
		return fmt.Errorf("mount kv-v2 at %s: %w", mount, err)
	}
	// A fresh KV v2 mount upgrades its storage in the background and refuses requests until done.
	return poll(ctx, func(ctx context.Context) error {
		_, err := v.Client.Logical().ReadWithContext(ctx, mount+"/config")
		return err
	})
}

// PutKV writes a KV v2 secret at mount/path.
func (v *Vault) PutKV(ctx context.Context, mount, path string, data map[string]any) (*vaultapi.KVSecret, error) {
	return v.Client.KVv2(mount).Put(ctx, path, data)
}

// KubernetesAuth configures Vault's kubernetes auth method at mount against the harness apiserver.
// Vault calls TokenReview with a token of its own service account (kube-system/vault-auth, bound to
// system:auth-delegator), as a production Vault would.
func (v *Vault) KubernetesAuth(ctx context.Context, mount string, kube *KubeAPIServer) error {
	if err := v.Client.Sys().EnableAuthWithOptionsWithContext(ctx, mount, &vaultapi.EnableAuthOptions{Type: "kubernetes"}); err != nil {
		return fmt.Errorf("enable kubernetes auth at %s: %w", mount, err)
	}
	// Idempotent on the Kubernetes side, so a restarted (empty) dev server can be configured again.
	sa := "vault-auth-" + mount
	if _, err := kube.CreateServiceAccount(ctx, "kube-system", sa); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	if err := kube.BindClusterRole(ctx, sa, "system:auth-delegator", "kube-system", sa); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	reviewer, err := kube.ServiceAccountToken(ctx, "kube-system", sa, nil, 24*time.Hour)
	if err != nil {
		return err
	}
	return v.KubernetesAuthReviewer(ctx, mount, kube, reviewer)
}

// KubernetesAuthReviewer (re)writes the kubernetes auth method's config at mount with reviewerJWT as
// the token Vault reviews pods' tokens with: tests break it (an expired or wrong JWT) and mend it.
func (v *Vault) KubernetesAuthReviewer(ctx context.Context, mount string, kube *KubeAPIServer, reviewerJWT string) error {
	_, err := v.Client.Logical().WriteWithContext(ctx, "auth/"+mount+"/config", map[string]any{
		"kubernetes_host":      kube.URL,
		"kubernetes_ca_cert":   string(kube.CAData),
		"token_reviewer_jwt":   reviewerJWT,
		"disable_local_ca_jwt": true,
		"issuer":               kube.Issuer,
	})
	return err
}

// GrantEnvironment lets the kubernetes-auth role env (at authMount) read the KV v2 secrets of the
// environment under kvMount/<env>/, for pods of namespaces running as serviceAccounts with tokens for
// audience: the layout Keyward's policy expects and deploy/vault/setup.sh ships, one policy (named
// <env>-read, see EnvironmentPolicy) and one role per environment. A token from a login reads only
// its own namespace's subtree and the environment's shared/ subtree. The kubernetes auth method must
// be enabled at authMount first (the policy names it by its accessor).
func (v *Vault) GrantEnvironment(ctx context.Context, authMount, kvMount, env string, namespaces, serviceAccounts []string, audience string) error {
	if err := v.PutEnvironmentPolicy(ctx, authMount, kvMount, env); err != nil {
		return err
	}
	return v.KubernetesRole(ctx, authMount, env, namespaces, serviceAccounts, []string{env + "-read"}, audience)
}

// PutEnvironmentPolicy writes the policy <env>-read: EnvironmentPolicy for the environment whose
// secrets live under kvMount/<env>/.
func (v *Vault) PutEnvironmentPolicy(ctx context.Context, authMount, kvMount, env string) error {
	text, err := v.EnvironmentPolicy(ctx, authMount, kvMount, env)
	if err != nil {
		return err
	}
	return v.Client.Sys().PutPolicyWithContext(ctx, env+"-read", text)
}

// EnvironmentPolicyTemplate is deploy/vault/namespace-read.hcl, the one source of the policy text:
// deploy/vault/setup.sh and the tests fill in the same file.
const EnvironmentPolicyTemplate = "deploy/vault/namespace-read.hcl"

// EnvironmentPolicy is deploy/vault/namespace-read.hcl for the environment whose secrets live under
// kvMount/prefix/, with the accessor of the kubernetes auth method at authMount filled in, as
// deploy/vault/setup.sh writes it.
func (v *Vault) EnvironmentPolicy(ctx context.Context, authMount, kvMount, prefix string) (string, error) {
	path, err := RepoFile(EnvironmentPolicyTemplate)
	if err != nil {
		return "", err
	}
	tmpl, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	accessor, err := v.authAccessor(ctx, authMount)
	if err != nil {
		return "", err
	}
	return strings.NewReplacer("@KV_MOUNT@", kvMount, "@ENV_PREFIX@", prefix, "@AUTH_ACCESSOR@", accessor).Replace(string(tmpl)), nil
}

// RepoFile is the absolute path of rel, a path inside this repository (deploy/..., found from the
// working directory up: tests run in their package's directory, go run in the repository's).
func RepoFile(rel string) (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if mod, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil && strings.HasPrefix(string(mod), "module github.com/keyward/keyward\n") {
			return filepath.Join(dir, rel), nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("%s: not inside the keyward repository (no go.mod of github.com/keyward/keyward above the working directory)", rel)
		}
		dir = parent
	}
}

// KubernetesRole creates a role in the kubernetes auth method at mount.
func (v *Vault) KubernetesRole(ctx context.Context, mount, role string, namespaces, serviceAccounts, policies []string, audience string) error {
	_, err := v.Client.Logical().WriteWithContext(ctx, "auth/"+mount+"/role/"+role, map[string]any{
		"bound_service_account_names":      serviceAccounts,
		"bound_service_account_namespaces": namespaces,
		"token_policies":                   policies,
		"audience":                         audience,
		"token_ttl":                        strconv.Itoa(600),
	})
	return err
}

func poll(ctx context.Context, f func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for {
		err := f(ctx)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Pid is the Vault server's process ID (benchmarks read its CPU time).
func (v *Vault) Pid() int { return v.proc.pid() }
