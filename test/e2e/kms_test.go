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
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/keyward/keyward/kms/envelope"
	"github.com/keyward/keyward/kms/plugin"
	"github.com/keyward/keyward/test/harness"
)

const secretCanary = "CANARY-etcd-plaintext-7f3a9c"

// kmsPlugin is keyward-kms running as a process against a SoftHSM token.
type kmsPlugin struct {
	owner                                            *testing.T // the test the plugin lives as long as
	dir, socket, config, auditLog, auditKey, metrics string
	env                                              []string
	hsm                                              *harness.SoftHSM
	proc                                             *proc
	client                                           kmsapi.KeyManagementServiceClient
	// extraArgs are added to keyward-kms's flags at the next start.
	extraArgs []string
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
	p := &kmsPlugin{owner: t, dir: dir, socket: filepath.Join(dir, "kms.sock"), config: filepath.Join(dir, "kms.yaml"),
		auditLog: filepath.Join(dir, "kms-audit"), auditKey: filepath.Join(dir, "audit.key"),
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
	p.proc = startFor(t, p.owner, p.env, filepath.Join(p.dir, "keyward-kms.log"), "keyward-kms",
		append([]string{"--socket", p.socket, "--config", p.config, "--metrics-address", p.metrics,
			"--node-name", "node-1", "--audit-dir", p.auditLog, "--audit-key-file", p.auditKey, "--log-level", "debug", "--grace", "5s"},
			p.extraArgs...)...)
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
	return scrape(t, p.metrics, name)
}

// scrape is the lines of the metric name (with its labels) served at addr's /metrics.
func scrape(t *testing.T, addr, name string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
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
	if err := harness.WriteEncryptionConfig(path, socket, 3*time.Second); err != nil {
		t.Fatal(err)
	}
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

// kmsScenario is keyward-kms as kube-apiserver's KMS v2 provider, step by step.
type kmsScenario struct {
	p          *kmsPlugin
	etcd       *harness.Etcd
	kube       *harness.KubeAPIServer
	key1, key2 string
	etcdFlags  []string
}

const kmsNamespace = "payments"

func TestKMSWithKubeAPIServer(t *testing.T) {
	s := &kmsScenario{p: newKMSPlugin(t)}
	// Started here, not in a step: they serve every step.
	s.etcd = harness.EtcdT(t)
	s.kube = harness.KubeT(t, harness.KubeOptions{Etcd: s.etcd, EncryptionConfig: encryptionConfig(t, s.p.dir, s.p.socket)})
	runSteps(t,
		step{"status, and the socket is not taken over", s.statusAndSocket},
		step{"Secrets are encrypted under the HSM's key", s.encrypted},
		step{"a plugin and an apiserver restart keep everything readable", s.restarts},
		step{"rotation: the apiserver moves to the new key", s.rotate},
		step{"migrate, then retire the old key", s.migrateAndRetire},
		step{"an HSM outage, then recovery by itself", s.hsmOutage},
		step{"the audit verifies and holds no secret", s.audit},
	)
}

func (s *kmsScenario) secrets() corev1client.SecretInterface {
	return s.kube.Client.CoreV1().Secrets(kmsNamespace)
}

// readAll reads the first five Secrets back.
func (s *kmsScenario) readAll(t *testing.T) {
	t.Helper()
	for i := range 5 {
		sec, err := s.secrets().Get(context.Background(), fmt.Sprintf("db-%d", i), metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got := string(sec.Data["password"]); got != fmt.Sprintf("%s-%d", secretCanary, i) {
			t.Fatalf("db-%d reads back %q", i, got)
		}
	}
}

func (s *kmsScenario) statusAndSocket(t *testing.T) {
	p := s.p
	st, _ := p.status(t)
	s.key1 = st.KeyId
	if st.Version != "v2" || !strings.HasPrefix(s.key1, "kek.1.") {
		t.Fatalf("status %+v", st)
	}
	// A second instance must not take over the served socket.
	second := start(t, p.env, filepath.Join(p.dir, "second.log"), "keyward-kms", "--socket", p.socket, "--config", p.config,
		"--metrics-address", "", "--audit-dir", p.auditLog+".2", "--audit-key-file", p.auditKey)
	<-second.done
	if b, _ := os.ReadFile(second.log); second.cmd.ProcessState.ExitCode() != 1 || !bytes.Contains(b, []byte("served by another process")) {
		t.Fatalf("second instance: exit %d: %s", second.cmd.ProcessState.ExitCode(), b)
	}
	if _, err := p.status(t); err != nil {
		t.Fatalf("first instance disturbed: %v", err)
	}
}

func (s *kmsScenario) encrypted(t *testing.T) {
	ctx := context.Background()
	if _, err := s.kube.CreateNamespace(ctx, kmsNamespace, nil); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		_, err := s.secrets().Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("db-%d", i)},
			StringData: map[string]string{"password": fmt.Sprintf("%s-%d", secretCanary, i)}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if id := rawKeyID(t, s.etcd, kmsNamespace, fmt.Sprintf("db-%d", i)); id != s.key1 {
			t.Fatalf("db-%d under %s, want %s", i, id, s.key1)
		}
	}
	s.etcdFlags = []string{"--etcd-endpoint", s.etcd.Endpoint, "--etcd-ca", s.etcd.CA.CertFile,
		"--etcd-cert", s.etcd.ClientCert.CertFile, "--etcd-key", s.etcd.ClientCert.KeyFile}
	code, out := ctl(t, nil, append([]string{"kms", "coverage", "-o", "json"}, s.etcdFlags...)...)
	var cov struct {
		Total       int
		ByKeyID     map[string]int
		Unencrypted []string
	}
	if err := json.Unmarshal([]byte(out), &cov); code != 0 || err != nil || cov.ByKeyID["keyward/"+s.key1] != 5 || len(cov.Unencrypted) != 0 {
		t.Fatalf("coverage: exit %d %v: %s", code, err, out)
	}
}

// Restart the plugin (socket removed on SIGTERM), then the apiserver: everything still reads.
func (s *kmsScenario) restarts(t *testing.T) {
	p := s.p
	p.proc.stop(t)
	if code := p.proc.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("keyward-kms exit code %d after SIGTERM", code)
	}
	if _, err := os.Stat(p.socket); !os.IsNotExist(err) {
		t.Fatalf("socket left after SIGTERM: %v", err)
	}
	p.start(t)
	if st, _ := p.status(t); st.KeyId != s.key1 {
		t.Fatalf("key ID changed across restart: %s -> %s", s.key1, st.KeyId)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := s.kube.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	s.readAll(t)
}

// Rotate: the plugin sees the new generation on SIGHUP; the apiserver notices the new key ID on its
// next Status poll (about a minute) and starts a new DEK seed. Old Secrets still read.
func (s *kmsScenario) rotate(t *testing.T) {
	p := s.p
	if code, out := ctl(t, p.env, "kms", "keys", "rotate", "--config", p.config); code != 0 {
		t.Fatalf("rotate: %s", out)
	}
	p.proc.cmd.Process.Signal(syscall.SIGHUP)
	eventually(t, 10*time.Second, "plugin reports the new key", func() error {
		st, err := p.status(t)
		if err != nil || st.KeyId == s.key1 {
			return fmt.Errorf("key %v %v", st, err)
		}
		s.key2 = st.KeyId
		return nil
	})
	if !strings.HasPrefix(s.key2, "kek.2.") {
		t.Fatalf("new key ID %q", s.key2)
	}
	i := 0
	eventually(t, 150*time.Second, "apiserver writes under the new key", func() error {
		i++
		name := fmt.Sprintf("rotated-%d", i)
		if _, err := s.secrets().Create(context.Background(), &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name},
			StringData: map[string]string{"password": secretCanary}}, metav1.CreateOptions{}); err != nil {
			return err
		}
		if id := rawKeyID(t, s.etcd, kmsNamespace, name); id != s.key2 {
			time.Sleep(2 * time.Second)
			return fmt.Errorf("written under %s", id)
		}
		return nil
	})
	s.readAll(t)
	if id := rawKeyID(t, s.etcd, kmsNamespace, "db-0"); id != s.key1 {
		t.Fatalf("db-0 moved to %s without a rewrite", id)
	}
}

