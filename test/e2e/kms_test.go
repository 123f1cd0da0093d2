package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/keyward/keyward/kms/envelope"
	"github.com/keyward/keyward/kms/plugin"
	"github.com/keyward/keyward/test/harness"
)

const secretCanary = "CANARY-etcd-plaintext-7f3a9c"

// kmsPlugin is keyward-kms running as a process against a SoftHSM token.
type kmsPlugin struct {
	dir, socket, config, auditLog, auditKey, metrics string
	env                                              []string
	hsm                                              *harness.SoftHSM
	proc                                             *proc
	client                                           kmsapi.KeyManagementServiceClient
}

func newKMSPlugin(t *testing.T) *kmsPlugin {
	t.Helper()
	dir := harness.Dir(t)
	hsm, err := harness.NewSoftHSM(dir, "keyward")
	harness.Check(t, err)
	port, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	p := &kmsPlugin{dir: dir, socket: filepath.Join(dir, "kms.sock"), config: filepath.Join(dir, "kms.yaml"),
		auditLog: filepath.Join(dir, "kms-audit.log"), auditKey: filepath.Join(dir, "audit.key"),
		metrics: fmt.Sprintf("127.0.0.1:%d", port), env: hsm.Env(), hsm: hsm}
	os.WriteFile(p.auditKey, []byte(strings.Repeat("k", 48)), 0o600)
	os.WriteFile(p.config, []byte(fmt.Sprintf(`pkcs11:
  module: %s
  tokenLabel: %s
  pinFile: %s
  keyLabel: kek
  maxSessions: 4
  keyRefreshInterval: 1h
healthInterval: 300ms
`, hsm.Module, hsm.TokenLabel, hsm.PINFile)), 0o600)
	if code, out := ctl(t, p.env, "kms", "keys", "create", "--config", p.config); code != 0 {
		t.Fatalf("keywardctl kms keys create: %d %s", code, out)
	}
	conn, err := grpc.NewClient("unix://"+p.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	p.client = kmsapi.NewKeyManagementServiceClient(conn)
	p.start(t)
	return p
}

func (p *kmsPlugin) start(t *testing.T) {
	t.Helper()
	p.proc = start(t, p.env, filepath.Join(p.dir, "keyward-kms.log"), "keyward-kms",
		"--socket", p.socket, "--config", p.config, "--metrics-address", p.metrics,
		"--audit-log", p.auditLog, "--audit-key-file", p.auditKey, "--log-level", "debug", "--grace", "5s")
	p.waitHealthz(t, "ok", 30*time.Second)
}

func (p *kmsPlugin) status(t *testing.T) (*kmsapi.StatusResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	return p.client.Status(ctx, &kmsapi.StatusRequest{})
}

// waitHealthz waits until Status's healthz is "ok" (want "ok") or anything else (want "").
func (p *kmsPlugin) waitHealthz(t *testing.T, want string, timeout time.Duration) *kmsapi.StatusResponse {
	t.Helper()
	var st *kmsapi.StatusResponse
	eventually(t, timeout, "plugin healthz "+map[bool]string{true: "ok", false: "not ok"}[want == "ok"], func() error {
		if p.proc.exited() {
			b, _ := os.ReadFile(p.proc.log)
			t.Fatalf("keyward-kms exited:\n%s", b)
		}
		var err error
		st, err = p.status(t)
		if err != nil {
			return err
		}
		if (st.Healthz == "ok") != (want == "ok") {
			return fmt.Errorf("healthz %q", st.Healthz)
		}
		return nil
	})
	return st
}

func (p *kmsPlugin) metric(t *testing.T, name string) string {
	t.Helper()
	resp, err := http.Get("http://" + p.metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, name) {
			lines = append(lines, l)
		}
	}
	return strings.Join(lines, "\n")
}

func encryptionConfig(t *testing.T, dir, socket string) string {
	path := filepath.Join(dir, "encryption.yaml")
	os.WriteFile(path, []byte(fmt.Sprintf(`apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets]
    providers:
      - kms:
          apiVersion: v2
          name: keyward
          endpoint: unix://%s
          timeout: 3s
      - identity: {}
`, socket)), 0o600)
	return path
}

func rawKeyID(t *testing.T, e *harness.Etcd, ns, name string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := e.Client.Get(ctx, "/registry/secrets/"+ns+"/"+name)
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("etcd get %s/%s: %v", ns, name, err)
	}
	raw := resp.Kvs[0].Value
	if !bytes.HasPrefix(raw, []byte("k8s:enc:kms:v2:keyward:")) {
		t.Fatalf("%s/%s is stored as %q...", ns, name, raw[:min(30, len(raw))])
	}
	if bytes.Contains(raw, []byte(secretCanary)) {
		t.Fatalf("%s/%s: plaintext in etcd", ns, name)
	}
	env, err := envelope.ParseStored(raw)
	if err != nil {
		t.Fatal(err)
	}
	return env.KeyID
}

