package policy

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/internal/fault"
)

const good = `
environments:
  - {name: prod, vaultMount: kv, vaultPrefix: prod, vaultRole: prod}
  - {name: dev, vaultMount: kv, vaultPrefix: dev, vaultRole: dev}
grants:
  - {namespace: payments, serviceAccount: api, paths: ["payments/*", "shared/tls/*"]}
  - {namespace: web, serviceAccount: "*", paths: ["web/config"]}
`

func TestParseRefusesInvalidPolicies(t *testing.T) {
	envs := "environments:\n  - {name: prod, vaultMount: kv, vaultPrefix: prod}\n"
	for name, tc := range map[string]struct{ yaml, want string }{
		"unknown key":                  {envs + "grantz: []\n", "unknown field"},
		"grant into another namespace": {envs + `grants: [{namespace: payments, serviceAccount: api, paths: ["billing/*"]}]`, "reaches outside namespace"},
		"grant of everything":          {envs + `grants: [{namespace: payments, serviceAccount: api, paths: ["*"]}]`, "path"},
		"traversal in a grant":         {envs + `grants: [{namespace: payments, serviceAccount: api, paths: ["payments/../billing/*"]}]`, ".."},
		"no paths":                     {envs + `grants: [{namespace: payments, serviceAccount: api, paths: []}]`, "no paths"},
		"bad namespace":                {envs + `grants: [{namespace: Pay_ments, serviceAccount: api, paths: ["x"]}]`, "namespace"},
		"no environments":              {"grants: []\n", "no environments"},
		"duplicate environment":        {envs + "  - {name: prod, vaultMount: kv, vaultPrefix: prod2}\n", "defined twice"},
		"overlapping environments":     {envs + "  - {name: prodeu, vaultMount: kv, vaultPrefix: prod/eu}\n", "overlaps"},
		"absolute prefix":              {"environments: [{name: prod, vaultMount: kv, vaultPrefix: /prod}]\n", "absolute"},
		"mount with a slash":           {"environments: [{name: prod, vaultMount: kv/x, vaultPrefix: prod}]\n", "vaultMount"},
		"wildcard in the middle":       {envs + `grants: [{namespace: payments, serviceAccount: api, paths: ["payments/*/db"]}]`, "characters"},
		"service account with a colon": {envs + `grants: [{namespace: payments, serviceAccount: "a:b", paths: ["payments/x"]}]`, "serviceAccount"},
		"not yaml":                     {"{", "policy"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := Parse([]byte(tc.yaml))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Parse: %v, want an error mentioning %q", err, tc.want)
			}
		})
	}
	if _, err := Parse([]byte(good)); err != nil {
		t.Fatalf("good policy refused: %v", err)
	}
}

func TestAuthorize(t *testing.T) {
	p, err := Parse([]byte(good))
	if err != nil {
		t.Fatal(err)
	}
	a := NewAuthorizer(p, StaticNamespaces{"payments": "prod", "payments-dev": "dev", "web": "dev", "nolabel": "", "odd": "qa"})
	id := func(ns, sa string) broker.Identity { return broker.Identity{Namespace: ns, ServiceAccount: sa} }
	for _, tc := range []struct {
		name     string
		id       broker.Identity
		ref      string
		want     error
		wantPath string
	}{
		{"granted", id("payments", "api"), "payments/db", nil, "prod/payments/db"},
		{"granted deep", id("payments", "api"), "payments/a/b/c", nil, "prod/payments/a/b/c"},
		{"shared", id("payments", "api"), "shared/tls/ca", nil, "prod/shared/tls/ca"},
		{"prefix itself is not below it", id("payments", "api"), "payments", fault.ErrDenied, ""},
		{"other service account", id("payments", "worker"), "payments/db", fault.ErrDenied, ""},
		{"other namespace's pod", id("billing", "api"), "payments/db", fault.ErrDenied, ""},
		{"wildcard service account, exact path", id("web", "anyone"), "web/config", nil, "dev/web/config"},
		{"exact path does not cover children", id("web", "anyone"), "web/config/x", fault.ErrDenied, ""},
		{"no environment label", id("nolabel", "api"), "nolabel/x", fault.ErrDenied, ""},
		{"unknown environment", id("odd", "api"), "odd/x", fault.ErrDenied, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := a.Authorize(context.Background(), tc.id, broker.SecretRef{Ref: tc.ref, Key: "password"})
			if !errors.Is(err, tc.want) && !(tc.want == nil && err == nil) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if tc.want == nil && (r.Path != tc.wantPath || r.Mount != "kv" || r.Reason == "" || r.Role != r.Environment) {
				t.Fatalf("resolved %+v, want path %s", r, tc.wantPath)
			}
		})
	}
}

