package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"

	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/test/harness"
)

// dynamicPolicy is brokerPolicy with the prod environment's PKI and database mounts and grants of
// payments-prod's roles; BUDGETS is replaced by each test's issue budgets.
const dynamicPolicy = `
environments:
  - {name: prod, vaultMount: kv, vaultPrefix: prod, vaultRole: prod, pkiMount: pki-prod, databaseMount: database-prod}
  - {name: dev, vaultMount: kv, vaultPrefix: dev, vaultRole: dev}
grants:
  - namespace: payments-prod
    serviceAccount: api
    paths: ["payments-prod/*", "shared/tls/*"]
    pkiRoles: ["payments-prod_*"]
    databaseRoles: ["payments-prod_*"]
  - {namespace: other-prod, serviceAccount: api, paths: ["other-prod/*"]}
BUDGETS
`

// dynamicSecrets is a volume with a certificate (its three parts) and database credentials.
const dynamicSecrets = `
- {file: tls.crt, key: cert, pki: {role: payments-prod_web, commonName: api.payments.svc, altNames: [api.payments.svc.cluster.local, 127.0.0.1], ttl: 60s}}
- {file: tls.key, key: key, pki: {role: payments-prod_web, commonName: api.payments.svc, altNames: [api.payments.svc.cluster.local, 127.0.0.1], ttl: 60s}}
- {file: ca.crt, key: chain, mode: "0444", pki: {role: payments-prod_web, commonName: api.payments.svc, altNames: [api.payments.svc.cluster.local, 127.0.0.1], ttl: 60s}}
- {file: db-user, key: username, database: {role: payments-prod_ro}}
- {file: db-password, key: password, database: {role: payments-prod_ro}}
- {file: kv-password, ref: payments-prod/db, key: password}
- {file: local.crt, key: cert, pki: {role: payments-prod_web, commonName: local.payments.svc, generate: local, ttl: 60s}}
- {file: local.key, key: key, pki: {role: payments-prod_web, commonName: local.payments.svc, generate: local, ttl: 60s}}
`

// dynamicEnv is the broker env with a real PostgreSQL, and Vault's PKI and database engines set up
// for the prod environment as deploy/vault/setup.sh does it.
type dynamicEnv struct {
	*brokerEnv
	pg *harness.Postgres
	ca *x509.CertPool
}

// Database credentials live dbTTL (renewed for as long again); certificates are asked for 60s.
const dbTTL = 20 * time.Second

func newDynamicEnv(t *testing.T) *dynamicEnv {
	t.Helper()
	e := &dynamicEnv{brokerEnv: newBrokerEnv(t), pg: harness.PostgresT(t)}
	ctx := context.Background()
	v := e.vault
	caPEM, err := v.EnablePKI(ctx, "pki-prod")
	if err != nil {
		t.Fatal(err)
	}
	e.ca = x509.NewCertPool()
	if !e.ca.AppendCertsFromPEM(caPEM) {
		t.Fatal("the PKI mount's CA is not PEM")
	}
	for _, step := range []func() error{
		func() error {
			return v.PKIRole(ctx, "pki-prod", "payments-prod_web", []string{"payments.svc", "payments.svc.cluster.local"}, time.Hour)
		},
		func() error { return v.EnableDatabase(ctx, "database-prod", e.pg) },
		func() error { return v.DatabaseRole(ctx, "database-prod", "payments-prod_ro", dbTTL, 10*time.Minute) },
		func() error { return v.PutDynamicPolicy(ctx, "kubernetes", "pki-prod", "database-prod", "prod") },
		func() error {
			return v.KubernetesRole(ctx, "kubernetes", "prod", []string{"payments-prod", "other-prod"}, []string{"*"}, []string{"prod-read", "prod-dynamic"}, audience)
		},
	} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	return e
}

// leaseIDs lists the lease IDs Vault holds under prefix (as root: the test's view, not the broker's).
func (e *dynamicEnv) leaseIDs(t *testing.T, prefix string) []string {
	t.Helper()
	sec, err := e.vault.Client.Logical().List("sys/leases/lookup/" + prefix)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	if sec != nil {
		keys, _ := sec.Data["keys"].([]any)
		for _, k := range keys {
			out = append(out, prefix+fmt.Sprint(k))
		}
	}
	return out
}

// hashOf is the lease hash the broker writes and audits: a prefix of the lease ID's SHA-256.
func hashOf(id string) string {
	h := sha256.Sum256([]byte(id))
	return hex.EncodeToString(h[:8])
}

