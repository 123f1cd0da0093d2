package csi

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	provider "sigs.k8s.io/secrets-store-csi-driver/provider/v1alpha1"
	pkcs12 "software.sslmate.com/src/go-pkcs12"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/broker/policy"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/internal/fault"
)

// kvBroker hands out a value per "ref#key" at a version per ref, and records what it is asked.
type kvBroker struct {
	mu       sync.Mutex
	values   map[string]string
	versions map[string]int
	refused  []error
	asked    [][]broker.SecretRef
	returned [][]byte
}

func (b *kvBroker) Fetch(_ context.Context, req broker.Request) ([]broker.Secret, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.asked = append(b.asked, req.Refs)
	out := make([]broker.Secret, len(req.Refs))
	for i, r := range req.Refs {
		v, ok := b.values[r.Ref+"#"+r.Key]
		if !ok {
			return nil, fmt.Errorf("%s: %w", r, fault.ErrNotFound)
		}
		val := []byte(v)
		b.returned = append(b.returned, val)
		out[i] = broker.Secret{Ref: r, Version: max(b.versions[r.Ref], 1), Value: val, Environment: "prod"}
	}
	return out, nil
}

func (b *kvBroker) Refuse(_ context.Context, _ broker.Request, err error) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refused = append(b.refused, err)
	return nil
}

func (b *kvBroker) Release(string) func(context.Context) error       { return nil }
func (b *kvBroker) ReleaseVolume(string) func(context.Context) error { return nil }

func (b *kvBroker) set(refKey, value string, version int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.values[refKey] = value
	b.versions[strings.Split(refKey, "#")[0]] = version
}

// certificate is a self-signed certificate and its key, as PEM.
func certificate(t *testing.T) (certPEM, keyPEM string, cert *x509.Certificate, key *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "api.payments.svc"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ = x509.ParseCertificate(der)
	k8, _ := x509.MarshalPKCS8PrivateKey(key)
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})), string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: k8})), cert, key
}

const dbCanary = "CANARY-db@pass:w/rd"

// renderedVolume has a plain entry, a DSN template, a PKCS#12 keystore from a certificate and key in
// Vault, and PEM from a PKCS#12 keystore stored in base64.
const renderedVolume = `
- {ref: payments/db, key: password, file: db-password}
- file: dsn
  template: "postgresql://{{ userinfo .db.username .db.password }}@{{ .db.host }}:5432/app"
  refs: {db: payments/db}
- file: keystore.p12
  format: pkcs12
  template: '{{ index .tls "tls.crt" }}{{ index .tls "tls.key" }}'
  password: '{{ .ks.password }}'
  refs: {tls: payments/tls, ks: payments/keystore}
- file: from-p12.pem
  format: pem
  template: '{{ b64dec .ks.p12 }}'
  password: '{{ .ks.password }}'
  refs: {ks: payments/keystore}
`

type keystore struct {
	certPEM, keyPEM string
	cert            *x509.Certificate
	key             *ecdsa.PrivateKey
	p12             []byte
}

func newKVBroker(t *testing.T) (*kvBroker, keystore) {
	t.Helper()
	var ks keystore
	ks.certPEM, ks.keyPEM, ks.cert, ks.key = certificate(t)
	var err error
	if ks.p12, err = pkcs12.Modern.Encode(ks.key, ks.cert, nil, "ks-CANARY-pw"); err != nil {
		t.Fatal(err)
	}
	return &kvBroker{versions: map[string]int{}, values: map[string]string{
		"payments/db#password": dbCanary, "payments/db#username": "app", "payments/db#host": "db.internal",
		"payments/tls#tls.crt": ks.certPEM, "payments/tls#tls.key": ks.keyPEM,
		"payments/keystore#password": "ks-CANARY-pw", "payments/keystore#p12": base64.StdEncoding.EncodeToString(ks.p12),
	}}, ks
}

