package csi

import (
	"context"
	"sort"
	"strings"
	"sync"
	"testing"

	"go.uber.org/zap"

	"github.com/keyward/keyward/broker"
)

type releaseRecorder struct {
	sanityBroker
	mu       sync.Mutex
	released []string
}

func (r *releaseRecorder) Release(_ context.Context, podUID string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.released = append(r.released, podUID)
	return nil
}

func (r *releaseRecorder) take() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	sort.Strings(r.released)
	s := strings.Join(r.released, ",")
	r.released = nil
	return s
}

// A pod's credentials are released when its last tracked volume is unpublished, not before; a volume
// published before a restart (untracked) is attributed by kubelet's target path.
func TestReleaseAfterThePodsLastVolume(t *testing.T) {
	rec := &releaseRecorder{}
	s, err := NewServer(Options{NodeID: "n", Broker: rec, Auditor: discardAudit{}, Audience: "keyward", Log: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	step := func(volumeID, target, want string) {
		t.Helper()
		s.untrack(volumeID, target)
		s.WaitReleases()
		if got := rec.take(); got != want {
			t.Fatalf("unpublish %s: released %q, want %q", volumeID, got, want)
		}
	}
	s.track("v1", "pod-a")
	s.track("v2", "pod-a")
	s.track("v3", "pod-b")
	step("v1", "/t/1", "")
	step("v2", "/t/2", "pod-a")
	step("v3", "/t/3", "pod-b")
	const uid = "0b9e3c4e-8f1a-4d2b-9c3e-5a6b7c8d9e0f"
	step("v4", "/var/lib/kubelet/pods/"+uid+"/volumes/kubernetes.io~csi/secrets/mount", uid)
	step("v5", "/somewhere/else", "")
	s.track("v6", "pod-c")
	s.track("v7", "")
	step("v7", "/t/7", "")
}

var _ Fetcher = (*releaseRecorder)(nil)
var _ Fetcher = (*broker.Service)(nil)
