package harness_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	authenticationv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keyward/keyward/test/harness"
)

var env *harness.Env

func TestMain(m *testing.M) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*harness.StartTimeout)
	var err error
	env, err = harness.StartEnv(ctx, harness.EnvOptions{Kube: true, Vault: true})
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, "harness:", err)
		if harness.MissingIsSkip(err) {
			fmt.Fprintln(os.Stderr, "KEYWARD_ALLOW_SKIP=1: skipping the package")
			os.Exit(0)
		}
		os.Exit(1)
	}
	code := m.Run()
	env.Stop()
	os.Exit(code)
}

// runs numbers the runs of the tests that name objects in the shared env, so -count=N can repeat them.
var runs atomic.Int32

// named returns a function suffixing names with this run's number.
func named() func(string) string {
	id := runs.Add(1)
	return func(s string) string { return fmt.Sprintf("%s-%d", s, id) }
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestMissingBinaryNamesInstallCommand(t *testing.T) {
	t.Setenv("KEYWARD_CACHE", t.TempDir())
	_, err := harness.Binary("kube-apiserver")
	if !errors.Is(err, harness.ErrMissing) {
		t.Fatalf("err = %v, want ErrMissing", err)
	}
	if !strings.Contains(err.Error(), "make deps") || !strings.Contains(err.Error(), "build-kube-apiserver.sh") {
		t.Fatalf("error does not say how to install: %v", err)
	}
	t.Setenv("CI", "true")
	t.Setenv("KEYWARD_ALLOW_SKIP", "1")
	if harness.AllowSkip() {
		t.Fatal("skipping must never be allowed in CI")
	}
}

func TestEtcdPutGetWithClientCertificate(t *testing.T) {
	e := harness.EtcdT(t)
	ctx := ctxT(t)
	if _, err := e.Client.Put(ctx, "/keyward/smoke", "value-1"); err != nil {
		t.Fatal(err)
	}
	resp, err := e.Client.Get(ctx, "/keyward/smoke")
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "value-1" {
		t.Fatalf("get = %v", resp.Kvs)
	}
	// Without a client certificate etcd must refuse the connection.
	tlsConf, err := e.TLSConfig()
	if err != nil {
		t.Fatal(err)
	}
	tlsConf.Certificates = nil
	anon, err := clientv3.New(clientv3.Config{Endpoints: []string{e.Endpoint}, TLS: tlsConf, DialTimeout: time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer anon.Close()
	actx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if _, err := anon.Get(actx, "/keyward/smoke"); err == nil {
		t.Fatal("etcd answered a client without a certificate")
	}
}

func TestKubeTokenRequestAndReview(t *testing.T) {
	ctx := ctxT(t)
	k := env.Kube
	ns := named()("smoke-tokens")
	if _, err := k.CreateNamespace(ctx, ns, map[string]string{"keyward.dev/environment": "dev"}); err != nil {
		t.Fatal(err)
	}
	if _, err := k.CreateServiceAccount(ctx, ns, "app"); err != nil {
		t.Fatal(err)
	}
	pod, err := k.CreatePod(ctx, ns, "app-0", "app", "node-1")
	if err != nil {
		t.Fatal(err)
	}
	token, err := k.PodToken(ctx, pod, []string{"keyward"}, 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	review := func(audiences ...string) *authenticationv1.TokenReviewStatus {
		tr, err := k.Client.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{
			Spec: authenticationv1.TokenReviewSpec{Token: token, Audiences: audiences},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return &tr.Status
	}
	st := review("keyward")
	if !st.Authenticated {
		t.Fatalf("pod token not authenticated: %q", st.Error)
	}
	if st.User.Username != "system:serviceaccount:"+ns+":app" {
		t.Fatalf("username = %q", st.User.Username)
	}
	if got := st.User.Extra["authentication.kubernetes.io/pod-uid"]; len(got) != 1 || got[0] != string(pod.UID) {
		t.Fatalf("pod-uid extra = %v, want %s", got, pod.UID)
	}
	if got := st.User.Extra["authentication.kubernetes.io/pod-name"]; len(got) != 1 || got[0] != pod.Name {
		t.Fatalf("pod-name extra = %v", got)
	}
	if st := review("someone-else"); st.Authenticated {
		t.Fatal("token accepted for an audience it was not issued for")
	}
}

func TestVaultKVv2(t *testing.T) {
	ctx := ctxT(t)
	v := env.Vault
	kv := named()("smoke-kv")
	if err := v.EnableKVv2(ctx, kv); err != nil {
		t.Fatal(err)
	}
	if _, err := v.PutKV(ctx, kv, "prod/payments/db", map[string]any{"password": "v1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.PutKV(ctx, kv, "prod/payments/db", map[string]any{"password": "v2"}); err != nil {
		t.Fatal(err)
	}
	s, err := v.Client.KVv2(kv).Get(ctx, "prod/payments/db")
	if err != nil {
		t.Fatal(err)
	}
	if s.Data["password"] != "v2" || s.VersionMetadata.Version != 2 {
		t.Fatalf("latest = %v (version %d)", s.Data, s.VersionMetadata.Version)
	}
	old, err := v.Client.KVv2(kv).GetVersion(ctx, "prod/payments/db", 1)
	if err != nil {
		t.Fatal(err)
	}
	if old.Data["password"] != "v1" {
		t.Fatalf("version 1 = %v", old.Data)
	}
}

// (Over 60 lines: one login flow against the real Vault and apiserver, step after step.)
func TestVaultKubernetesAuthAsPod(t *testing.T) {
	ctx := ctxT(t)
	k, v := env.Kube, env.Vault
	n := named()
	kv, auth, web, other, policy := n("smoke-k8s"), n("smoke-kubernetes"), n("smoke-web"), n("smoke-other"), n("smoke-dev-read")
	if err := v.EnableKVv2(ctx, kv); err != nil {
		t.Fatal(err)
	}
	if _, err := v.PutKV(ctx, kv, "dev/web/api", map[string]any{"key": "k1"}); err != nil {
		t.Fatal(err)
	}
	if err := v.Client.Sys().PutPolicyWithContext(ctx, policy, fmt.Sprintf(`path "%s/data/dev/*" { capabilities = ["read"] }`, kv)); err != nil {
		t.Fatal(err)
	}
	if err := v.KubernetesAuth(ctx, auth, k); err != nil {
		t.Fatal(err)
	}
	if err := v.KubernetesRole(ctx, auth, "dev", []string{web}, []string{"web"}, []string{policy}, "keyward"); err != nil {
		t.Fatal(err)
	}
	for _, ns := range []string{web, other} {
		if _, err := k.CreateNamespace(ctx, ns, nil); err != nil {
			t.Fatal(err)
		}
		if _, err := k.CreateServiceAccount(ctx, ns, "web"); err != nil {
			t.Fatal(err)
		}
	}
	login := func(ns string) (string, error) {
		pod, err := k.CreatePod(ctx, ns, "web-0", "web", "node-1")
		if err != nil {
			t.Fatal(err)
		}
		jwt, err := k.PodToken(ctx, pod, []string{"keyward"}, 10*time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		s, err := v.Client.Logical().WriteWithContext(ctx, "auth/"+auth+"/login", map[string]any{"role": "dev", "jwt": jwt})
		if err != nil {
			return "", err
		}
		return s.Auth.ClientToken, nil
	}
	tok, err := login(web)
	if err != nil {
		t.Fatalf("pod login: %v", err)
	}
	c, err := v.Client.Clone()
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken(tok)
	s, err := c.KVv2(kv).Get(ctx, "dev/web/api")
	if err != nil || s.Data["key"] != "k1" {
		t.Fatalf("read as pod: %v %v", s, err)
	}
	if _, err := c.KVv2(kv).Get(ctx, "prod/web/api"); err == nil {
		t.Fatal("pod read outside its policy")
	}
	if _, err := login(other); err == nil {
		t.Fatal("a pod of another namespace logged in to the dev role")
	}
}

// (Over 60 lines: one PKCS#11 session from login to the key's attributes and a round trip.)
func TestSoftHSMNonExtractableAESGCM(t *testing.T) {
	h := harness.SoftHSMT(t, "smoke")
	p := pkcs11.New(h.Module)
	if p == nil {
		t.Fatalf("cannot load %s", h.Module)
	}
	if err := p.Initialize(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Finalize(); p.Destroy() })
	sess, err := p.OpenSession(h.Slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Login(sess, pkcs11.CKU_USER, h.UserPIN); err != nil {
		t.Fatal(err)
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
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, "smoke-kek"),
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.GetAttributeValue(sess, key, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)}); err == nil {
		t.Fatal("the HSM handed out the key value")
	}
	iv := make([]byte, 12)
	rand.Read(iv)
	aad := []byte("keyward-smoke")
	plaintext := []byte("0123456789abcdef0123456789abcdef")
	gcm := func(aad []byte) []*pkcs11.Mechanism {
		return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, pkcs11.NewGCMParams(iv, aad, 128))}
	}
	if err := p.EncryptInit(sess, gcm(aad), key); err != nil {
		t.Fatal(err)
	}
	ct, err := p.Encrypt(sess, plaintext)
	if err != nil {
		t.Fatal(err)
	}
	if len(ct) != len(plaintext)+16 || bytes.Contains(ct, plaintext) {
		t.Fatalf("ciphertext of %d bytes", len(ct))
	}
	if err := p.DecryptInit(sess, gcm(aad), key); err != nil {
		t.Fatal(err)
	}
	pt, err := p.Decrypt(sess, ct)
	if err != nil || !bytes.Equal(pt, plaintext) {
		t.Fatalf("decrypt = %q, %v", pt, err)
	}
	// Other additional data: GCM authentication must fail inside the HSM.
	if err := p.DecryptInit(sess, gcm([]byte("other")), key); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Decrypt(sess, ct); err == nil {
		t.Fatal("decrypt with wrong AAD succeeded")
	}
}