// Retiring the old key is refused while etcd holds data under it; after a migration (resumed from
// an interrupted run) it is allowed.
func (s *kmsScenario) migrateAndRetire(t *testing.T) {
	p := s.p
	retire := append([]string{"kms", "keys", "retire", "--config", p.config, "--key-id", s.key1}, s.etcdFlags...)
	if code, out := ctl(t, p.env, retire...); code != 1 || !strings.Contains(out, "still encrypted under it") {
		t.Fatalf("retire with data left: exit %d: %s", code, out)
	}
	kubeconfig, err := s.kube.WriteKubeconfig(filepath.Join(p.dir, "kubeconfig"), "")
	if err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(p.dir, "migrate.state")
	os.WriteFile(state, []byte(kmsNamespace+"/db-1\n"), 0o600) // an interrupted earlier run got as far as db-1
	code, out := ctl(t, nil, "kms", "migrate", "--kubeconfig", kubeconfig, "--state", state, "--page", "2")
	if code != 0 || !strings.Contains(out, "resuming after payments/db-1") {
		t.Fatalf("migrate: exit %d: %s", code, out)
	}
	if code, out := ctl(t, nil, "kms", "migrate", "--kubeconfig", kubeconfig, "--state", state); code != 0 {
		t.Fatalf("migrate: exit %d: %s", code, out)
	}
	for i := range 5 {
		if id := rawKeyID(t, s.etcd, kmsNamespace, fmt.Sprintf("db-%d", i)); id != s.key2 {
			t.Fatalf("db-%d still under %s after migrate", i, id)
		}
	}
	s.readAll(t)
	if code, out := ctl(t, p.env, retire...); code != 0 {
		t.Fatalf("retire after migrate: exit %d: %s", code, out)
	}
	p.proc.cmd.Process.Signal(syscall.SIGHUP)
	s.readAll(t) // the apiserver has the DEKs; nothing needs the retired key any more
}