// leaseByHash finds the lease ID under prefix with the hash ("" if none).
func (e *dynamicEnv) leaseByHash(t *testing.T, prefix, hash string) string {
	for _, id := range e.leaseIDs(t, prefix) {
		if hashOf(id) == hash {
			return id
		}
	}
	return ""
}

const (
	pkiLeases = "pki-prod/issue/payments-prod_web/"
	// Certificates whose key the driver made: Vault signed a CSR.
	signLeases = "pki-prod/sign/payments-prod_web/"
	dbLeases   = "database-prod/creds/payments-prod_ro/"
)

// delivered is what a publish of dynamicSecrets put in the volume.
type delivered struct {
	cert, local                   *x509.Certificate
	user, password                string
	pkiLease, dbLease, localLease string // hashes, from ..version
	version                       uint64
	certPEM, keyPEM               []byte
	chainPEM, kvSecret            string
}

func (e *dynamicEnv) read(t *testing.T, target string) delivered {
	t.Helper()
	var d delivered
	d.certPEM = []byte(readFile(t, filepath.Join(target, "tls.crt")))
	d.keyPEM = []byte(readFile(t, filepath.Join(target, "tls.key")))
	d.chainPEM = readFile(t, filepath.Join(target, "ca.crt"))
	d.user, d.password = readFile(t, filepath.Join(target, "db-user")), readFile(t, filepath.Join(target, "db-password"))
	d.kvSecret = readFile(t, filepath.Join(target, "kv-password"))
	pair, err := tls.X509KeyPair(d.certPEM, d.keyPEM)
	if err != nil {
		t.Fatalf("tls.crt and tls.key are not a key pair: %v", err)
	}
	if d.cert, err = x509.ParseCertificate(pair.Certificate[0]); err != nil {
		t.Fatal(err)
	}
	inter := x509.NewCertPool()
	inter.AppendCertsFromPEM([]byte(d.chainPEM))
	if _, err := d.cert.Verify(x509.VerifyOptions{Roots: e.ca, Intermediates: inter, DNSName: "api.payments.svc.cluster.local"}); err != nil {
		t.Fatalf("the certificate does not verify against the PKI mount's CA for its alt name: %v", err)
	}
	if d.cert.Subject.CommonName != "api.payments.svc" || len(d.cert.IPAddresses) != 1 || !d.cert.IPAddresses[0].Equal([]byte{127, 0, 0, 1}) {
		t.Fatalf("certificate subject %s, IPs %v", d.cert.Subject, d.cert.IPAddresses)
	}
	// The certificate whose key the driver generated: a pair, signed by the same CA, a P-256 key.
	localPair, err := tls.X509KeyPair([]byte(readFile(t, filepath.Join(target, "local.crt"))), []byte(readFile(t, filepath.Join(target, "local.key"))))
	if err != nil {
		t.Fatalf("local.crt and local.key are not a key pair: %v", err)
	}
	if d.local, err = x509.ParseCertificate(localPair.Certificate[0]); err != nil {
		t.Fatal(err)
	}
	if _, err := d.local.Verify(x509.VerifyOptions{Roots: e.ca, Intermediates: inter, DNSName: "local.payments.svc"}); err != nil {
		t.Fatalf("the locally keyed certificate does not verify: %v", err)
	}
	if k, ok := d.local.PublicKey.(*ecdsa.PublicKey); !ok || k.Curve != elliptic.P256() {
		t.Fatalf("the locally generated key is %T, want ECDSA P-256", d.local.PublicKey)
	}
	ver := versionOf(t, target)
	d.pkiLease, d.dbLease, d.version = ver.Leases["pki:payments-prod_web/api.payments.svc"], ver.Leases["database:payments-prod_ro"], ver.Version
	d.localLease = ver.Leases["pki:payments-prod_web/local.payments.svc"]
	if d.pkiLease == "" || d.dbLease == "" || d.localLease == "" || len(ver.Leases) != 3 || ver.Refs["payments-prod/db#password"] == 0 {
		t.Fatalf("..version: %+v", ver)
	}
	return d
}

// serial is the certificate's serial as Vault writes it (colon-separated hex).
func serial(c *x509.Certificate) string {
	h := fmt.Sprintf("%x", c.SerialNumber)
	if len(h)%2 == 1 {
		h = "0" + h
	}
	var parts []string
	for i := 0; i < len(h); i += 2 {
		parts = append(parts, h[i:i+2])
	}
	return strings.Join(parts, ":")
}

