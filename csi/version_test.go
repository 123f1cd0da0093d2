package csi

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyward/keyward/csi/podevents"
	"github.com/keyward/keyward/csi/tmpfs"
	"github.com/keyward/keyward/internal/fault"
)

// eventLog records what the server tells a pod.
type eventLog struct {
	mu      sync.Mutex
	rotated []string
	denied  []string
}

func (l *eventLog) Rotated(pod podevents.Pod, version uint64, changes []podevents.Change) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.rotated = append(l.rotated, fmt.Sprintf("%s %d %v", pod.UID, version, changes))
}

func (l *eventLog) Denied(pod podevents.Pod, reason string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.denied = append(l.denied, pod.UID+" "+reason)
}

func (l *eventLog) take() (rotated, denied []string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	rotated, denied, l.rotated, l.denied = l.rotated, l.denied, nil, nil
	return rotated, denied
}

func readVersionFile(t *testing.T, target string) (VersionDoc, []byte) {
	t.Helper()
	p := filepath.Join(target, tmpfs.VersionFile)
	if l, err := os.Readlink(p); err != nil || l != "..data/"+tmpfs.VersionFile {
		t.Fatalf("..version is not a link through ..data: %q %v", l, err)
	}
	st, err := os.Stat(p)
	if err != nil || st.Mode().Perm() != 0o444 {
		t.Fatalf("..version: %v %v, want mode 0444", st.Mode(), err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	d, ok := ParseVersion(b)
	if !ok || !strings.HasSuffix(string(b), "}\n") || strings.Count(string(b), "\n") != 1 {
		t.Fatalf("..version is not one JSON line: %q", b)
	}
	return d, b
}

// Each swap of changed content writes the next ..version (in the payload, swapped with it,
// read-only, no value); an unchanged republish keeps it; a restarted driver counts on from the
// volume's own ..version and does not count a re-swap of the same versions; each counted swap tells
// the pod which refs changed, and each refusal tells it why, in the words kubelet got.
func TestVersionFileCountsSwapsAcrossRestarts(t *testing.T) {
	events := &eventLog{}
	n := newNode(t, func(o *Options) { o.Events = events })
	target, req := n.published(t)
	want := func(version uint64, v int) {
		t.Helper()
		d, b := readVersionFile(t, target)
		w := VersionDoc{Version: version, Refs: map[string]int{"payments/db#password": v, "shared/ca#crt": v}}
		if !reflect.DeepEqual(d, w) {
			t.Fatalf("..version %s, want %+v", b, w)
		}
		if strings.Contains(string(b), "CANARY") {
			t.Fatalf("..version holds a value: %s", b)
		}
	}
	want(1, 1)
	files, err := tmpfs.Read(target)
	if err != nil || len(files) != 2 {
		t.Fatalf("Read: %d files %v (..version is not a delivered file)", len(files), err)
	}

	if err := n.publish(req); err != nil { // unchanged
		t.Fatal(err)
	}
	want(1, 1)
	n.b.mu.Lock()
	n.b.value, n.b.version = "CANARY2", 2
	n.b.mu.Unlock()
	if err := n.publish(req); err != nil {
		t.Fatal(err)
	}
	want(2, 2)
	if r, _ := events.take(); len(r) != 1 || r[0] != podA+" 2 [{payments/db#password 1 2} {shared/ca#crt 1 2}]" {
		t.Fatalf("rotation events %q", r)
	}

	// A restart: a new server over the same volumes knows nothing of them.
	s2, err := NewServer(n.s.o)
	if err != nil {
		t.Fatal(err)
	}
	n.s = s2
	if err := n.publish(req); err != nil {
		t.Fatal(err)
	}
	want(2, 2)
	if r, _ := events.take(); len(r) != 0 {
		t.Fatalf("a re-swap of the same versions after a restart was told as a rotation: %q", r)
	}
	n.b.mu.Lock()
	n.b.value, n.b.version = "CANARY3", 3
	n.b.mu.Unlock()
	n.s, _ = NewServer(n.s.o)
	if err := n.publish(req); err != nil {
		t.Fatal(err)
	}
	want(3, 3)
	if r, _ := events.take(); len(r) != 1 || !strings.HasPrefix(r[0], podA+" 3 [{payments/db#password 2 3}") {
		t.Fatalf("rotation events after a restart %q", r)
	}

	n.b.set("CANARY4", fault.Withdrawn(fmt.Errorf("payments/db#password: no grant for payments/api: %w", fault.ErrDenied)))
	err = n.publish(req)
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("withdrawn: %v", err)
	}
	r, d := events.take()
	if len(r) != 0 || len(d) != 1 || d[0] != podA+" "+status.Convert(err).Message() || strings.Contains(d[0], "CANARY") {
		t.Fatalf("denial events %q, rotations %q; kubelet got %q", d, r, status.Convert(err).Message())
	}
	if _, err := os.Lstat(filepath.Join(target, tmpfs.VersionFile)); !os.IsNotExist(err) {
		t.Fatalf("a withdrawal left ..version: %v", err)
	}
	// Access granted again: the files come back and the count goes on from before the withdrawal.
	n.b.set("CANARY5", nil)
	if err := n.publish(req); err != nil {
		t.Fatal(err)
	}
	if d, b := readVersionFile(t, target); d.Version != 4 || strings.Contains(string(b), "CANARY") {
		t.Fatalf("..version after a withdrawal and a new grant: %s", b)
	}
	if r, _ := events.take(); len(r) != 1 || !strings.HasPrefix(r[0], podA+" 4 [{payments/db#password 0 3}") {
		t.Fatalf("rotation events after a new grant %q", r)
	}
	// A publish refused before anything is fetched is told too.
	bad := n.publishReq(podB, n.target(podB, "secrets"), twoSecrets)
	bad.Readonly = false
	if err := n.publish(bad); status.Code(err) != codes.InvalidArgument {
		t.Fatal(err)
	}
	if _, d := events.take(); len(d) != 1 || !strings.HasPrefix(d[0], podB+" ") || !strings.Contains(d[0], "readOnly: true") {
		t.Fatalf("denial events %q", d)
	}
}

func TestNextVersion(t *testing.T) {
	a := map[string]int{"x#k": 1}
	b := map[string]int{"x#k": 2}
	for _, tc := range []struct {
		name   string
		prev   VersionDoc
		refs   map[string]int
		same   bool
		want   uint64
		bumped bool
	}{
		{"first", VersionDoc{}, a, true, 1, true},
		{"same versions, same content", VersionDoc{Version: 4, Refs: a}, a, true, 4, false},
		{"same versions, other content", VersionDoc{Version: 4, Refs: a}, a, false, 5, true},
		{"new version", VersionDoc{Version: 4, Refs: a}, b, true, 5, true},
	} {
		next, bumped := nextVersion(tc.prev, VersionDoc{Refs: tc.refs}, tc.same)
		if next.Version != tc.want || bumped != tc.bumped {
			t.Errorf("%s: %d %v, want %d %v", tc.name, next.Version, bumped, tc.want, tc.bumped)
		}
	}
	// A reissued lease is new content even where the stored refs and the digest say nothing changed
	// (the first republish after a restart).
	l1 := VersionDoc{Version: 4, Refs: a, Leases: map[string]string{"pki:payments-web": "aaaa"}}
	if next, bumped := nextVersion(l1, VersionDoc{Refs: a, Leases: map[string]string{"pki:payments-web": "bbbb"}}, true); next.Version != 5 || !bumped {
		t.Errorf("reissued lease: %d %v, want 5 true", next.Version, bumped)
	}
	if next, bumped := nextVersion(l1, VersionDoc{Refs: a, Leases: map[string]string{"pki:payments-web": "aaaa"}}, true); next.Version != 4 || bumped {
		t.Errorf("same lease: %d %v, want 4 false", next.Version, bumped)
	}
	if _, ok := ParseVersion([]byte(`{"version":0}`)); ok {
		t.Error("version 0 parsed")
	}
	if _, ok := ParseVersion([]byte(`garbage`)); ok {
		t.Error("garbage parsed")
	}
	var d VersionDoc
	if err := json.Unmarshal(VersionDoc{Version: 2, Refs: b}.file().Data, &d); err != nil || d.Version != 2 {
		t.Error(err)
	}
}