// A template entry reads exactly the keys its template names: they join the volume's refs (each
// distinct ref and key once, a plain entry's too), in the order of first use, which is what the
// broker authorizes, fetches and audits.
func TestTemplateEntriesParse(t *testing.T) {
	v, err := ParseVolume(attrs(renderedVolume), nil, "keyward")
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range v.Refs() {
		got = append(got, r.String())
	}
	want := []string{"payments/db#password", "payments/db#host", "payments/db#username", "payments/tls#tls.crt", "payments/tls#tls.key",
		"payments/keystore#password", "payments/keystore#p12"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("refs %v, want %v", got, want)
	}
	if f := v.Files[1]; f.Template == nil || !reflect.DeepEqual(f.reads, []int{1, 0, 2}) || f.Format != "" {
		t.Fatalf("dsn: %+v", f)
	}
	if f := v.Files[3]; f.Format != "pem" || f.Password == nil || !reflect.DeepEqual(f.reads, []int{6, 5}) {
		t.Fatalf("from-p12.pem: %+v", f)
	}
	pinned, err := ParseVolume(attrs("- {file: f, template: '{{ .db.password }}', refs: {db: payments/db@3}}"), nil, "keyward")
	if err != nil || pinned.Refs()[0] != (broker.SecretRef{Ref: "payments/db", Key: "password", Version: 3}) {
		t.Fatalf("a pinned version: %v %v", pinned.Refs(), err)
	}
	if v.Weight() != broker.AnswerBudget(v.SizeLimit, 7) {
		t.Fatalf("weight %d counts %d refs", v.Weight(), len(v.Refs()))
	}
}

// A template entry is checked whole before anything is fetched; the error names the entry.
func TestTemplateEntriesAreValidated(t *testing.T) {
	many := "- file: f\n  refs: {db: payments/db}\n  template: '"
	for i := range broker.MaxRefs + 1 {
		many += fmt.Sprintf("{{ .db.k%d }}", i)
	}
	many += "'"
	for name, tc := range map[string]struct{ secrets, msg string }{
		"template and key":        {"- {file: f, ref: payments/db, key: k, template: '{{ .db.k }}', refs: {db: payments/db}}", "ref, key and version are for plain entries"},
		"template without refs":   {"- {file: f, template: 'x'}", "needs refs"},
		"refs without template":   {"- {file: f, ref: payments/db, key: k, refs: {db: payments/db}}", "refs is for a template"},
		"password on a plain":     {"- {file: f, ref: payments/db, key: k, format: pkcs12, password: x}", "password is a template over refs"},
		"password without format": {"- {file: f, template: '{{ .db.k }}', password: '{{ .db.p }}', refs: {db: payments/db}}", "password is for format"},
		"undeclared name":         {"- {file: f, template: '{{ .db.k }}{{ .vault.token }}', refs: {db: payments/db}}", `"vault" is not one of the entry's refs`},
		"a ref not read":          {"- {file: f, template: '{{ .db.k }}', refs: {db: payments/db, ca: shared/ca}}", "refs.ca: the template reads none of its keys"},
		"env":                     {"- {file: f, template: '{{ env \"VAULT_TOKEN\" }}{{ .db.k }}', refs: {db: payments/db}}", `function "env" not defined`},
		"printf":                  {"- {file: f, template: '{{ printf \"%s\" .db.k }}', refs: {db: payments/db}}", `function "printf" is not allowed`},
		"bad name":                {"- {file: f, template: '{{ .db.k }}', refs: {db: payments/db, my-ca: shared/ca}}", "want an identifier"},
		"bad ref":                 {"- {file: f, template: '{{ .db.k }}', refs: {db: ../etc}}", "refs.db"},
		"version 0":               {"- {file: f, template: '{{ .db.k }}', refs: {db: payments/db@0}}", "positive"},
		"bad key":                 {"- {file: f, template: '{{ index .db \"a/b\" }}', refs: {db: payments/db}}", "not a valid key"},
		"bad format":              {"- {file: f, ref: payments/db, key: k, format: jks}", "want pkcs12 or pem"},
		"oversize template":       {"- {file: f, refs: {db: payments/db}, template: '{{ .db.k }}" + strings.Repeat("x", 16<<10) + "'}", "max 16384"},
		"too many keys":           {many, "the volume reads 65 keys (max 64)"},
		"second entry":            {"- {ref: a/b, key: k, file: f}\n- {file: g, template: '{{ range .db.k }}{{ end }}', refs: {db: payments/db}}", `secrets[1] (file "g"): template: line 1`},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := ParseVolume(attrs(tc.secrets), nil, "keyward")
			if !errors.Is(err, fault.ErrInvalid) || !strings.Contains(err.Error(), tc.msg) || !strings.Contains(err.Error(), "secrets[") {
				t.Fatalf("err = %v, want InvalidArgument naming the entry and %q", err, tc.msg)
			}
		})
	}
}

