package csi

import (
	"context"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/keyward/keyward/broker"
)

// releaseRecorder records which pods' credentials were released (forgotten) and revoked.
type releaseRecorder struct {
	sanityBroker
	mu       sync.Mutex
	released []string
	revoked  []string
}

func (r *releaseRecorder) Release(podUID string) func(context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.released = append(r.released, podUID)
	return func(context.Context) error {
		r.mu.Lock()
		defer r.mu.Unlock()
		r.revoked = append(r.revoked, podUID)
		return nil
	}
}

func (r *releaseRecorder) take() (released, revoked string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	sort.Strings(r.released)
	sort.Strings(r.revoked)
	released, revoked = strings.Join(r.released, ","), strings.Join(r.revoked, ",")
	r.released, r.revoked = nil, nil
	return released, revoked
}

// releaseServer is a server over a releaseRecorder, and want, which waits for the releases and
// checks that exactly pods (sorted, comma-separated) were released and revoked since the last call.
func releaseServer(t *testing.T) (*Server, func(step, pods string)) {
	rec := &releaseRecorder{}
	s, err := NewServer(Options{NodeID: "n", Broker: rec, Auditor: discardAudit{}, Audience: "keyward", Log: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	return s, func(step, pods string) {
		t.Helper()
		s.WaitReleases()
		released, revoked := rec.take()
		if released != pods || revoked != pods {
			t.Fatalf("%s: released %q, revoked %q, want %q", step, released, revoked, pods)
		}
	}
}

// A pod's credentials are released when no volume of the pod holds its files and no publish of it
// is running, and only then; a volume published before a restart is attributed by kubelet's path.
func TestReleaseFollowsThePodsVolumes(t *testing.T) {
	s, want := releaseServer(t)
	c := s.o.Credentials
	publish := func(vol, pod string, holdsFiles bool) { c.begin(pod); c.end(vol, pod, holdsFiles) }

	publish("v1", "pod-a", true)
	publish("v2", "pod-a", true)
	publish("v3", "pod-b", true)
	want("three volumes published", "")
	c.unpublished("v1", "/t/1")
	want("pod-a still has v2", "")
	c.unpublished("v2", "/t/2")
	want("pod-a's last volume", "pod-a")

	// A refused republish clears v3's files: pod-b holds nothing any more.
	publish("v3", "pod-b", false)
	want("pod-b's republish refused", "pod-b")

	// A failed first publish releases, unless another volume of the pod holds files...
	publish("v4", "pod-c", true)
	publish("v5", "pod-c", false)
	want("pod-c's second volume failed", "")
	// ...or another publish of the pod is running (it may be using the token).
	c.begin("pod-c")
	c.unpublished("v4", "/t/4")
	want("pod-c has a publish in flight", "")
	c.end("v6", "pod-c", false)
	want("pod-c's in-flight publish failed too", "pod-c")

	const uid = "0b9e3c4e-8f1a-4d2b-9c3e-5a6b7c8d9e0f"
	c.unpublished("v7", "/var/lib/kubelet/pods/"+uid+"/volumes/kubernetes.io~csi/secrets/mount")
	want("a volume from before a restart", uid)
	c.unpublished("v8", "/somewhere/else")
	want("an unknown volume", "")
}

var _ Broker = (*releaseRecorder)(nil)
var _ Broker = (*broker.Service)(nil)

// livePods is a fake node pod informer.
type livePods struct {
	mu      sync.Mutex
	pods    map[string]bool
	trusted bool
}

func (l *livePods) Live(uid string) (bool, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.pods[uid], l.trusted
}

// Provider-API mounts hold their pod's credentials while the node's pod informer says the pod lives,
// and release them when it is deleted (or idle, or the informer cannot tell: as before it, at the
// end of each mount); a failed mount releases at once.
func TestProviderMountsHoldWhileThePodLives(t *testing.T) {
	s, want := releaseServer(t)
	c := s.o.Credentials
	mount := func(pod string, ok bool) { c.begin(pod); c.endMount(pod, ok) }

	mount("pod-a", true)
	want("no informer: every mount releases", "pod-a")
	live := &livePods{pods: map[string]bool{"pod-a": true, "pod-b": true}, trusted: true}
	c.WatchPods(live, time.Minute)
	mount("pod-a", true)
	mount("pod-a", true)
	mount("pod-x", true)
	want("a live pod's mounts hold; an unknown pod's mount releases", "pod-x")
	mount("pod-b", false)
	want("a failed mount releases", "pod-b")
	// A CSI volume of the same pod going does not release what the provider mount holds.
	c.begin("pod-a")
	c.end("v1", "pod-a", true)
	c.unpublished("v1", "/t/1")
	want("the pod's CSI volume went, its provider mount holds", "")
	c.PodDeleted("pod-a")
	want("the pod was deleted", "pod-a")
	c.PodDeleted("pod-a")
	want("a second delete event", "")

	mount("pod-b", true)
	c.Sweep(time.Now())
	want("a recent mount of a live pod survives a sweep", "")
	c.Sweep(time.Now().Add(2 * time.Minute))
	want("an idle hold is swept", "pod-b")
	mount("pod-b", true)
	live.mu.Lock()
	live.trusted = false
	live.mu.Unlock()
	mount("pod-b", true)
	want("an untrusted informer: the mount releases as before", "pod-b")
	if c.Held() != 0 {
		t.Fatalf("%d holds left", c.Held())
	}
}

// volumeRecorder records, in order, the volumes whose leases were released and revoked and the pods
// whose credentials were revoked.
type volumeRecorder struct {
	releaseRecorder
	order []string
}

func (r *volumeRecorder) ReleaseVolume(volumeID string) func(context.Context) error {
	return func(context.Context) error {
		r.mu.Lock()
		defer r.mu.Unlock()
		r.order = append(r.order, "volume "+volumeID)
		return nil
	}
}

func (r *volumeRecorder) Release(podUID string) func(context.Context) error {
	r.releaseRecorder.Release(podUID)
	return func(context.Context) error {
		r.mu.Lock()
		defer r.mu.Unlock()
		r.order = append(r.order, "pod "+podUID)
		return nil
	}
}

// A volume's leases are revoked whenever it holds no files (unpublished, withdrawn, a first publish
// that failed), before the pod's token is (they were issued with it), and never while the volume
// still holds files; a provider mount, with no volume, has none to revoke.
func TestVolumeLeasesGoWhenTheVolumeHoldsNoFiles(t *testing.T) {
	rec := &volumeRecorder{}
	s, err := NewServer(Options{NodeID: "n", Broker: rec, Auditor: discardAudit{}, Audience: "keyward", Log: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	c := s.o.Credentials
	take := func() string {
		s.WaitReleases()
		rec.mu.Lock()
		defer rec.mu.Unlock()
		out := strings.Join(rec.order, ", ")
		rec.order = nil
		return out
	}
	publish := func(vol, pod string, holdsFiles bool) { c.begin(pod); c.end(vol, pod, holdsFiles) }
	for _, tc := range []struct {
		step string
		do   func()
		want string
	}{
		{"published", func() { publish("v1", "pod-a", true); publish("v2", "pod-a", true) }, ""},
		{"republished, files kept", func() { publish("v1", "pod-a", true) }, ""},
		{"one volume unpublished, the pod keeps another", func() { c.unpublished("v1", "/t/1") }, "volume v1"},
		{"the last volume withdrawn: its leases, then the pod's token", func() { publish("v2", "pod-a", false) }, "volume v2, pod pod-a"},
		{"a failed first publish", func() { publish("v3", "pod-b", false) }, "volume v3, pod pod-b"},
		{"a provider mount", func() { c.begin("pod-c"); c.endMount("pod-c", true) }, "pod pod-c"},
	} {
		tc.do()
		if got := take(); got != tc.want {
			t.Fatalf("%s: %q, want %q", tc.step, got, tc.want)
		}
	}
}
