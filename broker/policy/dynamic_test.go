package policy

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/internal/fault"
)

const dynamicPolicy = `
environments:
  - {name: prod, vaultMount: kv, vaultPrefix: prod, vaultRole: prod, pkiMount: pki-prod, databaseMount: database-prod}
  - {name: dev, vaultMount: kv, vaultPrefix: dev, vaultRole: dev, pkiMount: pki-dev}
grants:
  - {namespace: payments, serviceAccount: api, paths: ["payments/*"], pkiRoles: ["payments_*"], databaseRoles: ["payments_ro"]}
  - {namespace: payments, serviceAccount: "*", databaseRoles: ["payments_report"]}
  - {namespace: billing, serviceAccount: api, pkiRoles: ["billing_web"], databaseRoles: ["billing_ro"]}
  - {namespace: payments-eu, serviceAccount: api, pkiRoles: ["payments-eu_web"]}
  - {namespace: web, serviceAccount: api, pkiRoles: ["web_site"]}
`

func TestParseDynamicInvariants(t *testing.T) {
	env := "environments:\n  - {name: prod, vaultMount: kv, vaultPrefix: prod, pkiMount: pki-prod, databaseMount: db-prod}\n"
	grant := func(field, role string) string {
		return env + "grants: [{namespace: payments, serviceAccount: api, " + field + ": [\"" + role + "\"]}]\n"
	}
	for name, tc := range map[string]struct{ yaml, want string }{
		// No cross-namespace: a namespace's roles start with its name and an underscore.
		"pki role of another namespace":      {grant("pkiRoles", "billing_web"), `role "billing_web" reaches outside namespace "payments"`},
		"database role of another namespace": {grant("databaseRoles", "billing_ro"), "reaches outside namespace"},
		"role without the dash":              {grant("pkiRoles", "paymentsweb"), "reaches outside namespace"},
		"pattern without the dash":           {grant("pkiRoles", "payments*"), "reaches outside namespace"},
		"pattern of everything":              {grant("databaseRoles", "*"), "reaches outside namespace"},
		"role of the bare prefix":            {grant("pkiRoles", "payments-"), "want a Vault role name"},
		"role with a slash":                  {grant("pkiRoles", "payments-a/b"), "want a Vault role name"},
		"wildcard in the middle":             {grant("pkiRoles", "payments_*-web"), "want a Vault role name"},
		"role too long":                      {grant("pkiRoles", "payments-"+strings.Repeat("a", broker.MaxRoleLen)), "want a Vault role name"},
		"pattern too long":                   {grant("pkiRoles", "payments-"+strings.Repeat("a", broker.MaxRoleLen)+"*"), "longer than a role name"},
		"a grant of nothing":                 {env + "grants: [{namespace: payments, serviceAccount: api, pkiRoles: []}]\n", "no paths"},
		// No cross-environment: environments do not share issuers, and an issuer is not a KV mount.
		"shared pkiMount": {env + "  - {name: dev, vaultMount: kv, vaultPrefix: dev, pkiMount: pki-prod}\n",
			`pkiMount "pki-prod" is also environment "prod"'s pkiMount: environments must not share issuers`},
		"shared databaseMount": {env + "  - {name: dev, vaultMount: kv, vaultPrefix: dev, databaseMount: db-prod}\n",
			`databaseMount "db-prod" is also environment "prod"'s databaseMount`},
		"pkiMount is another's databaseMount": {env + "  - {name: dev, vaultMount: kv, vaultPrefix: dev, pkiMount: db-prod}\n", "must not share issuers"},
		"pkiMount is a vaultMount": {env + "  - {name: dev, vaultMount: kv-dev, vaultPrefix: dev, pkiMount: kv}\n",
			`pkiMount "kv" is also environment "prod"'s vaultMount`},
		"databaseMount is its own vaultMount": {"environments: [{name: prod, vaultMount: kv, vaultPrefix: prod, databaseMount: kv}]\n", "vaultMount"},
		"pkiMount is a later environment's vaultMount": {"environments: [{name: prod, vaultMount: kv, vaultPrefix: prod, pkiMount: kv2}, {name: dev, vaultMount: kv2, vaultPrefix: dev}]\n",
			`pkiMount "kv2" is also environment "dev"'s vaultMount`},
		"one environment's pki and database mounts": {"environments: [{name: prod, vaultMount: kv, vaultPrefix: prod, pkiMount: x, databaseMount: x}]\n", "databaseMount"},
		"pkiMount with a slash":                     {"environments: [{name: prod, vaultMount: kv, vaultPrefix: prod, pkiMount: pki/prod}]\n", "pkiMount \"pki/prod\" must be one path segment"},
		"databaseMount with a dot segment":          {"environments: [{name: prod, vaultMount: kv, vaultPrefix: prod, databaseMount: ..}]\n", "one path segment"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := Parse([]byte(tc.yaml))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Parse: %v, want an error mentioning %q", err, tc.want)
			}
		})
	}
	for name, y := range map[string]string{
		"the policy":             dynamicPolicy,
		"roles only":             grant("pkiRoles", "payments_web"),
		"a prefix pattern":       grant("databaseRoles", "payments_r*"),
		"the namespace's prefix": grant("pkiRoles", "payments_*"),
		"no dynamic mounts":      good,
	} {
		if _, err := Parse([]byte(y)); err != nil {
			t.Errorf("%s refused: %v", name, err)
		}
	}
}