// Rendered files are delivered like plain ones (tmpfs, read-only, ..version naming every ref and key
// read); a republish with unchanged inputs swaps nothing, though a PKCS#12 encoding differs each
// time (the digest counts a keystore by its inputs); a rotation of one input swaps the files and
// counts a version; the keystore and the PEM decode to the certificate and key.
func TestRenderedFilesArePublishedAndSwappedOnlyOnChange(t *testing.T) {
	kb, ks := newKVBroker(t)
	events := &eventLog{}
	n := newNode(t, func(o *Options) { o.Broker, o.Events = kb, events })
	target := n.target(podA, "secrets")
	req := n.publishReq(podA, target, renderedVolume)
	if err := n.publish(req); err != nil {
		t.Fatal(err)
	}
	read := func(name string) []byte {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(target, name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	if got, want := string(read("dsn")), "postgresql://app:CANARY-db%40pass%3Aw%2Frd@db.internal:5432/app"; got != want {
		t.Fatalf("dsn %q, want %q", got, want)
	}
	key, cert, chain, err := pkcs12.DecodeChain(read("keystore.p12"), "ks-CANARY-pw")
	if err != nil || !cert.Equal(ks.cert) || len(chain) != 0 || !ks.key.Equal(key) {
		t.Fatalf("keystore.p12 does not decode to the certificate and key: %v", err)
	}
	if b, _ := pem.Decode(read("from-p12.pem")); b == nil || b.Type != "PRIVATE KEY" || !strings.HasSuffix(string(read("from-p12.pem")), ks.certPEM) {
		t.Fatalf("from-p12.pem:\n%s", read("from-p12.pem"))
	}
	for name, want := range map[string]os.FileMode{"dsn": 0o400, "keystore.p12": 0o400, "from-p12.pem": 0o400} {
		if st, err := os.Stat(filepath.Join(target, name)); err != nil || st.Mode().Perm() != want {
			t.Fatalf("%s: %v %v", name, st.Mode(), err)
		}
	}
	d, _ := readVersionFile(t, target)
	if d.Version != 1 || len(d.Refs) != 7 || d.Refs["payments/tls#tls.key"] != 1 {
		t.Fatalf("..version %+v", d)
	}
	payload := func() string {
		t.Helper()
		l, err := os.Readlink(filepath.Join(target, "..data"))
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	first, p12 := payload(), read("keystore.p12")
	for range 3 {
		if err := n.publish(req); err != nil {
			t.Fatal(err)
		}
	}
	if payload() != first || !bytes.Equal(read("keystore.p12"), p12) {
		t.Fatal("republishes of unchanged inputs swapped the files (a fresh PKCS#12 encoding counted as a change)")
	}
	if rot, _ := events.take(); len(rot) != 0 {
		t.Fatalf("rotations on unchanged republishes: %v", rot)
	}

	kb.set("payments/db#password", dbCanary+"-2", 2)
	if err := n.publish(req); err != nil {
		t.Fatal(err)
	}
	if payload() == first || !strings.Contains(string(read("dsn")), "CANARY-db%40pass%3Aw%2Frd-2@") {
		t.Fatalf("a rotated input did not reach the rendered file: %q", read("dsn"))
	}
	if d, _ := readVersionFile(t, target); d.Version != 2 || d.Refs["payments/db#password"] != 2 || d.Refs["payments/keystore#p12"] != 1 {
		t.Fatalf("..version after the rotation %+v", d)
	}
	if rot, _ := events.take(); len(rot) != 1 || !strings.Contains(rot[0], "payments/db#password") || strings.Contains(rot[0], "keystore") {
		t.Fatalf("rotation events %v", rot)
	}
	if _, _, _, err := pkcs12.DecodeChain(read("keystore.p12"), "ks-CANARY-pw"); err != nil {
		t.Fatal(err)
	}
	second := payload()
	if err := n.publish(req); err != nil || payload() != second {
		t.Fatalf("a republish after the rotation swapped again: %v", err)
	}
	kb.mu.Lock()
	defer kb.mu.Unlock()
	for _, v := range kb.returned {
		if !bytes.Equal(v, make([]byte, len(v))) {
			t.Fatal("a value (a template's input) was not zeroed after the publish")
		}
	}
}

// What a template renders, and the values it reads, appear in no error, log line, audit record or
// event: not when rendering fails on a value (the error names the entry and the function), not when
// it succeeds. A republish whose rendering fails keeps the files it has.
func TestRenderedValuesAreNeverReported(t *testing.T) {
	kb, _ := newKVBroker(t)
	events := &eventLog{}
	core, logs := observer.New(zap.DebugLevel)
	n := newNode(t, func(o *Options) { o.Broker, o.Events, o.Log = kb, events, zap.New(core) })
	target := n.target(podA, "secrets")
	req := n.publishReq(podA, target, renderedVolume)
	if err := n.publish(req); err != nil {
		t.Fatal(err)
	}
	var errs []string
	bad := n.publishReq(podA, n.target(podA, "bad"), "- {file: f, template: 'x{{ b64dec .db.password }}', refs: {db: payments/db}}")
	err := n.publish(bad)
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), `secrets[0] (file "f"): template: line 1, column 4: b64dec: the value is not standard base64`) {
		t.Fatalf("a value b64dec refuses: %v", err)
	}
	if _, serr := os.Stat(n.target(podA, "bad")); !os.IsNotExist(serr) {
		t.Fatal("a failed render left a mount or directory")
	}
	errs = append(errs, err.Error())
	// The same volume, its template now failing on a rotated value: the files stay.
	kb.set("payments/keystore#p12", "not base64 "+dbCanary, 2)
	err = n.publish(req)
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), `secrets[3] (file "from-p12.pem")`) {
		t.Fatalf("a republish whose template fails: %v", err)
	}
	if b, rerr := os.ReadFile(filepath.Join(target, "dsn")); rerr != nil || !strings.Contains(string(b), "@db.internal") {
		t.Fatalf("the files were not kept: %v", rerr)
	}
	errs = append(errs, err.Error())
	// Too large: the rendered output is bounded by the volume's size.
	big := n.publishReq(podA, n.target(podA, "big"), "- {file: f, template: '{{ .tls.tls_crt }}{{ .tls.tls_crt }}', refs: {tls: payments/big}}")
	big.VolumeContext[AttrSizeLimit] = "4096"
	kb.set("payments/big#tls_crt", dbCanary+strings.Repeat("x", 3000), 1)
	err = n.publish(big)
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), `secrets[0] (file "f")`) {
		t.Fatalf("an output larger than the volume: %v", err)
	}
	errs = append(errs, err.Error())

	kb.mu.Lock()
	for _, e := range kb.refused {
		errs = append(errs, e.Error())
	}
	refusals := len(kb.refused)
	kb.mu.Unlock()
	if refusals != 3 {
		t.Fatalf("%d refusals audited, want one per failed render", refusals)
	}
	_, denied := events.take()
	everything := strings.Join(append(errs, denied...), "\n")
	for _, e := range logs.All() {
		everything += "\n" + e.Message + fmt.Sprint(e.ContextMap())
	}
	for _, v := range []string{"CANARY", "ks-CANARY-pw", "BEGIN", "MII"} {
		if strings.Contains(everything, v) {
			t.Fatalf("a value (%s) in an error, a log line, an audit refusal or an event:\n%s", v, everything)
		}
	}
	if len(denied) != 3 {
		t.Fatalf("denied events %v", denied)
	}
}

