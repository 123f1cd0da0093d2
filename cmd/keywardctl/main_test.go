package main

import (
	"bytes"
	"os"
	"strings"
	"testing"
)

func TestRunExitCodes(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
		out  string
	}{
		{nil, 2, "Usage"},
		{[]string{"help"}, 0, "Usage"},
		{[]string{"version"}, 0, "keywardctl dev"},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate"`},
	} {
		var out, errb bytes.Buffer
		if code := run(tc.args, &out, &errb); code != tc.code {
			t.Errorf("%v: exit %d, want %d", tc.args, code, tc.code)
		}
		if !strings.Contains(out.String()+errb.String(), tc.out) {
			t.Errorf("%v: output %q lacks %q", tc.args, out.String()+errb.String(), tc.out)
		}
	}
}

func TestPolicyCheckAndLint(t *testing.T) {
	dir := t.TempDir()
	good := dir + "/policy.yaml"
	bad := dir + "/bad.yaml"
	writeFile(t, good, "environments: [{name: prod, vaultMount: kv, vaultPrefix: prod}, {name: dev, vaultMount: kv, vaultPrefix: dev}]\n"+
		"grants: [{namespace: payments, serviceAccount: api, paths: [\"payments/*\"]}]\n")
	writeFile(t, bad, "environments: [{name: prod, vaultMount: kv, vaultPrefix: prod}]\n"+
		"grants: [{namespace: payments, serviceAccount: api, paths: [\"billing/*\"]}]\n")
	granted, notGranted, invalid := dir+"/granted.yaml", dir+"/not-granted.yaml", dir+"/invalid.yaml"
	writeFile(t, granted, "- {ref: payments/db, key: password, file: pw}\n- {file: dsn, template: '{{ .db.host }}:{{ .db.password }}', refs: {db: payments/db}}\n")
	writeFile(t, notGranted, "- {file: dsn, template: '{{ .db.password }}{{ .b.password }}', refs: {db: payments/db, b: billing/db}}\n")
	writeFile(t, invalid, "- {file: f, template: '{{ env \"HOME\" }}', refs: {db: payments/db}}\n")
	for _, tc := range []struct {
		args []string
		code int
		out  string
	}{
		{[]string{"policy", "lint", good}, 0, "valid (2 environments, 1 grants"},
		{[]string{"policy", "lint", bad}, 1, "reaches outside namespace"},
		{[]string{"policy", "check", "--policy", good, "--namespace", "payments", "--environment", "prod", "--service-account", "api", "--ref", "payments/db"}, 0, "reads Vault kv/data/prod/payments/db"},
		{[]string{"policy", "check", "--policy", good, "--namespace", "payments", "--environment", "dev", "--service-account", "api", "--ref", "payments/db"}, 0, "kv/data/dev/payments/db"},
		{[]string{"policy", "check", "--policy", good, "--namespace", "payments", "--environment", "prod", "--service-account", "worker", "--ref", "payments/db"}, 1, "deny: no grant"},
		{[]string{"policy", "check", "--policy", good, "--namespace", "payments", "--service-account", "api", "--ref", "payments/db"}, 1, "no keyward.dev/environment label"},
		{[]string{"policy", "check", "--policy", good, "--namespace", "payments", "--environment", "prod", "--service-account", "api", "--ref", "../x"}, 1, "deny"},
		// Refs the broker refuses before its policy sees them: the dry run refuses them too.
		{[]string{"policy", "check", "--policy", good, "--namespace", "payments", "--environment", "prod", "--service-account", "api", "--ref", "payments/.."}, 1, `deny: ref "payments/.." has a ".." segment`},
		{[]string{"policy", "check", "--policy", good, "--namespace", "payments", "--environment", "prod", "--service-account", "api", "--ref", "payments/db", "--key", "a/b"}, 1, `deny: key "a/b"`},
		{[]string{"policy", "check", "--policy", good}, 2, "required"},
		{[]string{"policy", "check", "--policy", good, "--namespace", "payments", "--service-account", "api", "--ref", "payments/db", "--secrets", granted}, 2, "one of --ref or --secrets"},
		// A volume's secrets list: every ref and key it reads, a template's too; one deny denies.
		{[]string{"policy", "check", "--policy", good, "--namespace", "payments", "--environment", "prod", "--service-account", "api", "--secrets", granted}, 0,
			"allow: payments/db#password: grant 0 (payments/api) path payments/* in environment prod; reads Vault kv/data/prod/payments/db key \"password\" (environment prod)\n" +
				"allow: payments/db#host: grant 0"},
		{[]string{"policy", "check", "--policy", good, "--namespace", "payments", "--environment", "prod", "--service-account", "api", "--secrets", notGranted}, 1,
			"allow: payments/db#password: grant 0"},
		{[]string{"policy", "check", "--policy", good, "--namespace", "payments", "--environment", "prod", "--service-account", "api", "--secrets", notGranted}, 1,
			"deny: billing/db#password: no grant"},
		{[]string{"policy", "check", "--policy", good, "--namespace", "payments", "--environment", "prod", "--service-account", "api", "--secrets", invalid}, 1,
			`deny: secrets[0] (file "f"): template: line 1`},
	} {
		var out, errb bytes.Buffer
		if code := run(tc.args, &out, &errb); code != tc.code || !strings.Contains(out.String()+errb.String(), tc.out) {
			t.Errorf("%v: exit %d (want %d): %s%s", tc.args, code, tc.code, out.String(), errb.String())
		}
	}
}

func writeFile(t *testing.T, p, s string) {
	t.Helper()
	if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}
