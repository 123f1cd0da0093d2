package csi

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyward/keyward/csi/tmpfs"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/internal/fault"
)

// fakeMounter stands in for the node's mounts, so the publish and unpublish paths — their cleanup
// above all — are tested without root. A nil fault is success.
type fakeMounter struct {
	mu                              sync.Mutex
	mounted                         map[string]*fakeVolume
	failMount, failOpen, failSwap   error
	failUnmount, failPublished      error
	mounts, unmounts, swaps, clears int
}

type fakeVolume struct {
	m       *fakeMounter
	files   []tmpfs.File
	payload int
}

func (f *fakeMounter) Mount(target string, _ tmpfs.MountOptions) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.mounts++
	if f.failMount != nil {
		return f.failMount
	}
	f.mounted[target] = &fakeVolume{m: f}
	return nil
}

func (f *fakeMounter) Unmount(target string, _ int64) (error, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.unmounts++
	if f.failUnmount != nil {
		return nil, f.failUnmount
	}
	delete(f.mounted, target)
	return nil, nil
}

func (f *fakeMounter) Published(target string) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.mounted[target] != nil, f.failPublished
}

func (f *fakeMounter) Open(target string, _ int64) (Mounted, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failOpen != nil {
		return nil, f.failOpen
	}
	v := f.mounted[target]
	if v == nil {
		return nil, os.ErrNotExist
	}
	return v, nil
}

func (v *fakeVolume) Swap(files []tmpfs.File, _ int, _ os.FileMode) error {
	v.m.mu.Lock()
	defer v.m.mu.Unlock()
	v.m.swaps++
	if v.m.failSwap != nil {
		return v.m.failSwap
	}
	v.files = nil
	for _, f := range files {
		v.files = append(v.files, tmpfs.File{Name: f.Name, Mode: f.Mode, Data: append([]byte(nil), f.Data...)})
	}
	v.payload++
	return nil
}

func (v *fakeVolume) Clear() error {
	v.m.mu.Lock()
	defer v.m.mu.Unlock()
	v.m.clears++
	v.files = nil
	return nil
}

func (v *fakeVolume) Current() (string, bool) { return string(rune('a' + v.payload)), v.payload > 0 }

func (v *fakeVolume) Intact([]tmpfs.File, int) bool { return true }

func (v *fakeVolume) ReadVersion() ([]byte, error) {
	v.m.mu.Lock()
	defer v.m.mu.Unlock()
	for _, f := range v.files {
		if f.Name == tmpfs.VersionFile {
			return append([]byte(nil), f.Data...), nil
		}
	}
	return nil, nil
}

func (v *fakeVolume) Close() error { return nil }

type seamNode struct {
	*node
	m   *fakeMounter
	rec *releaseRecorder
	aud *audit.Memory
}

// newSeamNode is a node server over fakeMounter: no root, no tmpfs.
func newSeamNode(t *testing.T) *seamNode {
	t.Helper()
	m := &fakeMounter{mounted: map[string]*fakeVolume{}}
	rec := &releaseRecorder{}
	aud := &audit.Memory{}
	dir := t.TempDir()
	n := &node{t: t, b: &hostileBroker{value: "CANARY"}, kubeletDir: filepath.Join(dir, "kubelet")}
	s, err := NewServer(Options{NodeID: "node-1", Broker: seamBroker{n.b, rec}, Auditor: aud, Audience: "keyward",
		Log: zaptest.NewLogger(t), KubeletDir: n.kubeletDir, Mounter: m})
	if err != nil {
		t.Fatal(err)
	}
	n.s = s
	return &seamNode{node: n, m: m, rec: rec, aud: aud}
}

// seamBroker fetches and refuses through hostileBroker and releases through releaseRecorder.
type seamBroker struct {
	*hostileBroker
	rec *releaseRecorder
}

func (b seamBroker) Release(podUID string) func(context.Context) error { return b.rec.Release(podUID) }
func (b seamBroker) ReleaseVolume(string) func(context.Context) error  { return nil }

// A first publish that fails at any step leaves no mount, no directory and no credentials behind.
func TestAFailedPublishLeavesNothing(t *testing.T) {
	boom := errors.New("boom")
	for name, fail := range map[string]func(*fakeMounter){
		"mount fails": func(m *fakeMounter) { m.failMount = boom },
		"open fails":  func(m *fakeMounter) { m.failOpen = boom },
		"write fails": func(m *fakeMounter) { m.failSwap = boom },
	} {
		t.Run(name, func(t *testing.T) {
			n := newSeamNode(t)
			fail(n.m)
			target := n.target(podA, "secrets")
			err := n.publish(n.publishReq(podA, target, twoSecrets))
			if status.Code(err) != codes.Internal {
				t.Fatalf("publish: %v", err)
			}
			if _, serr := os.Stat(target); !os.IsNotExist(serr) {
				t.Fatal("the target directory was left")
			}
			if len(n.m.mounted) != 0 || (n.m.failMount == nil && n.m.unmounts != 1) {
				t.Fatalf("mounted %v after %d unmounts", n.m.mounted, n.m.unmounts)
			}
			n.s.WaitReleases()
			if released, _ := n.rec.take(); released != podA {
				t.Fatalf("released %q: the pod's credentials must go with its failed first publish", released)
			}
		})
	}
}