// fixedAuthn proves every token to be the same pod.
type fixedAuthn struct{ id broker.Identity }

func (a fixedAuthn) Authenticate(context.Context, broker.Token, []string) (broker.Identity, error) {
	return a.id, nil
}

// countingSource serves every allowed ref and counts the fetches.
type countingSource struct {
	mu    sync.Mutex
	calls int
}

func (s *countingSource) Fetch(_ context.Context, _ broker.Identity, _ broker.Token, refs []broker.Resolved, _ int64) ([]broker.Secret, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls++
	out := make([]broker.Secret, len(refs))
	for i, r := range refs {
		out[i] = broker.Secret{Ref: r.SecretRef, Version: 4, Value: []byte("CANARY-" + r.Ref + "-" + r.Key)}
	}
	return out, nil
}

// A template goes through the broker exactly as the plain entries for the same keys would: every key
// it reads is authorized by the policy before anything is fetched, one it is not granted refuses the
// publish (PermissionDenied, nothing fetched or mounted), and the audit record names every ref and
// key it reads, the same record the plain entries get.
func TestTemplateRefsAreScopedAndAuditedLikePlainEntries(t *testing.T) {
	pol, err := policy.Parse([]byte(`
environments:
  - {name: prod, vaultMount: kv, vaultPrefix: prod, vaultRole: prod}
grants:
  - {namespace: payments, serviceAccount: api, paths: ["payments/*"]}
`))
	if err != nil {
		t.Fatal(err)
	}
	aud, src := &audit.Memory{}, &countingSource{}
	svc, err := broker.NewService(broker.Options{Authenticator: fixedAuthn{broker.Identity{Namespace: "payments", ServiceAccount: "api", PodName: "api-0", PodUID: podA}},
		Authorizer: policy.NewAuthorizer(pol, policy.StaticNamespaces{"payments": "prod", "other": "prod"}), Source: src, Auditor: aud, Audiences: []string{"keyward"}})
	if err != nil {
		t.Fatal(err)
	}
	n := newNode(t, func(o *Options) { o.Broker = svc })
	last := func() audit.Event {
		evs := aud.Events()
		ev := evs[len(evs)-1]
		ev.Time, ev.RequestID, ev.LatencyMS = time.Time{}, "", 0
		return ev
	}
	denied := map[string]string{
		"template": "- {file: f, template: '{{ .db.password }}:{{ .other.password }}', refs: {db: payments/db, other: other/db}}",
		"plain":    "- {ref: payments/db, key: password, file: f}\n- {ref: other/db, key: password, file: g}",
	}
	records := map[string]audit.Event{}
	for kind, secrets := range denied {
		target := n.target(podA, kind)
		err := n.publish(n.publishReq(podA, target, secrets))
		if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "other/db#password") {
			t.Fatalf("%s: %v", kind, err)
		}
		if _, serr := os.Stat(target); !os.IsNotExist(serr) {
			t.Fatalf("%s: a refused publish mounted something", kind)
		}
		records[kind] = last()
	}
	if src.calls != 0 {
		t.Fatalf("%d fetches for refused publishes", src.calls)
	}
	tr := records["template"]
	if tr.Decision != audit.Denied || tr.Code != "PermissionDenied" || tr.Object.Ref != "payments/db,other/db" || tr.Object.Key != "password,password" ||
		!strings.Contains(tr.Reason, "other/db#password") {
		t.Fatalf("the template's refusal record %+v", tr)
	}
	if !reflect.DeepEqual(tr, records["plain"]) {
		t.Fatalf("the template's record differs from the plain entries':\n%+v\n%+v", tr, records["plain"])
	}

	target := n.target(podA, "allowed")
	if err := n.publish(n.publishReq(podA, target, "- {file: dsn, template: '{{ .db.username }}:{{ .db.password }}', refs: {db: payments/db}}")); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(target, "dsn")); string(b) != "CANARY-payments/db-username:CANARY-payments/db-password" {
		t.Fatalf("dsn %q", b)
	}
	ok := last()
	if ok.Decision != audit.Allowed || ok.Object.Ref != "payments/db,payments/db" || ok.Object.Key != "password,username" ||
		!reflect.DeepEqual(ok.Object.Versions, []int{4, 4}) || ok.Object.Environment != "prod" {
		t.Fatalf("the allowed record %+v", ok)
	}
	raw, _ := json.Marshal(aud.Events())
	if strings.Contains(string(raw), "CANARY") {
		t.Fatal("an audit record holds a value")
	}
}