// Whatever a grant says, a ref resolves under the pod's own environment prefix.
func TestEnvironmentIsolationInvariant(t *testing.T) {
	p, _ := Parse([]byte(good))
	for _, ns := range []string{"payments"} {
		for env, prefix := range map[string]string{"prod": "prod/", "dev": "dev/"} {
			a := NewAuthorizer(p, StaticNamespaces{ns: env})
			r, err := a.Authorize(context.Background(), broker.Identity{Namespace: ns, ServiceAccount: "api"}, broker.SecretRef{Ref: "payments/db", Key: "k"})
			if err != nil || !strings.HasPrefix(r.Path, prefix) || r.Environment != env {
				t.Fatalf("%s pod resolved to %+v (%v)", env, r, err)
			}
		}
	}
}

func TestWatchReloadsAndKeepsLastGoodPolicy(t *testing.T) {
	path := filepath.Join(t.TempDir(), "policy.yaml")
	os.WriteFile(path, []byte(good), 0o600)
	p, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	a := NewAuthorizer(p, StaticNamespaces{"payments": "prod", "billing": "prod"})
	core, logs := observer.New(zap.DebugLevel)
	rec := &audit.Memory{}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go Watch(ctx, path, 10*time.Millisecond, a, zap.New(core), rec)
	billing := broker.Identity{Namespace: "billing", ServiceAccount: "api"}
	ref := broker.SecretRef{Ref: "billing/db", Key: "k"}
	if _, err := a.Authorize(ctx, billing, ref); !errors.Is(err, fault.ErrDenied) {
		t.Fatalf("before reload: %v", err)
	}
	// A bad file: refused, logged, audited; the old policy stays.
	writeAtomic(t, path, good+"  - {namespace: billing, serviceAccount: api, paths: [\"payments/*\"]}\n")
	waitFor(t, func() bool { return len(rec.Events()) == 1 })
	if ev := rec.Events()[0]; ev.Type != audit.EventPolicyReload || ev.Decision != audit.Denied || ev.Code != "InvalidArgument" {
		t.Fatalf("audit event %+v", ev)
	}
	if logs.FilterMessage("policy reload refused; keeping the last good policy").Len() != 1 {
		t.Fatal("no error log line for the refused policy")
	}
	if a.Policy() != p || a.Generation() != 1 {
		t.Fatalf("a refused policy replaced the good one (generation %d)", a.Generation())
	}
	// A good file: swapped in.
	writeAtomic(t, path, good+"  - {namespace: billing, serviceAccount: api, paths: [\"billing/*\"]}\n")
	waitFor(t, func() bool { return len(rec.Events()) == 2 })
	if ev := rec.Events()[1]; ev.Decision != audit.Allowed {
		t.Fatalf("audit event %+v", ev)
	}
	if _, err := a.Authorize(ctx, billing, ref); err != nil {
		t.Fatalf("after reload: %v", err)
	}
	if a.Generation() != 2 || a.Policy().Hash() == p.Hash() {
		t.Fatalf("after reload: generation %d, hash %s", a.Generation(), a.Policy().Hash())
	}
}

// writeAtomic replaces path's content at once (write a temporary file, rename it over), as ConfigMap
// updates do: the watcher never sees it half-written.
func writeAtomic(t *testing.T, path, content string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// scriptedFile plays a sequence of file contents to the watcher, one per read, then repeats the last.
type scriptedFile struct {
	mu    sync.Mutex
	reads []string
	n     int
}

func (f *scriptedFile) read(string) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	i := min(f.n, len(f.reads)-1)
	f.n++
	return []byte(f.reads[i]), nil
}

