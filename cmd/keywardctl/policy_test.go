package main

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/broker/policy"
)

const dynamicPolicyYAML = `environments:
  - {name: prod, vaultMount: kv, vaultPrefix: prod, vaultRole: prod, pkiMount: pki-prod, databaseMount: database-prod}
  - {name: dev, vaultMount: kv, vaultPrefix: dev, vaultRole: dev}
grants:
  - {namespace: payments, serviceAccount: api, paths: ["payments/*"], pkiRoles: ["payments_*"], databaseRoles: ["payments_ro"]}
issueBudgets:
  pod: {burst: 3, perHour: 6}
`

func TestPolicyCheckDynamic(t *testing.T) {
	dir := t.TempDir()
	pol := dir + "/policy.yaml"
	writeFile(t, pol, dynamicPolicyYAML)
	check := []string{"policy", "check", "--policy", pol, "--namespace", "payments", "--service-account", "api"}
	prod := append(check[:len(check):len(check)], "--environment", "prod")
	dev := append(check[:len(check):len(check)], "--environment", "dev")
	with := func(base []string, more ...string) []string { return append(base[:len(base):len(base)], more...) }
	for _, tc := range []struct {
		args []string
		code int
		out  string
	}{
		{with(prod, "--pki-role", "payments_web"), 0,
			"allow: grant 0 (payments/api) pkiRoles payments_* in environment prod\nissues Vault pki-prod/issue/payments_web (cert, key, chain) (environment prod)\n"},
		{with(prod, "--database-role", "payments_ro"), 0,
			"allow: grant 0 (payments/api) databaseRoles payments_ro in environment prod\nissues Vault database-prod/creds/payments_ro (username, password) (environment prod)\n"},
		{with(prod, "--database-role", "payments_ro", "--key", "password"), 0, "issues Vault database-prod/creds/payments_ro (password) (environment prod)"},
		// Denied: another namespace's role, a role not granted, an environment without the mount.
		{with(prod, "--database-role", "billing_ro"), 1, `deny: database role "billing_ro" is not one of namespace "payments"'s roles (payments_*): permission denied`},
		{with(prod, "--database-role", "payments_rw"), 1, "deny: no grant lets payments/api use database role payments_rw"},
		{with(dev, "--pki-role", "payments_web"), 1, `deny: environment "dev" has no pkiMount: it issues no pki credentials`},
		{with(check, "--pki-role", "payments_web"), 1, "no keyward.dev/environment label"},
		// Refused before the policy, as the broker refuses them.
		{with(prod, "--pki-role", "payments_web", "--key", "password"), 1, `deny: key "password" of a pki credential: want one of cert, key, chain`},
		{with(prod, "--pki-role", "payments/web"), 1, `deny: role "payments/web"`},
		// One question at a time.
		{with(prod, "--pki-role", "payments_web", "--database-role", "payments_ro"), 2, "required"},
		{with(prod, "--pki-role", "payments_web", "--ref", "payments/db"), 2, "required"},
		// A KV ref still reads.
		{with(prod, "--ref", "payments/db"), 0, "reads Vault kv/data/prod/payments/db key \"value\""},
		// lint shows the budgets in force.
		{[]string{"policy", "lint", pol}, 0, "issue budgets: pod burst 3, 6 per hour; namespace burst 50, 600 per hour (default)\n"},
	} {
		var out, errb bytes.Buffer
		if code := run(tc.args, &out, &errb); code != tc.code || !strings.Contains(out.String()+errb.String(), tc.out) {
			t.Errorf("%v: exit %d (want %d, output with %q): %s%s", tc.args, code, tc.code, tc.out, out.String(), errb.String())
		}
	}
	bad := dir + "/bad.yaml"
	writeFile(t, bad, strings.Replace(dynamicPolicyYAML, `pkiRoles: ["payments_*"]`, `pkiRoles: ["billing_*"]`, 1))
	var out bytes.Buffer
	if code := run([]string{"policy", "lint", bad}, &out, &out); code != 1 || !strings.Contains(out.String(), `role "billing_*" reaches outside namespace "payments"`) {
		t.Errorf("lint of a grant of another namespace's roles: exit %d: %s", code, out.String())
	}
}

