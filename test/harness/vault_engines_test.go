package harness_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	vaultapi "github.com/hashicorp/vault/api"

	"github.com/keyward/keyward/test/harness"
)

// wantDenied fails the test unless err is Vault's 403 (permission denied): not a missing role or
// mount, which would prove nothing about the policy.
func wantDenied(t *testing.T, what string, err error) {
	t.Helper()
	var re *vaultapi.ResponseError
	if !errors.As(err, &re) || re.StatusCode != http.StatusForbidden {
		t.Fatalf("%s: err = %v, want permission denied", what, err)
	}
}

// revoke revokes one lease by its ID in the path (sys/leases/revoke/<id>), as the dynamic policy
// allows.
func revoke(ctx context.Context, c *vaultapi.Client, leaseID string) error {
	_, err := c.Logical().WriteWithContext(ctx, "sys/leases/revoke/"+leaseID, nil)
	return err
}

func lookupLease(ctx context.Context, c *vaultapi.Client, leaseID string) error {
	_, err := c.Logical().WriteWithContext(ctx, "sys/leases/lookup", map[string]any{"lease_id": leaseID})
	return err
}

func TestVaultDatabaseCredsEndWithTheirLease(t *testing.T) {
	t.Parallel()
	pg := harness.PostgresT(t)
	ctx := ctxT(t)
	v := env.Vault
	db := named()("db")
	start := time.Now()
	if err := v.EnableDatabase(ctx, db, pg); err != nil {
		t.Fatal(err)
	}
	if err := v.DatabaseRole(ctx, db, "payments_ro", 10*time.Minute, time.Hour); err != nil {
		t.Fatal(err)
	}
	t.Logf("database engine set up in %v", time.Since(start).Round(time.Millisecond))
	s, err := v.Client.Logical().ReadWithContext(ctx, db+"/creds/payments_ro")
	if err != nil {
		t.Fatal(err)
	}
	user, _ := s.Data["username"].(string)
	password, _ := s.Data["password"].(string)
	if user == "" || password == "" || !strings.HasPrefix(s.LeaseID, db+"/creds/payments_ro/") || s.LeaseDuration != 600 {
		t.Fatalf("creds: user %q, lease %q for %d s", user, s.LeaseID, s.LeaseDuration)
	}
	if err := pg.CanLogin(ctx, user, password); err != nil {
		t.Fatalf("login with Vault's credential: %v", err)
	}
	if err := pg.CanLogin(ctx, user, password+"x"); err == nil {
		t.Fatal("postgres accepted the credential with a wrong password")
	}
	// A session still open when the lease is revoked is ended, not left running.
	conn, err := pg.Connect(ctx, user, password)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if err := revoke(ctx, v.Client, s.LeaseID); err != nil {
		t.Fatal(err)
	}
	if err := pg.CanLogin(ctx, user, password); err == nil {
		t.Fatal("the credential still logs in after its lease was revoked")
	}
	if exists, err := pg.RoleExists(ctx, user); err != nil || exists {
		t.Fatalf("role %s after revoke: exists %v, %v", user, exists, err)
	}
	var one int
	if err := conn.QueryRow(ctx, "SELECT 1").Scan(&one); err == nil {
		t.Fatal("a session of the revoked credential still runs queries")
	}
	if err := lookupLease(ctx, v.Client, s.LeaseID); err == nil {
		t.Fatal("the revoked lease can still be looked up")
	}
}

func TestVaultPKICertificateRevokedWithItsLease(t *testing.T) {
	t.Parallel()
	ctx := ctxT(t)
	v := env.Vault
	pki := named()("pki")
	start := time.Now()
	caPEM, err := v.EnablePKI(ctx, pki)
	if err != nil {
		t.Fatal(err)
	}
	if err := v.PKIRole(ctx, pki, "payments_web", []string{"payments.svc.cluster.local"}, time.Hour); err != nil {
		t.Fatal(err)
	}
	t.Logf("pki engine set up in %v", time.Since(start).Round(time.Millisecond))
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		t.Fatalf("EnablePKI returned no PEM certificate")
	}
	s, err := v.Client.Logical().WriteWithContext(ctx, pki+"/issue/payments_web", map[string]any{
		"common_name": "web.payments.svc.cluster.local", "ttl": "10m",
	})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(s.LeaseID, pki+"/issue/payments_web/") {
		t.Fatalf("issued certificate has lease %q", s.LeaseID)
	}
	block, _ := pem.Decode([]byte(s.Data["certificate"].(string)))
	if block == nil {
		t.Fatal("no PEM certificate issued")
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, DNSName: "web.payments.svc.cluster.local"}); err != nil {
		t.Fatalf("issued certificate does not chain to the CA: %v", err)
	}
	if k, ok := cert.PublicKey.(*ecdsa.PublicKey); !ok || k.Curve != elliptic.P256() {
		t.Fatalf("key %T, want EC P-256", cert.PublicKey)
	}
	if _, err := v.Client.Logical().WriteWithContext(ctx, pki+"/issue/payments_web", map[string]any{"common_name": "web.billing.svc.cluster.local"}); err == nil {
		t.Fatal("the role issued for a domain it does not allow")
	}
	if err := revoke(ctx, v.Client, s.LeaseID); err != nil {
		t.Fatal(err)
	}
	if err := lookupLease(ctx, v.Client, s.LeaseID); err == nil {
		t.Fatal("the revoked lease can still be looked up")
	}
	serial := s.Data["serial_number"].(string)
	rec, err := v.Client.Logical().ReadWithContext(ctx, pki+"/cert/"+serial)
	if err != nil {
		t.Fatal(err)
	}
	if n, _ := rec.Data["revocation_time"].(json.Number).Int64(); n <= 0 {
		t.Fatalf("certificate %s: revocation_time %v after its lease was revoked", serial, rec.Data["revocation_time"])
	}
	raw, err := v.Client.Logical().ReadRawWithContext(ctx, pki+"/crl")
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Body.Close()
	der, err := io.ReadAll(raw.Body)
	if err != nil {
		t.Fatal(err)
	}
	crl, err := x509.ParseRevocationList(der)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(crl.RevokedCertificateEntries, func(e x509.RevocationListEntry) bool {
		return e.SerialNumber.Cmp(cert.SerialNumber) == 0
	}) {
		t.Fatalf("certificate %s is not on the CRL", serial)
	}
}