// The Secrets Store CSI Driver provider API parses the same entries: templates and pem are rendered
// into the files it returns (an ObjectVersion per ref and key read); pkcs12 is refused
// (InvalidArgument, audited, nothing fetched): the driver would rewrite a keystore encoded afresh at
// every rotation poll.
func TestProviderRendersTemplatesAndRefusesPKCS12(t *testing.T) {
	kb, ks := newKVBroker(t)
	p, err := NewProviderServer(Options{Broker: kb, Audience: "keyward", Log: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	mount := func(secrets string) (*provider.MountResponse, error) {
		a, _ := json.Marshal(attrs(secrets, func(m map[string]string) { m[attrSecretProviderClass] = "spc" }))
		return p.Mount(context.Background(), &provider.MountRequest{Attributes: string(a), TargetPath: "/ignored", Permission: "420"})
	}
	resp, err := mount(`
- file: dsn
  template: "{{ .db.username }}@{{ .db.host }}"
  refs: {db: payments/db}
- {file: tls.pem, format: pem, template: '{{ b64dec .ks.p12 }}', password: '{{ .ks.password }}', refs: {ks: payments/keystore}}
`)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Files) != 2 || string(resp.Files[0].Contents) != "app@db.internal" || !strings.HasSuffix(string(resp.Files[1].Contents), ks.certPEM) {
		t.Fatalf("files %v", resp.Files)
	}
	var ids []string
	for _, ov := range resp.ObjectVersion {
		ids = append(ids, ov.Id+"@"+ov.Version)
	}
	if want := "payments/db#host@1 payments/db#username@1 payments/keystore#p12@1 payments/keystore#password@1"; strings.Join(ids, " ") != want {
		t.Fatalf("object versions %v, want %s", ids, want)
	}
	kb.mu.Lock()
	asked := len(kb.asked)
	kb.mu.Unlock()
	_, err = mount("- {file: ks.p12, ref: payments/tls, key: tls.crt, format: pkcs12}")
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), `secrets[0] (file "ks.p12"): format pkcs12 is not served through the Secrets Store CSI Driver`) {
		t.Fatalf("pkcs12 through the provider API: %v", err)
	}
	kb.mu.Lock()
	defer kb.mu.Unlock()
	if len(kb.asked) != asked || len(kb.refused) != 1 {
		t.Fatalf("fetched %d, refused %d", len(kb.asked)-asked, len(kb.refused))
	}
}