// A volume's refs as --secrets checks them: one line per KV ref and per dynamic credential (its parts
// together). (csi.SecretsRefs is what makes the refs of a file; this is what is done with them.)
func TestCheckRefsDynamic(t *testing.T) {
	p, err := policy.Parse([]byte(dynamicPolicyYAML))
	if err != nil {
		t.Fatal(err)
	}
	id := broker.Identity{Namespace: "payments", ServiceAccount: "api"}
	web := broker.PKIRequest{CommonName: "web.payments.svc"}
	refs := []broker.SecretRef{
		{Kind: broker.KindPKI, Ref: "payments_web", Key: "cert", PKI: web},
		{Ref: "payments/db", Key: "host"},
		{Kind: broker.KindPKI, Ref: "payments_web", Key: "key", PKI: web},
		{Kind: broker.KindPKI, Ref: "payments_mtls", Key: "cert", PKI: broker.PKIRequest{CommonName: "mtls", LocalKey: true}},
		{Kind: broker.KindDatabase, Ref: "payments_ro", Key: "username"},
		{Kind: broker.KindDatabase, Ref: "payments_ro", Key: "password"},
	}
	var out bytes.Buffer
	if err := checkRefs(streams{stdout: &out}, policy.NewAuthorizer(p, policy.StaticNamespaces{"payments": "prod"}), id, refs); err != nil {
		t.Fatalf("%v: %s", err, out.String())
	}
	want := "allow: pki:payments_web/web.payments.svc (cert, key): grant 0 (payments/api) pkiRoles payments_* in environment prod; issues Vault pki-prod/issue/payments_web (cert, key) (environment prod)\n" +
		"allow: payments/db#host: grant 0 (payments/api) path payments/* in environment prod; reads Vault kv/data/prod/payments/db key \"host\" (environment prod)\n" +
		"allow: pki:payments_mtls/mtls (cert): grant 0 (payments/api) pkiRoles payments_* in environment prod; issues Vault pki-prod/sign/payments_mtls (cert) (environment prod)\n" +
		"allow: database:payments_ro (username, password): grant 0 (payments/api) databaseRoles payments_ro in environment prod; issues Vault database-prod/creds/payments_ro (username, password) (environment prod)\n"
	if out.String() != want {
		t.Fatalf("output\n%s\nwant\n%s", out.String(), want)
	}

	// One credential denied denies the volume; the others are still listed.
	out.Reset()
	refs = append(refs, broker.SecretRef{Kind: broker.KindDatabase, Ref: "billing_ro", Key: "password"})
	err = checkRefs(streams{stdout: &out}, policy.NewAuthorizer(p, policy.StaticNamespaces{"payments": "dev"}), id, refs)
	if !errors.Is(err, errDenied) {
		t.Fatalf("err = %v", err)
	}
	for _, line := range []string{
		`deny: pki:payments_web/web.payments.svc (cert, key): environment "dev" has no pkiMount`,
		"allow: payments/db#host: grant 0 (payments/api) path payments/* in environment dev",
		`deny: database:payments_ro (username, password): environment "dev" has no databaseMount`,
		`deny: database:billing_ro (password): environment "dev" has no databaseMount`,
	} {
		if !strings.Contains(out.String(), line) {
			t.Errorf("output lacks %q:\n%s", line, out.String())
		}
	}
}

// --secrets on a volume's list with dynamic entries, parsed as a publish parses it: the parts of one
// credential share a line, and another namespace's role is denied.
func TestPolicyCheckSecretsFileWithDynamicEntries(t *testing.T) {
	dir := t.TempDir()
	pol, vol := dir+"/policy.yaml", dir+"/secrets.yaml"
	writeFile(t, pol, dynamicPolicyYAML)
	writeFile(t, vol, `
- {file: tls.crt, key: cert, pki: {role: payments_web, commonName: api.payments.svc}}
- {file: tls.key, key: key, pki: {role: payments_web, commonName: api.payments.svc}}
- {file: user, key: username, database: {role: payments_ro}}
- {file: db, ref: payments/db, key: password}
`)
	args := []string{"policy", "check", "--policy", pol, "--namespace", "payments", "--environment", "prod", "--service-account", "api", "--secrets", vol}
	var out, errb bytes.Buffer
	if code := run(args, &out, &errb); code != 0 ||
		!strings.Contains(out.String(), "issues Vault pki-prod/issue/payments_web (cert, key) (environment prod)") ||
		!strings.Contains(out.String(), "issues Vault database-prod/creds/payments_ro (username) (environment prod)") ||
		!strings.Contains(out.String(), `reads Vault kv/data/prod/payments/db key "password"`) {
		t.Fatalf("exit %d: %s%s", code, out.String(), errb.String())
	}
	writeFile(t, vol, "- {file: user, key: username, database: {role: billing_ro}}\n")
	out.Reset()
	if code := run(args, &out, &errb); code != 1 || !strings.Contains(out.String(), `deny: database:billing_ro (username): database role "billing_ro" is not one of namespace "payments"'s roles`) {
		t.Fatalf("another namespace's role: exit %d: %s", code, out.String())
	}
}