// (Over 60 lines: every rule of deploy/vault/namespace-dynamic.hcl, allowed for the namespace's own
// roles and denied for another's, with a token from a real kubernetes-auth login as a pod.)
func TestVaultDynamicPolicyScopesToTheNamespace(t *testing.T) {
	t.Parallel()
	pg := harness.PostgresT(t)
	ctx := ctxT(t)
	k, v := env.Kube, env.Vault
	n := named()
	// The other namespace's name extends this one's: with a dash between namespace and role name, the
	// glob "payments-4-*" would reach its roles ("payments-4-eu-web"); the underscore closes that.
	ns := n("payments")
	other := ns + "-eu"
	pki, db, auth, envName := n("dyn-pki"), n("dyn-db"), n("dyn-kubernetes"), n("dyn")
	if _, err := v.EnablePKI(ctx, pki); err != nil {
		t.Fatal(err)
	}
	if err := v.EnableDatabase(ctx, db, pg); err != nil {
		t.Fatal(err)
	}
	for _, owner := range []string{ns, other} {
		if err := v.PKIRole(ctx, pki, owner+"_web", []string{owner + ".svc"}, time.Hour); err != nil {
			t.Fatal(err)
		}
		if err := v.DatabaseRole(ctx, db, owner+"_ro", 10*time.Minute, time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.KubernetesAuth(ctx, auth, k); err != nil {
		t.Fatal(err)
	}
	if err := v.PutDynamicPolicy(ctx, auth, pki, db, envName); err != nil {
		t.Fatal(err)
	}
	if err := v.KubernetesRole(ctx, auth, envName, []string{ns}, []string{"web"}, []string{envName + "-dynamic"}, "keyward"); err != nil {
		t.Fatal(err)
	}
	c := podVaultClient(t, ctx, auth, envName, ns)

	// Issue and sign: own roles only.
	issued, err := c.Logical().WriteWithContext(ctx, pki+"/issue/"+ns+"_web", map[string]any{"common_name": "web." + ns + ".svc"})
	if err != nil || !strings.HasPrefix(issued.LeaseID, pki+"/issue/"+ns+"_web/") {
		t.Fatalf("issue for its own role: %v (lease %v)", err, issued)
	}
	_, err = c.Logical().WriteWithContext(ctx, pki+"/issue/"+other+"_web", map[string]any{"common_name": "web." + other + ".svc"})
	wantDenied(t, "issue for another namespace's role", err)
	signed, err := c.Logical().WriteWithContext(ctx, pki+"/sign/"+ns+"_web", map[string]any{"csr": csr(t, "api."+ns+".svc"), "common_name": "api." + ns + ".svc"})
	if err != nil || !strings.HasPrefix(signed.LeaseID, pki+"/sign/"+ns+"_web/") {
		t.Fatalf("sign for its own role: %v (lease %v)", err, signed)
	}
	_, err = c.Logical().WriteWithContext(ctx, pki+"/sign/"+other+"_web", map[string]any{"csr": csr(t, "api."+other+".svc"), "common_name": "api." + other + ".svc"})
	wantDenied(t, "sign for another namespace's role", err)

	// Database credentials: own roles only.
	creds, err := c.Logical().ReadWithContext(ctx, db+"/creds/"+ns+"_ro")
	if err != nil {
		t.Fatalf("creds of its own role: %v", err)
	}
	if err := pg.CanLogin(ctx, creds.Data["username"].(string), creds.Data["password"].(string)); err != nil {
		t.Fatalf("login with the pod's credential: %v", err)
	}
	_, err = c.Logical().ReadWithContext(ctx, db+"/creds/"+other+"_ro")
	wantDenied(t, "creds of another namespace's role", err)

	// Listing lease IDs: under its own roles only (a sudo path: the policy grants sudo there).
	keys, err := c.Logical().ListWithContext(ctx, "sys/leases/lookup/"+pki+"/issue/"+ns+"_web/")
	if err != nil || keys == nil || !slices.Contains(keys.Data["keys"].([]any), any(strings.TrimPrefix(issued.LeaseID, pki+"/issue/"+ns+"_web/"))) {
		t.Fatalf("list the leases of its own role: %v %v", keys, err)
	}
	for _, prefix := range []string{pki + "/sign/" + ns + "_web/", db + "/creds/" + ns + "_ro/"} {
		if keys, err := c.Logical().ListWithContext(ctx, "sys/leases/lookup/"+prefix); err != nil || keys == nil || len(keys.Data["keys"].([]any)) != 1 {
			t.Fatalf("list the leases under %s: %v %v", prefix, keys, err)
		}
	}
	for _, prefix := range []string{pki + "/issue/" + other + "_web/", db + "/creds/" + other + "_ro/", pki + "/issue/", db + "/creds/"} {
		_, err = c.Logical().ListWithContext(ctx, "sys/leases/lookup/"+prefix)
		wantDenied(t, "list leases under "+prefix, err)
	}
	if err := lookupLease(ctx, c, issued.LeaseID); err != nil {
		t.Fatalf("look up its own lease: %v", err)
	}

	// Revoking: another namespace's leases (made with the root token) stay; its own go.
	theirs := []string{}
	if s, err := v.Client.Logical().WriteWithContext(ctx, pki+"/issue/"+other+"_web", map[string]any{"common_name": "web." + other + ".svc"}); err != nil {
		t.Fatal(err)
	} else {
		theirs = append(theirs, s.LeaseID)
	}
	if s, err := v.Client.Logical().ReadWithContext(ctx, db+"/creds/"+other+"_ro"); err != nil {
		t.Fatal(err)
	} else {
		theirs = append(theirs, s.LeaseID)
	}
	// Renewal by the lease ID in the path: its own database lease, not another namespace's.
	if _, err := c.Logical().WriteWithContext(ctx, "sys/leases/renew/"+creds.LeaseID, map[string]any{"increment": 60}); err != nil {
		t.Fatalf("renew its own lease: %v", err)
	}
	wantDenied(t, "renew another namespace's lease", func() error {
		_, err := c.Logical().WriteWithContext(ctx, "sys/leases/renew/"+theirs[1], map[string]any{"increment": 60})
		return err
	}())
	for _, id := range theirs {
		wantDenied(t, "revoke another namespace's lease", revoke(ctx, c, id))
		if err := lookupLease(ctx, v.Client, id); err != nil {
			t.Fatalf("another namespace's lease is gone after a denied revoke: %v", err)
		}
	}
	for _, id := range []string{issued.LeaseID, signed.LeaseID, creds.LeaseID} {
		if err := revoke(ctx, c, id); err != nil {
			t.Fatalf("revoke its own lease: %v", err)
		}
		if err := lookupLease(ctx, v.Client, id); err == nil {
			t.Fatalf("lease %s still there after the pod revoked it", id)
		}
	}
	if err := pg.CanLogin(ctx, creds.Data["username"].(string), creds.Data["password"].(string)); err == nil {
		t.Fatal("the pod's credential still logs in after the pod revoked its lease")
	}
}

// podVaultClient logs in to Vault's kubernetes auth at auth with role as a pod (service account web)
// of namespace ns and returns a client with that token only.
func podVaultClient(t *testing.T, ctx context.Context, auth, role, ns string) *vaultapi.Client {
	t.Helper()
	k, v := env.Kube, env.Vault
	if _, err := k.CreateNamespace(ctx, ns, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := k.CreateServiceAccount(ctx, ns, "web"); err != nil {
		t.Fatal(err)
	}
	pod, err := k.CreatePod(ctx, ns, "web-0", "web", "node-1")
	if err != nil {
		t.Fatal(err)
	}
	jwt, err := k.PodToken(ctx, pod, []string{"keyward"}, 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	s, err := v.Client.Logical().WriteWithContext(ctx, "auth/"+auth+"/login", map[string]any{"role": role, "jwt": jwt})
	if err != nil {
		t.Fatalf("pod login: %v", err)
	}
	if want := []string{"default", role + "-dynamic"}; !slices.Equal(s.Auth.Policies, want) {
		t.Fatalf("pod token policies %v, want %v", s.Auth.Policies, want)
	}
	c, err := v.Client.Clone()
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken(s.Auth.ClientToken)
	return c
}

// csr is a PEM certificate request for cn with a new EC P-256 key.
func csr(t *testing.T, cn string) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}, DNSNames: []string{cn}}, key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}