// leaseRecords are the leases of the pod's allowed mount records, in order.
func leaseRecords(t *testing.T, d *driver, pod *corev1.Pod) [][]audit.Lease {
	t.Helper()
	var out [][]audit.Lease
	for _, r := range d.records(t) {
		if r.Type == audit.EventMount && r.Subject.PodUID == string(pod.UID) && r.Decision == audit.Allowed {
			out = append(out, r.Object.Leases)
		}
	}
	return out
}

// wantActions checks the last mount record's lease actions by name.
func wantActions(t *testing.T, d *driver, pod *corev1.Pod, want map[string]string) []audit.Lease {
	t.Helper()
	all := leaseRecords(t, d, pod)
	if len(all) == 0 {
		t.Fatal("no allowed mount record")
	}
	last := all[len(all)-1]
	got := map[string]string{}
	for _, l := range last {
		got[l.Name] = l.Action
		if l.LeaseSHA256 == "" || l.TTLSeconds <= 0 {
			t.Errorf("lease record without hash or TTL: %+v", l)
		}
	}
	for name, action := range want {
		if got[name] != action {
			for _, line := range strings.Split(readFile(t, d.proc.log), "\n") {
				if strings.Contains(line, "lease") {
					t.Log(line)
				}
			}
			t.Fatalf("last mount record: lease %s %q, want %q (all: %+v)", name, got[name], action, last)
		}
	}
	return last
}