func (f *scriptedFile) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.n
}

// A file caught mid-write (empty, then half of the new policy) is not a bad policy: the watcher reads
// again until two reads agree and records only the reload of the finished file. (Before, it recorded
// a refused reload, "no environments", and raised a false security alert.)
func TestWatchWaitsOutAFileCaughtMidWrite(t *testing.T) {
	p, err := Parse([]byte(good))
	if err != nil {
		t.Fatal(err)
	}
	a := NewAuthorizer(p, StaticNamespaces{"payments": "prod", "billing": "prod"})
	next := good + "  - {namespace: billing, serviceAccount: api, paths: [\"billing/*\"]}\n"
	f := &scriptedFile{reads: []string{good, "", next[:len(next)/2], next}}
	rec := &audit.Memory{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { watchFile(ctx, "policy.yaml", 4*time.Millisecond, a, zap.NewNop(), rec, f.read); close(done) }()
	waitFor(t, func() bool { return len(rec.Events()) >= 1 })
	waitFor(t, func() bool { return f.count() > 10 }) // more ticks: nothing else is recorded
	cancel()
	<-done
	evs := rec.Events()
	if len(evs) != 1 || evs[0].Decision != audit.Allowed {
		t.Fatalf("recorded %+v, want exactly one allowed reload", evs)
	}
	if _, err := a.Authorize(ctx, broker.Identity{Namespace: "billing", ServiceAccount: "api"}, broker.SecretRef{Ref: "billing/db", Key: "k"}); err != nil {
		t.Fatalf("the finished policy is not in force: %v", err)
	}

	// A file that stays bad (two reads agree) is refused, once.
	f2 := &scriptedFile{reads: []string{good, ""}}
	rec2 := &audit.Memory{}
	ctx2, cancel2 := context.WithCancel(context.Background())
	done2 := make(chan struct{})
	a2 := NewAuthorizer(p, StaticNamespaces{})
	go func() {
		watchFile(ctx2, "policy.yaml", 4*time.Millisecond, a2, zap.NewNop(), rec2, f2.read)
		close(done2)
	}()
	waitFor(t, func() bool { return len(rec2.Events()) >= 1 })
	waitFor(t, func() bool { return f2.count() > 10 })
	cancel2()
	<-done2
	if evs := rec2.Events(); len(evs) != 1 || evs[0].Decision != audit.Denied {
		t.Fatalf("a file that stays empty: recorded %+v, want one refused reload", evs)
	}
}

func waitFor(t *testing.T, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(good))
	f.Add([]byte("environments: [{name: a, vaultMount: kv, vaultPrefix: a}]\ngrants: [{namespace: a, serviceAccount: '*', paths: ['a/*']}]"))
	f.Add([]byte(dynamicPolicy + "issueBudgets: {pod: {burst: 1, perHour: 2}}\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := Parse(b)
		if err != nil {
			return
		}
		// Every accepted grant stays inside its namespace or shared/, and names only its namespace's roles.
		for _, g := range p.Grants {
			for _, path := range g.Paths {
				first, _, _ := strings.Cut(strings.TrimSuffix(path, "/*"), "/")
				if first != g.Namespace && first != "shared" {
					t.Fatalf("accepted grant %+v", g)
				}
			}
			for _, role := range append(slices.Clone(g.PKIRoles), g.DatabaseRoles...) {
				if !strings.HasPrefix(role, g.Namespace+"_") {
					t.Fatalf("accepted grant %+v", g)
				}
			}
		}
		// No two environments share a mount (a KV mount may serve several, under disjoint prefixes).
		seen := map[string]bool{}
		for _, e := range p.Environments {
			for _, m := range []string{e.PKIMount, e.DatabaseMount} {
				if m != "" && seen[m] {
					t.Fatalf("accepted a shared issuer %q", m)
				}
				seen[m] = true
			}
		}
		for _, e := range p.Environments {
			if e.VaultMount != "" && (seen[e.VaultMount]) {
				t.Fatalf("accepted an issuer that is a KV mount %q", e.VaultMount)
			}
		}
	})
}