// The README's examples (Rendered files) parse, and the first renders what its comments say.
func TestReadmeRenderedExamples(t *testing.T) {
	raw, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(raw), "### Rendered files")
	if !ok {
		t.Fatal("README has no Rendered files section")
	}
	section, _, _ = strings.Cut(section, "\n### ")
	var lists []string
	for _, block := range strings.Split(section, "```yaml\n")[1:] {
		block, _, _ = strings.Cut(block, "```")
		var entries []string
		for _, l := range strings.Split(block, "\n") {
			if e, ok := strings.CutPrefix(l, "    "); ok {
				entries = append(entries, e)
			}
		}
		lists = append(lists, strings.Join(entries, "\n"))
	}
	if len(lists) != 3 {
		t.Fatalf("%d examples", len(lists))
	}
	for i, l := range lists {
		if _, err := ParseVolume(attrs(l), nil, "keyward"); err != nil {
			t.Fatalf("example %d: %v\n%s", i+1, err, l)
		}
	}
	v, _ := ParseVolume(attrs(lists[0]), nil, "keyward")
	values := map[string]string{"username": "payments", "password": "p@ss:w0rd", "host": "db.payments.svc"}
	var secrets []broker.Secret
	for _, r := range v.Refs() {
		secrets = append(secrets, broker.Secret{Ref: r, Value: []byte(values[r.Key])})
	}
	p, err := v.render(secrets, -1)
	if err != nil {
		t.Fatal(err)
	}
	var comments []string
	for _, l := range strings.Split(lists[0], "\n") {
		if strings.HasPrefix(l, "- file: ") {
			_, c, _ := strings.Cut(l, "#")
			comments = append(comments, strings.TrimSpace(c))
		}
	}
	for i, f := range p.files {
		if string(f.Data) != comments[i] {
			t.Errorf("%s renders %q, the README says %q", f.Name, f.Data, comments[i])
		}
	}
}