// PKI certificates and database credentials against the real Vault and a real PostgreSQL, through
// the keyward-broker binary and a simulated kubelet: issued at the first publish, reused by a
// republish outside the renewal window, renewed (database) or reissued (certificate) inside it,
// found again by their hash after a driver restart (reissued, the old ones retired until the volume
// goes), revoked when the
// volume is unpublished (the database role is dropped, the certificate's lease is gone and its serial
// revoked); lease IDs appear in no log, audit record or file.
func TestDynamicCredentialsLiveAsLongAsTheirVolume(t *testing.T) {
	e := newDynamicEnv(t)
	// Three credentials, two certificates reissued every 30 s: more than the default pod budget
	// (burst 5) allows in this test's minute, as it should.
	pol := strings.Replace(dynamicPolicy, "BUDGETS", "issueBudgets: {pod: {burst: 20, perHour: 100}}", 1)
	d := startDriver(t, e.brokerEnv, driverOptions{policy: pol, config: "  leaseRenewWindow: 0.5\n"})
	ctx := context.Background()
	pod := e.pods["payments-prod"]
	target := d.kl.target(t, pod)
	var first, renewed, restarted delivered
	var oldDB, oldPKI string // the leases the restarted driver found again
	var issuedAt time.Time
	var allLeaseIDs []string
	runSteps(t,
		step{"issued at the first publish", func(t *testing.T) {
			issuedAt = time.Now()
			if err := d.kl.publish(t, pod, dynamicSecrets, ""); err != nil {
				t.Fatal(err)
			}
			first = e.read(t, target)
			if err := e.pg.CanLogin(ctx, first.user, first.password); err != nil {
				t.Fatalf("the delivered database credentials do not log in: %v", err)
			}
			if first.kvSecret != prodCanary {
				t.Fatalf("kv-password %.20q", first.kvSecret)
			}
			recs := wantActions(t, d, pod, map[string]string{"pki:payments-prod_web/api.payments.svc": "issued", "database:payments-prod_ro": "issued"})
			for _, l := range recs {
				if l.Name == "pki:payments-prod_web/api.payments.svc" && l.Serial != serial(first.cert) {
					t.Errorf("audited serial %q, certificate's %q", l.Serial, serial(first.cert))
				}
			}
			pk, db := e.leaseByHash(t, pkiLeases, first.pkiLease), e.leaseByHash(t, dbLeases, first.dbLease)
			local := e.leaseByHash(t, signLeases, first.localLease)
			if pk == "" || db == "" || local == "" {
				t.Fatalf("the ..version's lease hashes name no lease at Vault: pki %q db %q sign %q", pk, db, local)
			}
			allLeaseIDs = append(allLeaseIDs, pk, db, local)
			if v := readFile(t, filepath.Join(target, "..version")); strings.Contains(v, pk) || strings.Contains(v, db) {
				t.Fatalf("..version holds a lease ID: %s", v)
			}
		}},
		step{"reused outside the renewal window", func(t *testing.T) {
			if err := d.kl.publish(t, pod, dynamicSecrets, ""); err != nil {
				t.Fatal(err)
			}
			if time.Since(issuedAt) >= dbTTL/2 {
				t.Fatalf("the republish came %s after the issue: past the window this step tests (the machine is too slow for the TTLs)", time.Since(issuedAt))
			}
			again := e.read(t, target)
			if again.user != first.user || serial(again.cert) != serial(first.cert) || again.version != first.version {
				t.Fatalf("a republish outside the window changed the credentials: user %v serial %v version %d->%d",
					again.user != first.user, serial(again.cert) != serial(first.cert), first.version, again.version)
			}
			wantActions(t, d, pod, map[string]string{"pki:payments-prod_web/api.payments.svc": "reused", "database:payments-prod_ro": "reused"})
			if n, m, l := len(e.leaseIDs(t, pkiLeases)), len(e.leaseIDs(t, dbLeases)), len(e.leaseIDs(t, signLeases)); n != 1 || m != 1 || l != 1 {
				t.Fatalf("leases at Vault after a reuse: %d certificates, %d database credentials, %d signed; want 1 each", n, m, l)
			}
		}},
		step{"renewed and reissued inside the window", func(t *testing.T) {
			time.Sleep(time.Until(issuedAt.Add(dbTTL/2 + time.Second)))
			if err := d.kl.publish(t, pod, dynamicSecrets, ""); err != nil {
				t.Fatal(err)
			}
			wantActions(t, d, pod, map[string]string{"pki:payments-prod_web/api.payments.svc": "reused", "database:payments-prod_ro": "renewed"})
			got := e.read(t, target)
			if got.user != first.user || got.dbLease != first.dbLease {
				t.Fatal("renewing the database lease changed the credentials")
			}
			time.Sleep(time.Until(issuedAt.Add(31 * time.Second))) // the certificate's 60s: its window is the last 30
			if err := d.kl.publish(t, pod, dynamicSecrets, ""); err != nil {
				t.Fatal(err)
			}
			wantActions(t, d, pod, map[string]string{"pki:payments-prod_web/api.payments.svc": "reissued"})
			renewed = e.read(t, target)
			if serial(renewed.cert) == serial(first.cert) || renewed.pkiLease == first.pkiLease || renewed.version <= first.version {
				t.Fatal("the certificate inside its window was not reissued (same serial, lease or ..version)")
			}
			if err := e.pg.CanLogin(ctx, renewed.user, renewed.password); err != nil {
				t.Fatalf("the renewed database credentials do not log in: %v", err)
			}
			allLeaseIDs = append(allLeaseIDs, e.leaseByHash(t, pkiLeases, renewed.pkiLease))
		}},
		step{"found again after a driver restart", func(t *testing.T) {
			oldDB, oldPKI = e.leaseByHash(t, dbLeases, renewed.dbLease), e.leaseByHash(t, pkiLeases, renewed.pkiLease)
			if oldDB == "" || oldPKI == "" {
				t.Fatal("the leases before the restart are not at Vault")
			}
			d.restart(t)
			if err := d.kl.publish(t, pod, dynamicSecrets, ""); err != nil {
				t.Fatal(err)
			}
			wantActions(t, d, pod, map[string]string{"pki:payments-prod_web/api.payments.svc": "reissued", "database:payments-prod_ro": "reissued"})
			restarted = e.read(t, target)
			if restarted.user == renewed.user || restarted.version <= renewed.version {
				t.Fatalf("after the restart: same database user %v, ..version %d -> %d", restarted.user == renewed.user, renewed.version, restarted.version)
			}
			// The leases found again are retired, not revoked: the app keeps its sessions until it has
			// switched to the new files; they go with the volume (next step) or with their old token.
			if !slices.Contains(e.leaseIDs(t, dbLeases), oldDB) || !slices.Contains(e.leaseIDs(t, pkiLeases), oldPKI) {
				t.Fatal("the leases found again after the restart were revoked before the app had the new ones")
			}
			if err := e.pg.CanLogin(ctx, renewed.user, renewed.password); err != nil {
				t.Fatalf("the database credentials from before the restart stopped working at once: %v", err)
			}
			if err := e.pg.CanLogin(ctx, restarted.user, restarted.password); err != nil {
				t.Fatalf("the reissued database credentials do not log in: %v", err)
			}
			allLeaseIDs = append(allLeaseIDs, e.leaseByHash(t, pkiLeases, restarted.pkiLease), e.leaseByHash(t, dbLeases, restarted.dbLease))
		}},
		step{"revoked when the volume is unpublished", func(t *testing.T) {
			pk, db := e.leaseByHash(t, pkiLeases, restarted.pkiLease), e.leaseByHash(t, dbLeases, restarted.dbLease)
			local := e.leaseByHash(t, signLeases, restarted.localLease)
			if pk == "" || db == "" || local == "" {
				t.Fatal("the leases after the restart are not at Vault")
			}
			if err := d.kl.unpublish(t, pod); err != nil {
				t.Fatal(err)
			}
			eventually(t, 15*time.Second, "revocation at unpublish", func() error {
				if err := e.pg.CanLogin(ctx, restarted.user, restarted.password); err == nil {
					return fmt.Errorf("the database credentials still log in")
				}
				if ok, err := e.pg.RoleExists(ctx, restarted.user); err != nil || ok {
					return fmt.Errorf("the database role still exists (%v)", err)
				}
				if err := e.pg.CanLogin(ctx, renewed.user, renewed.password); err == nil {
					return fmt.Errorf("the login found again after the restart still works")
				}
				if slices.Contains(e.leaseIDs(t, dbLeases), oldDB) || slices.Contains(e.leaseIDs(t, pkiLeases), oldPKI) {
					return fmt.Errorf("the leases found again after the restart are still at Vault")
				}
				if slices.Contains(e.leaseIDs(t, pkiLeases), pk) || slices.Contains(e.leaseIDs(t, dbLeases), db) || slices.Contains(e.leaseIDs(t, signLeases), local) {
					return fmt.Errorf("the leases are still at Vault")
				}
				return nil
			})
			c, err := e.vault.Client.Logical().Read("pki-prod/cert/" + serial(restarted.cert))
			if err != nil || c == nil {
				t.Fatalf("reading the certificate back: %v", err)
			}
			if rt := fmt.Sprint(c.Data["revocation_time"]); rt == "0" || rt == "" {
				t.Fatalf("the unpublished volume's certificate is not revoked (revocation_time %s)", rt)
			}
		}},
		step{"no lease ID or credential outside Vault and the volume", func(t *testing.T) {
			d.proc.stop(t)
			var canaries []string
			for _, id := range allLeaseIDs {
				if id == "" {
					t.Fatal("a lease ID was not found at Vault")
				}
				canaries = append(canaries, id, id[strings.LastIndex(id, "/")+1:])
			}
			for _, dl := range []delivered{first, renewed, restarted} {
				canaries = append(canaries, dl.password, strings.TrimSpace(string(dl.keyPEM[40:80])))
			}
			var files []string
			for _, root := range []string{d.dir} {
				filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
					if err == nil && fi.Mode().IsRegular() && !strings.HasPrefix(p, d.kl.root) {
						files = append(files, p)
					}
					return nil
				})
			}
			if len(files) < 3 {
				t.Fatalf("found only %d files to scan", len(files))
			}
			for _, f := range files {
				b, err := os.ReadFile(f)
				if err != nil {
					t.Fatal(err)
				}
				for _, c := range canaries {
					if strings.Contains(string(b), c) {
						t.Errorf("%s holds a lease ID or a credential (%.12s...)", f, c)
					}
				}
			}
		}},
	)
}

