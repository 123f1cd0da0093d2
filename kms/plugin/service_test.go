package plugin_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apiserver/pkg/server/options/encryptionconfig"
	"k8s.io/apiserver/pkg/storage/value"
	"k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/internal/fault"
	"github.com/keyward/keyward/internal/grpcserver"
	"github.com/keyward/keyward/kms/envelope"
	"github.com/keyward/keyward/kms/kmstest"
	"github.com/keyward/keyward/kms/plugin"
	"github.com/keyward/keyward/test/harness"
)

// canary is a DEK seed that must never show up in a log line or an audit record.
var canary = []byte("CANARY-dek-seed-0123456789abcdef")

type testPlugin struct {
	socket   string
	svc      *plugin.Service
	mem      *kmstest.Memory
	logs     *observer.ObservedLogs
	auditLog string
	auditKey string
}

func startPlugin(t *testing.T, auditor func(path, key string) audit.Auditor) *testPlugin {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "kw-kms-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	p := &testPlugin{socket: filepath.Join(dir, "kms.sock"), mem: kmstest.NewMemory(),
		auditLog: filepath.Join(dir, "audit"), auditKey: filepath.Join(dir, "audit.key")}
	os.WriteFile(p.auditKey, bytes.Repeat([]byte("a"), 32), 0o600)
	core, logs := observer.New(zap.DebugLevel)
	p.logs = logs
	var aud audit.Auditor
	if auditor != nil {
		aud = auditor(p.auditLog, p.auditKey)
	} else {
		l, err := audit.Open(audit.Options{Dir: p.auditLog, KeyFile: p.auditKey, Node: "node-1", Stream: "kms"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		aud = l
	}
	p.svc, err = plugin.NewService(plugin.ServiceOptions{Wrapper: p.mem, Auditor: aud, Logger: zap.New(core), HealthInterval: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	lis, err := grpcserver.Listen(p.socket)
	if err != nil {
		t.Fatal(err)
	}
	gs := grpcserver.NewServer(zap.New(core), nil)
	plugin.NewGRPCServer(p.svc).Register(gs)
	done := make(chan struct{})
	go func() { grpcserver.Serve(ctx, gs, lis, time.Second); close(done) }()
	go p.svc.Run(ctx)
	t.Cleanup(func() { cancel(); <-done })
	return p
}

// apiserverClient is kube-apiserver's own KMS v2 client.
func apiserverClient(t *testing.T, p *testPlugin) kmsservice.Service {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	c, err := kmsv2.NewGRPCService(ctx, "unix://"+p.socket, "keyward", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func waitHealthy(t *testing.T, c kmsservice.Service) *kmsservice.StatusResponse {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		st, err := c.Status(context.Background())
		if err == nil && st.Healthz == "ok" {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("plugin not healthy: %+v %v", st, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// (Over 60 lines: one conversation with the apiserver's own KMS v2 client, step after step.)
func TestServiceThroughApiserverClient(t *testing.T) {
	p := startPlugin(t, nil)
	c := apiserverClient(t, p)
	ctx := context.Background()
	st := waitHealthy(t, c)
	cur, _ := p.mem.KeyID(ctx)
	if st.Version != "v2" || st.KeyID != cur {
		t.Fatalf("status = %+v, want v2 and key %s", st, cur)
	}
	enc, err := c.Encrypt(ctx, "uid-1", canary)
	if err != nil {
		t.Fatal(err)
	}
	if enc.KeyID != cur || string(enc.Annotations[plugin.AnnotationKey]) == "" {
		t.Fatalf("encrypt = key %q annotations %v", enc.KeyID, enc.Annotations)
	}
	pt, err := c.Decrypt(ctx, "uid-2", &kmsservice.DecryptRequest{Ciphertext: enc.Ciphertext, KeyID: enc.KeyID, Annotations: enc.Annotations})
	if err != nil || !bytes.Equal(pt, canary) {
		t.Fatalf("decrypt = %q, %v", pt, err)
	}
	// Bad input: InvalidArgument, and the plugin stays healthy.
	tampered := bytes.Clone(enc.Ciphertext)
	tampered[len(tampered)-1] ^= 1
	for name, req := range map[string]*kmsservice.DecryptRequest{
		"tampered":       {Ciphertext: tampered, KeyID: enc.KeyID},
		"unknown key ID": {Ciphertext: enc.Ciphertext, KeyID: "memory.99.x"},
		"empty key ID":   {Ciphertext: enc.Ciphertext},
		"bad annotation": {Ciphertext: enc.Ciphertext, KeyID: enc.KeyID, Annotations: map[string][]byte{plugin.AnnotationKey: []byte("rot13")}},
	} {
		_, err := c.Decrypt(ctx, "uid-bad", req)
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: %v, want InvalidArgument", name, err)
		}
	}
	if err := p.svc.Healthz(); err != nil {
		t.Fatalf("bad input made the plugin unhealthy: %v", err)
	}
	// An HSM outage: Unavailable and unhealthy at once, healthy again by itself afterwards.
	p.mem.SetUnavailable(true)
	if _, err := c.Encrypt(ctx, "uid-3", canary); status.Code(err) != codes.Unavailable {
		t.Fatalf("encrypt during outage: %v, want Unavailable", err)
	}
	if st, _ := c.Status(ctx); st == nil || st.Healthz == "ok" {
		t.Fatalf("status during outage = %+v", st)
	}
	p.mem.SetUnavailable(false)
	waitHealthy(t, c)
	// Rotation: Status reports the new key ID; old ciphertexts still decrypt.
	newID := p.mem.Rotate()
	if st, _ := c.Status(ctx); st.KeyID != newID {
		t.Fatalf("status key after rotation = %q, want %q", st.KeyID, newID)
	}
	if _, err := c.Decrypt(ctx, "uid-4", &kmsservice.DecryptRequest{Ciphertext: enc.Ciphertext, KeyID: enc.KeyID}); err != nil {
		t.Fatalf("old ciphertext after rotation: %v", err)
	}

	// One audit record per Encrypt/Decrypt, verifiable, without the DEK seed.
	key, _ := audit.ReadKey(p.auditKey)
	rep, err := audit.VerifyDir(p.auditLog, audit.VerifyOptions{Key: key, Node: "node-1", Stream: "kms"})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Records != 9 { // genesis + 1 encrypt + 1 decrypt + 4 bad decrypts + 1 failed encrypt + 1 decrypt
		t.Fatalf("%d audit records, want 9", rep.Records)
	}
	raw, _ := audit.ReadAll(p.auditLog)
	for _, want := range []string{`"request_id":"uid-1"`, `"event":"kms_encrypt"`, `"event":"kms_decrypt"`,
		`"code":"InvalidArgument"`, `"code":"Unavailable"`, `"key_id":"` + enc.KeyID + `"`} {
		if !bytes.Contains(raw, []byte(want)) {
			t.Errorf("audit log lacks %s", want)
		}
	}
	assertNoCanary(t, "audit log", raw)
	for _, e := range p.logs.All() {
		assertNoCanary(t, "log line", []byte(fmt.Sprint(e.Message, e.ContextMap())))
	}
}

func assertNoCanary(t *testing.T, where string, b []byte) {
	t.Helper()
	for _, enc := range [][]byte{canary, []byte(fmt.Sprintf("%x", canary)), []byte(strings.TrimRight(fmt.Sprintf("%v", canary), "]"))} {
		if bytes.Contains(b, enc) {
			t.Fatalf("the DEK seed leaked into the %s", where)
		}
	}
}

type failingAuditor struct{}

func (failingAuditor) Record(context.Context, audit.Event) error {
	return fmt.Errorf("disk full: %w", fault.ErrUnavailable)
}

func TestAuditFailureFailsClosed(t *testing.T) {
	p := startPlugin(t, func(string, string) audit.Auditor { return failingAuditor{} })
	c := apiserverClient(t, p)
	waitHealthy(t, c)
	resp, err := c.Encrypt(context.Background(), "uid", canary)
	if status.Code(err) != codes.Unavailable || resp != nil {
		t.Fatalf("encrypt without audit: %v, %v; want Unavailable and no ciphertext", resp, err)
	}
}

// A caller's input quoted in a refusal is bounded in the audit record: a 64 KiB annotation leaves at
// most a few hundred bytes of reason, and the record says who refused and why.
func TestRefusalReasonBounded(t *testing.T) {
	mem := &audit.Memory{}
	p := startPlugin(t, func(string, string) audit.Auditor { return mem })
	c := apiserverClient(t, p)
	waitHealthy(t, c)
	ctx := context.Background()
	enc, err := c.Encrypt(ctx, "uid-enc", canary)
	if err != nil {
		t.Fatal(err)
	}
	huge := bytes.Repeat([]byte("x"), 64<<10)
	_, err = c.Decrypt(ctx, "uid-huge", &kmsservice.DecryptRequest{Ciphertext: enc.Ciphertext, KeyID: enc.KeyID,
		Annotations: map[string][]byte{plugin.AnnotationKey: huge}})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("decrypt with a 64 KiB annotation: %v, want InvalidArgument", err)
	}
	var found bool
	for _, ev := range mem.Events() {
		if ev.RequestID != "uid-huge" {
			continue
		}
		found = true
		if ev.Decision != audit.Denied || ev.Code != "InvalidArgument" {
			t.Errorf("record = %s/%s, want deny/InvalidArgument", ev.Decision, ev.Code)
		}
		if len(ev.Reason) > 256 || !strings.HasPrefix(ev.Reason, "unknown ciphertext format") || !strings.HasSuffix(ev.Reason, "...") {
			t.Errorf("reason of %d bytes: %.80q", len(ev.Reason), ev.Reason)
		}
	}
	if !found {
		t.Fatal("no audit record for the refused decrypt")
	}
}

// The Secrets transformer kube-apiserver builds from an EncryptionConfiguration, talking to the plugin.
func TestEncryptionConfigTransformer(t *testing.T) {
	p := startPlugin(t, nil)
	cfgPath := filepath.Join(t.TempDir(), "encryption.yaml")
	if err := harness.WriteEncryptionConfig(cfgPath, p.socket, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ec, err := encryptionconfig.LoadEncryptionConfig(ctx, cfgPath, false, "test-apiserver")
	if err != nil {
		t.Fatal(err)
	}
	tr := ec.Transformers[schema.GroupResource{Resource: "secrets"}]
	if tr == nil {
		t.Fatal("no transformer for secrets")
	}
	dataCtx := value.DefaultContext("/registry/secrets/payments/db")
	secret := []byte(`{"kind":"Secret","data":{"password":"` + string(canary) + `"}}`)
	var stored []byte
	deadline := time.Now().Add(20 * time.Second)
	for stored, err = tr.TransformToStorage(ctx, secret, dataCtx); err != nil; stored, err = tr.TransformToStorage(ctx, secret, dataCtx) {
		if time.Now().After(deadline) {
			t.Fatalf("TransformToStorage: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !bytes.HasPrefix(stored, []byte("k8s:enc:kms:v2:keyward:")) || bytes.Contains(stored, canary) {
		t.Fatalf("stored value %q", stored[:min(40, len(stored))])
	}
	env, err := envelope.ParseStored(stored)
	cur, _ := p.mem.KeyID(ctx)
	if err != nil || env.Provider != "keyward" || env.KeyID != cur || string(env.Annotations[plugin.AnnotationKey]) != "aes-256-gcm;v1" {
		t.Fatalf("envelope = %+v, %v", env, err)
	}
	back, _, err := tr.TransformFromStorage(ctx, stored, dataCtx)
	if err != nil || !bytes.Equal(back, secret) {
		t.Fatalf("TransformFromStorage = %q, %v", back, err)
	}
	// The value is bound to its etcd key (authenticated data) and tamper-evident.
	if _, _, err := tr.TransformFromStorage(ctx, stored, value.DefaultContext("/registry/secrets/other/db")); err == nil {
		t.Fatal("value moved to another key decrypted")
	}
	bad := bytes.Clone(stored)
	bad[len(bad)-5] ^= 1
	if _, _, err := tr.TransformFromStorage(ctx, bad, dataCtx); err == nil {
		t.Fatal("tampered value decrypted")
	}
	if _, err := envelope.ParseStored([]byte("k8s:enc:aescbc:v1:key1:xxxx")); !errors.Is(err, envelope.ErrNotKMSv2) {
		t.Fatalf("aescbc value: %v", err)
	}
}

// While the audit stream cannot be written, Status is not "ok" and says why (kube-apiserver's
// health check then shows it); it is "ok" again as soon as the stream is.
func TestStatusReportsAuditHealth(t *testing.T) {
	var broken atomic.Bool
	svc, err := plugin.NewService(plugin.ServiceOptions{Wrapper: kmstest.NewMemory(), Auditor: &audit.Memory{}, Logger: zap.NewNop(),
		HealthInterval: time.Hour, AuditHealth: func() error {
			if broken.Load() {
				return errors.New("audit records cannot be written since 10:00: no space left on device")
			}
			return nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	svc.CheckHealth(ctx)
	healthz := func() string { st, _ := svc.Status(ctx); return st.Healthz }
	if h := healthz(); h != "ok" {
		t.Fatalf("healthz %q", h)
	}
	broken.Store(true)
	if h := healthz(); !strings.Contains(h, "no space left on device") {
		t.Fatalf("healthz with a full audit disk: %q", h)
	}
	broken.Store(false)
	if h := healthz(); h != "ok" {
		t.Fatalf("healthz after recovery: %q", h)
	}
}
