package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	pkcs12 "software.sslmate.com/src/go-pkcs12"

	"github.com/keyward/keyward/internal/audit"
)

// renderedSecrets is the README's example (Rendered files): a DSN and a .pgpass rendered from one
// Vault secret's keys, and a PKCS#12 keystore for a Java app from a certificate, its key and the
// keystore's password in another.
const renderedSecrets = `
- file: dsn
  template: "postgresql://{{ userinfo .db.username .db.password }}@{{ .db.host }}:5432/payments"
  refs: {db: payments-prod/app-db}
- file: .pgpass
  template: "{{ .db.host }}:5432:*:{{ .db.username }}:{{ pgpass .db.password }}"
  refs: {db: payments-prod/app-db}
- file: keystore.p12
  format: pkcs12
  template: '{{ index .tls "tls.crt" }}{{ index .tls "tls.key" }}'
  password: '{{ index .tls "keystore-password" }}'
  refs: {tls: payments-prod/tls}
`

// Rendered files with keyward-broker (the binary), the simulated kubelet, the real apiserver and
// Vault: the files render from the keys in Vault; a republish of unchanged secrets swaps nothing
// (though a PKCS#12 encoding differs every time); a rotation in Vault changes the rendered files,
// counts a ..version and posts SecretsRotated; a template naming a ref the pod is not granted is
// refused PermissionDenied and audited with every ref it reads; no value reaches the audit stream,
// the broker's log, an event or who-has.
func TestRenderedFilesFollowVault(t *testing.T) {
	e := newBrokerEnv(t)
	ctx := context.Background()
	password, ksPassword := "CANARY-rendered:p@ss/"+fmt.Sprint(time.Now().UnixNano()), "CANARY-keystore-pw"
	certPEM, keyPEM, cert, key := selfSigned(t)
	if _, err := e.vault.PutKV(ctx, "kv", "prod/payments-prod/app-db", map[string]any{"username": "payments", "password": password, "host": "db.payments.svc"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.vault.PutKV(ctx, "kv", "prod/payments-prod/tls", map[string]any{"tls.crt": certPEM, "tls.key": keyPEM, "keystore-password": ksPassword}); err != nil {
		t.Fatal(err)
	}
	d := startDriver(t, e, driverOptions{})
	pod := e.pods["payments-prod"]
	if err := d.kl.publish(t, pod, renderedSecrets, ""); err != nil {
		t.Fatal(err)
	}
	target := d.kl.target(t, pod)
	esc := strings.NewReplacer(":", "%3A", "@", "%40", "/", "%2F").Replace(password)
	if got := readFile(t, filepath.Join(target, "dsn")); got != "postgresql://payments:"+esc+"@db.payments.svc:5432/payments" {
		t.Fatalf("dsn %.60q", got)
	}
	if got := readFile(t, filepath.Join(target, ".pgpass")); got != "db.payments.svc:5432:*:payments:"+strings.ReplaceAll(password, ":", `\:`) {
		t.Fatalf(".pgpass %.60q", got)
	}
	keystore := func() {
		t.Helper()
		k, c, chain, err := pkcs12.DecodeChain([]byte(readFile(t, filepath.Join(target, "keystore.p12"))), ksPassword)
		if err != nil || !c.Equal(cert) || len(chain) != 0 || !key.Equal(k) {
			t.Fatalf("keystore.p12 does not decode to the certificate and key: %v", err)
		}
	}
	keystore()
	v1 := versionOf(t, target)
	db1 := v1.Refs["payments-prod/app-db#password"]
	if v1.Version != 1 || len(v1.Refs) != 6 || db1 == 0 || v1.Refs["payments-prod/tls#keystore-password"] == 0 {
		t.Fatalf("..version %+v", v1)
	}
	payload := func() string {
		t.Helper()
		l, err := os.Readlink(filepath.Join(target, "..data"))
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	first := payload()
	for range 2 {
		if err := d.kl.publish(t, pod, renderedSecrets, ""); err != nil {
			t.Fatal(err)
		}
	}
	if payload() != first || versionOf(t, target).Version != 1 {
		t.Fatal("republishes of unchanged secrets swapped the files")
	}

	rotated := password + "-rotated"
	if _, err := e.vault.PutKV(ctx, "kv", "prod/payments-prod/app-db", map[string]any{"username": "payments", "password": rotated, "host": "db.payments.svc"}); err != nil {
		t.Fatal(err)
	}
	if err := d.kl.publish(t, pod, renderedSecrets, ""); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, filepath.Join(target, "dsn")); !strings.Contains(got, ":"+esc+"-rotated@") {
		t.Fatalf("the rotation did not reach the rendered dsn: %.60q", got)
	}
	keystore()
	v2 := versionOf(t, target)
	if v2.Version != 2 || v2.Refs["payments-prod/app-db#password"] != db1+1 || v2.Refs["payments-prod/tls#tls.key"] != v1.Refs["payments-prod/tls#tls.key"] {
		t.Fatalf("..version after the rotation %+v", v2)
	}
	waitEvent(t, e, pod, "SecretsRotated", fmt.Sprintf("secrets volume swapped, ..version 2: payments-prod/app-db#host version %d -> %d, payments-prod/app-db#password version %d -> %d, payments-prod/app-db#username version %d -> %d",
		db1, db1+1, db1, db1+1, db1, db1+1))
	_, who := ctl(t, nil, "who-has", "payments-prod/app-db#password", d.auditLog)
	if !strings.Contains(who, fmt.Sprintf("newest version %d; 1 of 1 pods have it", db1+1)) {
		t.Fatalf("who-has:\n%s", who)
	}

	// A template naming a ref the pod is not granted: refused before anything is read, audited with
	// every ref and key it reads, and the pod hears why.
	other := e.newPod(t, "payments-prod", "api-9")
	err := d.kl.publish(t, other, "- {file: f, template: '{{ .db.password }}{{ .dev.password }}', refs: {db: payments-prod/db, dev: payments-dev/db}}", "")
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "payments-dev/db#password") {
		t.Fatalf("a template naming another namespace's secret: %v", err)
	}
	waitEvent(t, e, other, "SecretsDenied", "publish refused: "+status.Convert(err).Message())
	var deny *audit.Record
	for _, r := range d.records(t) {
		if r.Subject.Pod == "api-9" {
			deny = &r
		}
	}
	if deny == nil || deny.Decision != audit.Denied || deny.Code != "PermissionDenied" || deny.Object.Ref != "payments-prod/db,payments-dev/db" || deny.Object.Key != "password,password" {
		t.Fatalf("the refusal's audit record %+v", deny)
	}

	everything := readFile(t, d.auditLog) + readFile(t, d.proc.log) + who
	for _, ev := range append(eventsOf(t, e, pod, "SecretsRotated"), eventsOf(t, e, other, "SecretsDenied")...) {
		everything += ev.Message
	}
	for _, v := range []string{password, rotated, ksPassword, esc, "PRIVATE KEY", strings.Split(keyPEM, "\n")[1]} {
		if strings.Contains(everything, v) {
			t.Fatalf("a value (%.20s...) in the audit stream, the broker's log, an event or who-has", v)
		}
	}
}

// selfSigned is a certificate and its key, as PEM and parsed.
func selfSigned(t *testing.T) (certPEM, keyPEM string, cert *x509.Certificate, key *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "api.payments-prod.svc"}, DNSNames: []string{"api.payments-prod.svc"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	if cert, err = x509.ParseCertificate(der); err != nil {
		t.Fatal(err)
	}
	k8, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})), string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: k8})), cert, key
}