// A crash-looping workload cannot mint credentials without bound: a pod whose volume is published
// and unpublished over and over stops at its own budget, new pods of the namespace at the
// namespace's; each refusal is ResourceExhausted, audited and counted in the metrics, and every lease
// issued is revoked when its volume goes.
func TestIssueBudgetsStopACrashLoop(t *testing.T) {
	e := newDynamicEnv(t)
	pol := strings.Replace(dynamicPolicy, "BUDGETS", "issueBudgets:\n  pod: {burst: 2, perHour: 1}\n  namespace: {burst: 4, perHour: 1}\n", 1)
	port, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	metrics := fmt.Sprintf("127.0.0.1:%d", port)
	d := startDriver(t, e.brokerEnv, driverOptions{policy: pol, metrics: metrics})
	const dbOnly = `
- {file: db-user, key: username, database: {role: payments-prod_ro}}
- {file: db-password, key: password, database: {role: payments-prod_ro}}
`
	crash := e.pods["payments-prod"]
	for i := 0; i < 2; i++ {
		if err := d.kl.publish(t, crash, dbOnly, ""); err != nil {
			t.Fatalf("publish %d within the pod's budget: %v", i+1, err)
		}
		if err := d.kl.unpublish(t, crash); err != nil {
			t.Fatal(err)
		}
	}
	err = d.kl.publish(t, crash, dbOnly, "")
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "pod") {
		t.Fatalf("the third issue for one pod: %v, want ResourceExhausted naming the pod's budget", err)
	}
	if _, serr := os.Stat(filepath.Join(d.kl.target(t, crash), "db-user")); serr == nil {
		t.Fatal("a refused publish left files")
	}
	// New pods of the namespace draw on its budget: 2 spent by the crash-looping pod, 2 left.
	var others []*corev1.Pod
	for i := 0; i < 3; i++ {
		p := e.newPod(t, "payments-prod", fmt.Sprintf("api-loop-%d", i))
		others = append(others, p)
		err := d.kl.publish(t, p, dbOnly, "")
		if i < 2 && err != nil {
			t.Fatalf("new pod %d within the namespace's budget: %v", i, err)
		}
		if i == 2 && (status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "namespace")) {
			t.Fatalf("the namespace's fifth issue: %v, want ResourceExhausted naming the namespace's budget", err)
		}
	}
	var refused int
	for _, r := range d.records(t) {
		if r.Type == audit.EventMount && r.Code == "ResourceExhausted" && strings.Contains(r.Reason, "budget") {
			refused++
		}
	}
	if refused != 2 {
		t.Fatalf("%d audited budget refusals, want 2", refused)
	}
	for _, want := range []string{`keyward_broker_issue_budget_refusals_total{scope="pod"} 1`, `keyward_broker_issue_budget_refusals_total{scope="namespace"} 1`} {
		if got := scrape(t, metrics, "keyward_broker_issue_budget_refusals_total"); !strings.Contains(got, want) {
			t.Fatalf("metrics lack %q:\n%s", want, got)
		}
	}
	if n := len(e.leaseIDs(t, dbLeases)); n != 2 {
		t.Fatalf("%d database leases at Vault with two pods' volumes published, want 2", n)
	}
	for _, p := range others[:2] {
		if err := d.kl.unpublish(t, p); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, 15*time.Second, "every lease revoked", func() error {
		if n := len(e.leaseIDs(t, dbLeases)); n != 0 {
			return fmt.Errorf("%d database leases left", n)
		}
		return nil
	})
}