func TestKMSWithKubeAPIServer(t *testing.T) {
	p := newKMSPlugin(t)
	st, _ := p.status(t)
	key1 := st.KeyId
	if st.Version != "v2" || !strings.HasPrefix(key1, "kek.1.") {
		t.Fatalf("status %+v", st)
	}

	// A second instance must not take over the served socket.
	second := start(t, p.env, filepath.Join(p.dir, "second.log"), "keyward-kms", "--socket", p.socket, "--config", p.config,
		"--metrics-address", "", "--audit-log", p.auditLog+".2", "--audit-key-file", p.auditKey)
	<-second.done
	if b, _ := os.ReadFile(second.log); second.cmd.ProcessState.ExitCode() != 1 || !bytes.Contains(b, []byte("served by another process")) {
		t.Fatalf("second instance: exit %d: %s", second.cmd.ProcessState.ExitCode(), b)
	}
	if _, err := p.status(t); err != nil {
		t.Fatalf("first instance disturbed: %v", err)
	}

	etcd := harness.EtcdT(t)
	kube := harness.KubeT(t, harness.KubeOptions{Etcd: etcd, EncryptionConfig: encryptionConfig(t, p.dir, p.socket)})
	ctx := context.Background()
	ns := "payments"
	if _, err := kube.CreateNamespace(ctx, ns, nil); err != nil {
		t.Fatal(err)
	}
	secrets := kube.Client.CoreV1().Secrets(ns)
	for i := range 5 {
		_, err := secrets.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("db-%d", i)},
			StringData: map[string]string{"password": fmt.Sprintf("%s-%d", secretCanary, i)}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if id := rawKeyID(t, etcd, ns, fmt.Sprintf("db-%d", i)); id != key1 {
			t.Fatalf("db-%d under %s, want %s", i, id, key1)
		}
	}
	etcdFlags := []string{"--etcd-endpoint", etcd.Endpoint, "--etcd-ca", etcd.CA.CertFile,
		"--etcd-cert", etcd.ClientCert.CertFile, "--etcd-key", etcd.ClientCert.KeyFile}
	code, out := ctl(t, nil, append([]string{"kms", "coverage", "-o", "json"}, etcdFlags...)...)
	var cov struct {
		Total       int
		ByKeyID     map[string]int
		Unencrypted []string
	}
	if err := json.Unmarshal([]byte(out), &cov); code != 0 || err != nil || cov.ByKeyID["keyward/"+key1] != 5 || len(cov.Unencrypted) != 0 {
		t.Fatalf("coverage: exit %d %v: %s", code, err, out)
	}

	readAll := func() {
		t.Helper()
		for i := range 5 {
			s, err := secrets.Get(ctx, fmt.Sprintf("db-%d", i), metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if got := string(s.Data["password"]); got != fmt.Sprintf("%s-%d", secretCanary, i) {
				t.Fatalf("db-%d reads back %q", i, got)
			}
		}
	}

	// Restart the plugin (socket removed on SIGTERM), then the apiserver: everything still reads.
	p.proc.stop(t)
	if code := p.proc.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("keyward-kms exit code %d after SIGTERM", code)
	}
	if _, err := os.Stat(p.socket); !os.IsNotExist(err) {
		t.Fatalf("socket left after SIGTERM: %v", err)
	}
	p.start(t)
	if st, _ := p.status(t); st.KeyId != key1 {
		t.Fatalf("key ID changed across restart: %s -> %s", key1, st.KeyId)
	}
	startCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := kube.Restart(startCtx); err != nil {
		t.Fatal(err)
	}
	readAll()

	// Rotate: the plugin sees the new generation on SIGHUP; the apiserver notices the new key ID on
	// its next Status poll (about a minute) and starts a new DEK seed. Old Secrets still read.
	if code, out := ctl(t, p.env, "kms", "keys", "rotate", "--config", p.config); code != 0 {
		t.Fatalf("rotate: %s", out)
	}
	p.proc.cmd.Process.Signal(syscall.SIGHUP)
	var key2 string
	eventually(t, 10*time.Second, "plugin reports the new key", func() error {
		st, err := p.status(t)
		if err != nil || st.KeyId == key1 {
			return fmt.Errorf("key %v %v", st, err)
		}
		key2 = st.KeyId
		return nil
	})
	if !strings.HasPrefix(key2, "kek.2.") {
		t.Fatalf("new key ID %q", key2)
	}
	i := 0
	eventually(t, 150*time.Second, "apiserver writes under the new key", func() error {
		i++
		name := fmt.Sprintf("rotated-%d", i)
		if _, err := secrets.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name},
			StringData: map[string]string{"password": secretCanary}}, metav1.CreateOptions{}); err != nil {
			return err
		}
		if id := rawKeyID(t, etcd, ns, name); id != key2 {
			time.Sleep(2 * time.Second)
			return fmt.Errorf("written under %s", id)
		}
		return nil
	})
	readAll()
	if id := rawKeyID(t, etcd, ns, "db-0"); id != key1 {
		t.Fatalf("db-0 moved to %s without a rewrite", id)
	}
	// Retiring the old key is refused while etcd holds data under it.
	code, out = ctl(t, p.env, append([]string{"kms", "keys", "retire", "--config", p.config, "--key-id", key1}, etcdFlags...)...)
	if code != 1 || !strings.Contains(out, "still encrypted under it") {
		t.Fatalf("retire with data left: exit %d: %s", code, out)
	}

	// Re-encrypt everything under the new key, then retiring the old key is allowed.
	kubeconfig, err := kube.WriteKubeconfig(filepath.Join(p.dir, "kubeconfig"), "")
	if err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(p.dir, "migrate.state")
	os.WriteFile(state, []byte(ns+"/db-1\n"), 0o600) // an interrupted earlier run got as far as db-1
	code, out = ctl(t, nil, "kms", "migrate", "--kubeconfig", kubeconfig, "--state", state, "--page", "2")
	if code != 0 || !strings.Contains(out, "resuming after payments/db-1") {
		t.Fatalf("migrate: exit %d: %s", code, out)
	}
	code, out = ctl(t, nil, "kms", "migrate", "--kubeconfig", kubeconfig, "--state", state)
	if code != 0 {
		t.Fatalf("migrate: exit %d: %s", code, out)
	}
	for i := range 5 {
		if id := rawKeyID(t, etcd, ns, fmt.Sprintf("db-%d", i)); id != key2 {
			t.Fatalf("db-%d still under %s after migrate", i, id)
		}
	}
	readAll()
	code, out = ctl(t, p.env, append([]string{"kms", "keys", "retire", "--config", p.config, "--key-id", key1}, etcdFlags...)...)
	if code != 0 {
		t.Fatalf("retire after migrate: exit %d: %s", code, out)
	}
	p.proc.cmd.Process.Signal(syscall.SIGHUP)
	readAll() // the apiserver has the DEKs; nothing needs the retired key any more

	// HSM outage under the running plugin: unhealthy, Unavailable, then recovery by itself.
	if err := p.hsm.HideToken(); err != nil {
		t.Fatal(err)
	}
	p.waitHealthz(t, "", 15*time.Second)
	cctx, ccancel := context.WithTimeout(ctx, 3*time.Second)
	_, err = p.client.Encrypt(cctx, &kmsapi.EncryptRequest{Uid: "e2e", Plaintext: make([]byte, 32)})
	ccancel()
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("Encrypt during outage: %v, want Unavailable", err)
	}
	if err := p.hsm.ShowToken(); err != nil {
		t.Fatal(err)
	}
	p.waitHealthz(t, "ok", 30*time.Second)
	if m := p.metric(t, "keyward_kms_hsm_recoveries_total"); !strings.HasSuffix(m, " 1") {
		t.Fatalf("recoveries metric: %q", m)
	}
	if _, err := secrets.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "after-outage"},
		StringData: map[string]string{"password": secretCanary}}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("write after recovery: %v", err)
	}
	readAll()
	for _, path := range []string{"/healthz", "/livez"} {
		resp, err := http.Get("http://" + p.metrics + path)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("%s: %v %v", path, resp, err)
		}
		resp.Body.Close()
	}
	if m := p.metric(t, "keyward_kms_key_id_hash_info"); !strings.Contains(m, plugin.KeyIDHash(key2)) {
		t.Fatalf("key ID hash metric %q", m)
	}

	// The audit stream verifies; neither it nor the plugin's log holds a secret or the PIN.
	p.proc.stop(t)
	if code, out := ctl(t, nil, "audit", "verify", p.auditLog, "--key-file", p.auditKey); code != 0 {
		t.Fatalf("audit verify: %s", out)
	}
	audit, _ := os.ReadFile(p.auditLog)
	if n := bytes.Count(audit, []byte(`"event":"kms_encrypt"`)); n < 2 {
		t.Fatalf("%d kms_encrypt records", n)
	}
	logs, _ := os.ReadFile(p.proc.log)
	for name, b := range map[string][]byte{"audit log": audit, "plugin log": logs} {
		for _, secret := range []string{secretCanary, p.hsm.UserPIN} {
			if bytes.Contains(b, []byte(secret)) {
				t.Fatalf("%s contains a secret", name)
			}
		}
	}
}