// A target that cannot be inspected is Unavailable: nothing is fetched, nothing mounted over it.
func TestAnUninspectableTargetIsUnavailable(t *testing.T) {
	n := newSeamNode(t)
	n.m.failPublished = errors.New("EIO")
	err := n.publish(n.publishReq(podA, n.target(podA, "secrets"), twoSecrets))
	if status.Code(err) != codes.Unavailable || n.m.mounts != 0 || len(n.b.returned) != 0 {
		t.Fatalf("publish: %v, %d mounts, %d values fetched", err, n.m.mounts, len(n.b.returned))
	}
	if n.b.refusals() != 1 {
		t.Fatalf("%d refusals audited", n.b.refusals())
	}
}

// Republish: unchanged files are not swapped, changed ones are; only a certain withdrawal clears.
func TestRepublishSwapsOnlyChangesAndClearsOnlyWithdrawals(t *testing.T) {
	n := newSeamNode(t)
	target := n.target(podA, "secrets")
	req := n.publishReq(podA, target, twoSecrets)
	for i := range 2 {
		if err := n.publish(req); err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
	}
	if n.m.swaps != 1 {
		t.Fatalf("%d swaps for a publish and an unchanged republish", n.m.swaps)
	}
	n.b.set("ROTATED", nil)
	if err := n.publish(req); err != nil || n.m.swaps != 2 {
		t.Fatalf("a changed republish: %v, %d swaps", err, n.m.swaps)
	}
	n.b.set("ROTATED", errors.New("vault down"))
	if n.publish(req) == nil || n.m.clears != 0 {
		t.Fatalf("an ambiguous failure cleared the files (%d clears)", n.m.clears)
	}
	n.b.set("ROTATED", withdrawnErr())
	if status.Code(n.publish(req)) != codes.PermissionDenied || n.m.clears != 1 {
		t.Fatalf("a withdrawal did not clear the files (%d clears)", n.m.clears)
	}
}

// Each republish tells the broker which environment the volume's files were read from, so a
// namespace moved to another environment has them withdrawn (broker.Request.Environment); a first
// publish and a republish after the files were cleared name none.
func TestRepublishNamesTheEnvironmentOfTheFiles(t *testing.T) {
	n := newSeamNode(t)
	req := n.publishReq(podA, n.target(podA, "secrets"), twoSecrets)
	n.b.env = "prod"
	n.publish(req)                    // first publish
	n.publish(req)                    // republish of prod's files
	n.b.set("CANARY", withdrawnErr()) // withdrawn: cleared
	n.publish(req)
	n.b.set("CANARY", nil)
	n.b.mu.Lock()
	n.b.env = "dev"
	n.b.mu.Unlock()
	n.publish(req) // republish of an empty volume
	n.publish(req) // republish of dev's files
	n.b.mu.Lock()
	defer n.b.mu.Unlock()
	if got, want := strings.Join(n.b.envs, ","), ",prod,prod,,dev"; got != want || n.m.clears != 1 {
		t.Fatalf("environments named by the republishes: %q, want %q (%d clears)", got, want, n.m.clears)
	}
}

// An unpublish that cannot unmount fails (kubelet retries), is audited as failed, and keeps the pod's
// credentials; one that can is audited as allowed and releases them.
func TestUnpublishFailureIsAuditedAndKeepsCredentials(t *testing.T) {
	n := newSeamNode(t)
	target, req := n.published(t)
	n.m.failUnmount = errors.New("EBUSY")
	if err := n.unpublish(req.VolumeId, target); status.Code(err) != codes.Internal {
		t.Fatalf("unpublish: %v", err)
	}
	n.s.WaitReleases()
	if released, _ := n.rec.take(); released != "" {
		t.Fatalf("released %q while the volume is still mounted", released)
	}
	n.m.failUnmount = nil
	if err := n.unpublish(req.VolumeId, target); err != nil {
		t.Fatal(err)
	}
	n.s.WaitReleases()
	if released, _ := n.rec.take(); released != podA {
		t.Fatalf("released %q after the unpublish", released)
	}
	if len(n.aud.Events()) != 2 || n.aud.Events()[0].Decision != audit.Failed || n.aud.Events()[0].Code != "Internal" ||
		n.aud.Events()[1].Decision != audit.Allowed || n.aud.Events()[1].Type != audit.EventUnmount {
		t.Fatalf("audit %+v", n.aud.Events())
	}
}

func withdrawnErr() error { return fault.Withdrawn(fmt.Errorf("no grant: %w", fault.ErrDenied)) }