// A republish refused as a withdrawal (the grant was taken away) clears the files and revokes the
// volume's leases at once: the database login stops working while the pod still runs.
func TestDynamicCredentialsRevokedWhenAccessIsWithdrawn(t *testing.T) {
	e := newDynamicEnv(t)
	pol := strings.Replace(dynamicPolicy, "BUDGETS", "", 1)
	d := startDriver(t, e.brokerEnv, driverOptions{policy: pol})
	ctx := context.Background()
	pod := e.pods["payments-prod"]
	const dbOnly = `
- {file: db-user, key: username, database: {role: payments-prod_ro}}
- {file: db-password, key: password, database: {role: payments-prod_ro}}
`
	if err := d.kl.publish(t, pod, dbOnly, ""); err != nil {
		t.Fatal(err)
	}
	target := d.kl.target(t, pod)
	user, password := readFile(t, filepath.Join(target, "db-user")), readFile(t, filepath.Join(target, "db-password"))
	if err := e.pg.CanLogin(ctx, user, password); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(d.policy, []byte(strings.Replace(pol, `databaseRoles: ["payments-prod_*"]`, "", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	eventually(t, 15*time.Second, "the republish refused once the policy is reloaded", func() error {
		if err := d.kl.publish(t, pod, dbOnly, ""); status.Code(err) != codes.PermissionDenied {
			return fmt.Errorf("republish: %v", err)
		}
		return nil
	})
	if _, err := os.Stat(filepath.Join(target, "db-user")); !os.IsNotExist(err) {
		t.Fatalf("the withdrawn volume's files are still there: %v", err)
	}
	eventually(t, 15*time.Second, "the withdrawn volume's lease revoked", func() error {
		if err := e.pg.CanLogin(ctx, user, password); err == nil {
			return fmt.Errorf("the login still works")
		}
		if n := len(e.leaseIDs(t, dbLeases)); n != 0 {
			return fmt.Errorf("%d database leases at Vault", n)
		}
		return nil
	})
}
