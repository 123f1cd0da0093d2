// Command demo is `make demo`: it starts Keyward's real components on loopback and walks through what
// they do, step by step, then tears everything down. It exits non-zero if any step fails.
//
// At this stage it shows the real parts answering: a SoftHSM2 token doing AES-GCM with a
// non-extractable key, etcd over mutual TLS, kube-apiserver issuing and reviewing a pod-bound token,
// and Vault serving KV v2 to a pod that logged in with that token.
package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"time"

	"github.com/miekg/pkcs11"
	authenticationv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keyward/keyward/test/harness"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo: FAILED:", err)
		os.Exit(1)
	}
	fmt.Println("demo: all steps passed")
}

var stepN int

func step(format string, args ...any) {
	stepN++
	fmt.Printf("\n== %d. %s\n", stepN, fmt.Sprintf(format, args...))
}

func show(format string, args ...any) { fmt.Printf("   %s\n", fmt.Sprintf(format, args...)) }

func run() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	step("start etcd %s (mutual TLS), kube-apiserver %s and a Vault %s dev server on loopback",
		harness.Versions()["ETCD_VERSION"], harness.Versions()["KUBE_VERSION"], harness.Versions()["VAULT_VERSION"])
	start := time.Now()
	env, err := harness.StartEnv(ctx, harness.EnvOptions{Kube: true, Vault: true})
	if err != nil {
		return err
	}
	defer func() {
		step("tear down")
		env.Stop()
		show("stopped every component and removed %s", env.Dir)
	}()
	show("ready in %s: etcd %s, kube-apiserver %s, vault %s", time.Since(start).Round(time.Millisecond),
		env.Etcd.Endpoint, env.Kube.URL, env.Vault.Addr)

	step("etcd: put and get over mutual TLS")
	if _, err := env.Etcd.Client.Put(ctx, "/keyward/demo", "hello"); err != nil {
		return err
	}
	resp, err := env.Etcd.Client.Get(ctx, "/keyward/demo")
	if err != nil || len(resp.Kvs) != 1 {
		return fmt.Errorf("etcd get: %v", err)
	}
	show("/keyward/demo = %q", resp.Kvs[0].Value)

	step("kube-apiserver: a namespace, a pod, and a token bound to that pod for audience %q", "keyward")
	v, err := env.Kube.Client.Discovery().ServerVersion()
	if err != nil {
		return err
	}
	show("server version %s", v.GitVersion)
	k := env.Kube
	if _, err := k.CreateNamespace(ctx, "payments-dev", map[string]string{"keyward.dev/environment": "dev"}); err != nil {
		return err
	}
	if _, err := k.CreateServiceAccount(ctx, "payments-dev", "api"); err != nil {
		return err
	}
	pod, err := k.CreatePod(ctx, "payments-dev", "api-0", "api", "node-1")
	if err != nil {
		return err
	}
	token, err := k.PodToken(ctx, pod, []string{"keyward"}, 10*time.Minute)
	if err != nil {
		return err
	}
	tr, err := k.Client.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{
		Spec: authenticationv1.TokenReviewSpec{Token: token, Audiences: []string{"keyward"}},
	}, metav1.CreateOptions{})
	if err != nil {
		return err
	}
	if !tr.Status.Authenticated {
		return fmt.Errorf("TokenReview did not authenticate the pod token")
	}
	show("TokenReview: %s, pod %v (uid %v)", tr.Status.User.Username,
		tr.Status.User.Extra["authentication.kubernetes.io/pod-name"], tr.Status.User.Extra["authentication.kubernetes.io/pod-uid"])

	step("Vault: KV v2 secret, read by the pod after logging in with its own token (kubernetes auth)")
	vault := env.Vault
	if err := vault.EnableKVv2(ctx, "kv"); err != nil {
		return err
	}
	if _, err := vault.PutKV(ctx, "kv", "dev/payments/db", map[string]any{"password": "demo-" + fmt.Sprint(time.Now().Unix())}); err != nil {
		return err
	}
	if err := vault.Client.Sys().PutPolicyWithContext(ctx, "dev-payments", `path "kv/data/dev/payments/*" { capabilities = ["read"] }`); err != nil {
		return err
	}
	if err := vault.KubernetesAuth(ctx, "kubernetes", k); err != nil {
		return err
	}
	if err := vault.KubernetesRole(ctx, "kubernetes", "dev", []string{"payments-dev"}, []string{"api"}, []string{"dev-payments"}, "keyward"); err != nil {
		return err
	}
	login, err := vault.Client.Logical().WriteWithContext(ctx, "auth/kubernetes/login", map[string]any{"role": "dev", "jwt": token})
	if err != nil {
		return err
	}
	podClient, err := vault.Client.Clone()
	if err != nil {
		return err
	}
	podClient.SetToken(login.Auth.ClientToken)
	s, err := podClient.KVv2("kv").Get(ctx, "dev/payments/db")
	if err != nil {
		return err
	}
	show("the pod read kv/dev/payments/db version %d (keys: %d; values are not printed)", s.VersionMetadata.Version, len(s.Data))

	step("SoftHSM2: a non-extractable AES-256 key encrypts with CKM_AES_GCM inside the token")
	dir, err := harness.ShortTempDir("kw-demo-hsm-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	hsm, err := harness.NewSoftHSM(dir, "demo")
	if err != nil {
		return err
	}
	return hsmRoundTrip(hsm)
}

func hsmRoundTrip(h *harness.SoftHSM) error {
	os.Setenv("SOFTHSM2_CONF", h.ConfPath)
	p := pkcs11.New(h.Module)
	if p == nil {
		return fmt.Errorf("cannot load %s", h.Module)
	}
	defer p.Destroy()
	if err := p.Initialize(); err != nil {
		return err
	}
	defer p.Finalize()
	sess, err := p.OpenSession(h.Slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return err
	}
	if err := p.Login(sess, pkcs11.CKU_USER, h.UserPIN); err != nil {
		return err
	}
	key, err := p.GenerateKey(sess, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, "demo-kek"),
	})
	if err != nil {
		return err
	}
	_, err = p.GetAttributeValue(sess, key, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
	show("reading the key value from the HSM: %v", err)
	if err == nil {
		return fmt.Errorf("the HSM handed out the key value")
	}
	iv := make([]byte, 12)
	if _, err := rand.Read(iv); err != nil {
		return err
	}
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, pkcs11.NewGCMParams(iv, []byte("demo"), 128))}
	if err := p.EncryptInit(sess, mech, key); err != nil {
		return err
	}
	ct, err := p.Encrypt(sess, []byte("a 32-byte data encryption key!!!"))
	if err != nil {
		return err
	}
	if err := p.DecryptInit(sess, mech, key); err != nil {
		return err
	}
	pt, err := p.Decrypt(sess, ct)
	if err != nil {
		return err
	}
	show("token %q slot %d: 32 bytes -> %d bytes of AES-GCM ciphertext -> %d bytes back", h.TokenLabel, h.Slot, len(ct), len(pt))
	return nil
}