func TestAuthorizeDynamic(t *testing.T) {
	p, err := Parse([]byte(dynamicPolicy))
	if err != nil {
		t.Fatal(err)
	}
	a := NewAuthorizer(p, StaticNamespaces{"payments": "prod", "payments-dev": "dev", "billing": "prod", "payments-eu": "prod", "web": "dev"})
	pki := func(role, key string) broker.SecretRef {
		return broker.SecretRef{Kind: broker.KindPKI, Ref: role, Key: key, PKI: broker.PKIRequest{CommonName: "web.example.com"}}
	}
	db := func(role, key string) broker.SecretRef {
		return broker.SecretRef{Kind: broker.KindDatabase, Ref: role, Key: key}
	}
	id := func(ns, sa string) broker.Identity {
		return broker.Identity{Namespace: ns, ServiceAccount: sa, PodName: "p", PodUID: "u"}
	}
	for _, tc := range []struct {
		name       string
		id         broker.Identity
		ref        broker.SecretRef
		wantMount  string
		wantReason string // allowed: the reason; denied: a part of the error
	}{
		{"pki role by pattern", id("payments", "api"), pki("payments_web", "cert"), "pki-prod", "grant 0 (payments/api) pkiRoles payments_* in environment prod"},
		{"pki key part", id("payments", "api"), pki("payments_web", "key"), "pki-prod", "grant 0 (payments/api) pkiRoles payments_*"},
		{"database role", id("payments", "api"), db("payments_ro", "password"), "database-prod", "grant 0 (payments/api) databaseRoles payments_ro in environment prod"},
		{"database role of any service account", id("payments", "worker"), db("payments_report", "username"), "database-prod", "grant 1 (payments/*) databaseRoles payments_report"},
		{"exact pki role", id("billing", "api"), pki("billing_web", "chain"), "pki-prod", "grant 2 (billing/api) pkiRoles billing_web"},
		{"the longer namespace's own role", id("payments-eu", "api"), pki("payments-eu_web", "cert"), "pki-prod", "grant 3"},

		{"other namespace's database role", id("payments", "api"), db("billing_ro", "password"), "", `database role "billing_ro" is not one of namespace "payments"'s roles`},
		{"other namespace's pki role", id("payments", "api"), pki("billing_web", "cert"), "", "is not one of namespace"},
		{"another namespace's role its name prefixes", id("payments", "api"), pki("payments-eu_web", "cert"), "", `pki role "payments-eu_web" is not one of namespace "payments"'s roles`},
		{"a role not granted", id("payments", "api"), db("payments_rw", "password"), "", "no grant lets payments/api use database role payments_rw"},
		{"other service account", id("payments", "worker"), pki("payments_web", "cert"), "", "no grant lets payments/worker use pki role payments_web"},
		{"pki roles do not grant database", id("payments", "api"), db("payments_web", "password"), "", "no grant lets payments/api use database role payments_web"},
		{"database roles do not grant pki", id("billing", "api"), pki("billing_ro", "cert"), "", "no grant lets billing/api use pki role billing_ro"},
		{"environment without a databaseMount", id("payments-dev", "api"), db("payments_ro", "password"), "", `environment "dev" has no databaseMount`},
		{"no grant for the namespace", id("payments-dev", "api"), pki("payments-dev_web", "cert"), "", "no grant lets payments-dev/api"},
		{"no environment label", id("nolabel", "api"), pki("nolabel_web", "cert"), "", "no keyward.dev/environment label"},
		// A KV grant path never allows a dynamic ref, nor a role a KV ref, of the same name.
		{"a KV path does not allow a dynamic ref", id("payments", "api"), db("payments/db", "password"), "", `database role "payments/db" is not one of namespace "payments"'s roles`},
		{"a role does not allow a KV ref", id("billing", "api"), broker.SecretRef{Ref: "billing_web", Key: "cert"}, "", "no grant lets billing/api read billing_web"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := a.Authorize(context.Background(), tc.id, tc.ref)
			if tc.wantMount == "" {
				if !errors.Is(err, fault.ErrDenied) || !strings.Contains(err.Error(), tc.wantReason) {
					t.Fatalf("err = %v, want a denial mentioning %q", err, tc.wantReason)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := broker.Resolved{SecretRef: tc.ref, Environment: "prod", Mount: tc.wantMount, Path: tc.ref.Ref, Role: "prod", Reason: r.Reason}
			if r != want || !strings.HasPrefix(r.Reason, tc.wantReason) {
				t.Fatalf("resolved %+v, want %+v with reason %q", r, want, tc.wantReason)
			}
		})
	}
}

// A dynamic ref resolves to the pod's own environment's issuer, whatever the grant says; an
// environment without the kind's mount issues nothing.
func TestDynamicEnvironmentIsolation(t *testing.T) {
	p, err := Parse([]byte(dynamicPolicy))
	if err != nil {
		t.Fatal(err)
	}
	ref := broker.SecretRef{Kind: broker.KindPKI, Ref: "payments_web", Key: "cert"}
	for env, mount := range map[string]string{"prod": "pki-prod", "dev": "pki-dev"} {
		a := NewAuthorizer(p, StaticNamespaces{"payments": env})
		r, err := a.Authorize(context.Background(), broker.Identity{Namespace: "payments", ServiceAccount: "api"}, ref)
		if err != nil || r.Mount != mount || r.Environment != env || r.Role != env {
			t.Fatalf("%s pod resolved to %+v (%v)", env, r, err)
		}
	}
	noPKI, err := Parse([]byte(strings.Replace(dynamicPolicy, ", pkiMount: pki-dev", "", 1)))
	if err != nil {
		t.Fatal(err)
	}
	a := NewAuthorizer(noPKI, StaticNamespaces{"payments": "dev"})
	_, err = a.Authorize(context.Background(), broker.Identity{Namespace: "payments", ServiceAccount: "api"}, ref)
	if !errors.Is(err, fault.ErrDenied) || !strings.Contains(err.Error(), `environment "dev" has no pkiMount`) {
		t.Fatalf("pki role in an environment without a pkiMount: %v", err)
	}
}