// HSM outage under the running plugin: unhealthy, Unavailable, then recovery by itself.
func (s *kmsScenario) hsmOutage(t *testing.T) {
	p := s.p
	if err := p.hsm.HideToken(); err != nil {
		t.Fatal(err)
	}
	p.waitHealthz(t, "", 15*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	_, err := p.client.Encrypt(ctx, &kmsapi.EncryptRequest{Uid: "e2e", Plaintext: make([]byte, 32)})
	cancel()
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
	if _, err := s.secrets().Create(context.Background(), &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "after-outage"},
		StringData: map[string]string{"password": secretCanary}}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("write after recovery: %v", err)
	}
	s.readAll(t)
	for _, path := range []string{"/healthz", "/livez"} {
		resp, err := http.Get("http://" + p.metrics + path)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("%s: %v %v", path, resp, err)
		}
		resp.Body.Close()
	}
	if m := p.metric(t, "keyward_kms_key_id_hash_info"); !strings.Contains(m, plugin.KeyIDHash(s.key2)) {
		t.Fatalf("key ID hash metric %q", m)
	}
}

// The audit stream verifies; neither it nor the plugin's log holds a secret or the PIN.
func (s *kmsScenario) audit(t *testing.T) {
	p := s.p
	p.proc.stop(t)
	if code, out := ctl(t, nil, "audit", "verify", p.auditLog, "--key-file", p.auditKey); code != 0 {
		t.Fatalf("audit verify: %s", out)
	}
	audit := []byte(readFile(t, p.auditLog))
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
