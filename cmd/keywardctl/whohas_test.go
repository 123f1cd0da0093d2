package main

import (
	"bytes"
	"context"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keyward/keyward/internal/audit"
)

// who-has reads the broker streams of several nodes: each pod's last delivery of the ref, its Vault
// version (from the per-ref versions, or the one version of an older one-ref record), whether it is
// the newest any pod received, and volumes unpublished since (hidden unless --all). The streams
// still verify with the versions in them.
func TestWhoHas(t *testing.T) {
	dir := t.TempDir()
	key := filepath.Join(dir, "k")
	writeFile(t, key, strings.Repeat("k", 32))
	t0 := time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)
	mount := func(node, pod, volume string, at time.Duration, refs, keys string, versions []int, version int) audit.Event {
		return audit.Event{Time: t0.Add(at), Type: audit.EventMount, RequestID: volume + "/abc", Decision: audit.Allowed, Code: "OK",
			Subject: audit.Subject{Namespace: "payments", ServiceAccount: "api", Pod: pod, PodUID: "uid-" + pod, Node: node},
			Object:  audit.Object{Environment: "prod", Ref: refs, Key: keys, Versions: versions, Version: version}}
	}
	streams := map[string][]audit.Event{
		"node-a": {
			mount("node-a", "api-0", "vol-0", 0, "payments/db", "password", nil, 3), // written before per-ref versions
			mount("node-a", "api-0", "vol-0", time.Minute, "payments/db,shared/ca", "password,crt", []int{4, 1}, 0),
			mount("node-a", "api-1", "vol-1", time.Minute, "payments/db", "password", []int{3}, 3),
			{Time: t0.Add(2 * time.Minute), Type: audit.EventUnmount, RequestID: "vol-1", Decision: audit.Allowed},
			{Time: t0.Add(3 * time.Minute), Type: audit.EventAuthorize, Decision: audit.Denied, Object: audit.Object{Environment: "prod", Ref: "payments/db", Key: "password"},
				Subject: audit.Subject{Namespace: "payments", Pod: "api-9"}},
		},
		"node-b": {
			mount("node-b", "api-2", "vol-2", 30*time.Second, "payments/db", "password", []int{3}, 3),
			mount("node-b", "dev-0", "vol-3", 30*time.Second, "payments/db", "password", []int{9}, 9),
		},
	}
	streams["node-b"][1].Object.Environment = "dev"
	var dirs []string
	for node, evs := range streams {
		d := filepath.Join(dir, node)
		l, err := audit.Open(audit.Options{Dir: d, KeyFile: key, Node: node, Stream: "broker"})
		if err != nil {
			t.Fatal(err)
		}
		for _, ev := range evs {
			if err := l.Record(context.Background(), ev); err != nil {
				t.Fatal(err)
			}
		}
		l.Close()
		dirs = append(dirs, d)
		if code, out := ctlRun("audit", "verify", d, "--key-file", key, "--node", node, "--stream", "broker"); code != 0 {
			t.Fatalf("verify %s: %s", node, out)
		}
	}
	code, out := ctlRun(append([]string{"who-has", "payments/db#password", "--environment", "prod"}, dirs...)...)
	if code != 0 {
		t.Fatal(out)
	}
	for _, want := range []string{
		"prod         payments/db#password  payments/api-0  node-a  4        yes",
		"prod         payments/db#password  payments/api-2  node-b  3        no",
		"prod payments/db#password: newest version 4; 1 of 2 pods have it",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("who-has output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "api-1") || strings.Contains(out, "api-9") || strings.Contains(out, "dev") {
		t.Errorf("an unpublished volume, a denied pod or another environment listed:\n%s", out)
	}
	code, out = ctlRun(append([]string{"who-has", "payments/db", "--all", "-o", "json"}, dirs...)...)
	if code != 0 {
		t.Fatal(out)
	}
	var res []Holders
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if len(res) != 2 || res[0].Environment != "dev" || res[0].Newest != 9 || res[1].Newest != 4 || len(res[1].Pods) != 3 || !res[1].Pods[1].Unpublished || res[1].Pods[1].Pod != "api-1" {
		t.Fatalf("json: %s", out)
	}
	if code, out := ctlRun(append([]string{"who-has", "shared/ca#crt"}, dirs...)...); code != 0 || !strings.Contains(out, "payments/api-0  node-a  1        yes") {
		t.Fatalf("the second ref of a record: %s", out)
	}
	if code, _ := ctlRun("who-has", "payments/db"); code != 2 {
		t.Fatal("who-has without a stream directory is not a usage error")
	}
}

func ctlRun(args ...string) (int, string) {
	var out, errb bytes.Buffer
	code := run(args, &out, &errb)
	return code, out.String() + errb.String()
}
