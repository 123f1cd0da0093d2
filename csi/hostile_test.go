package csi

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/csi/tmpfs"
	"github.com/keyward/keyward/internal/fault"
	"github.com/keyward/keyward/test/harness"
)

// These tests play a hostile pod (and a confused kubelet) against the node server with real tmpfs
// mounts (as root); the broker is a fake that hands out canary values or the error a test needs.

const (
	podA = "0b9e3c4e-8f1a-4d2b-9c3e-5a6b7c8d9e0a"
	podB = "0b9e3c4e-8f1a-4d2b-9c3e-5a6b7c8d9e0b"
)

type hostileBroker struct {
	mu       sync.Mutex
	value    string
	err      error
	refused  []error
	returned [][]byte // every value handed out, to check they were zeroed
	env      string   // the environment the values are read from
	version  int      // the Vault version the values are read at (0: 1)
	envs     []string // each request's Environment (where the caller's files came from)
	block    chan struct{}
	inside   atomic.Int32
	maxIn    atomic.Int32
}

func (b *hostileBroker) Fetch(ctx context.Context, req broker.Request) ([]broker.Secret, error) {
	n := b.inside.Add(1)
	defer b.inside.Add(-1)
	for {
		m := b.maxIn.Load()
		if n <= m || b.maxIn.CompareAndSwap(m, n) {
			break
		}
	}
	b.mu.Lock()
	block, value, err, env, version := b.block, b.value, b.err, b.env, max(b.version, 1)
	b.envs = append(b.envs, req.Environment)
	b.mu.Unlock()
	if block != nil {
		select {
		case <-block:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if err != nil {
		return nil, err
	}
	out := make([]broker.Secret, len(req.Refs))
	for i, r := range req.Refs {
		v := []byte(value + "-" + r.Ref)
		b.mu.Lock()
		b.returned = append(b.returned, v)
		b.mu.Unlock()
		out[i] = broker.Secret{Ref: r, Version: version, Value: v, Environment: env}
	}
	return out, nil
}

func (b *hostileBroker) Refuse(_ context.Context, _ broker.Request, err error) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refused = append(b.refused, err)
	return nil
}

func (b *hostileBroker) Release(string) func(context.Context) error       { return nil }
func (b *hostileBroker) ReleaseVolume(string) func(context.Context) error { return nil }

func (b *hostileBroker) set(value string, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.value, b.err = value, err
}

func (b *hostileBroker) refusals() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.refused)
}

type node struct {
	t          *testing.T
	s          *Server
	b          *hostileBroker
	kubeletDir string
}

func newNode(t *testing.T, mutate ...func(*Options)) *node {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("the node server tests mount tmpfs and need root, as the node plugin does")
	}
	dir := t.TempDir()
	n := &node{t: t, b: &hostileBroker{value: "CANARY"}, kubeletDir: filepath.Join(dir, "kubelet")}
	o := Options{NodeID: "node-1", Broker: n.b, Auditor: discardAudit{}, Audience: "keyward", Log: zaptest.NewLogger(t),
		KubeletDir: n.kubeletDir, AllowSwap: true}
	for _, m := range mutate {
		m(&o)
	}
	s, err := NewServer(o)
	if err != nil {
		t.Fatal(err)
	}
	n.s = s
	t.Cleanup(func() { tmpfs.UnmountAllUnder(dir) })
	return n
}

// target is kubelet's path of pod's volume; kubelet creates its parent before publishing.
func (n *node) target(pod, volume string) string {
	p := filepath.Join(n.kubeletDir, "pods", pod, "volumes/kubernetes.io~csi", volume, "mount")
	if err := os.MkdirAll(filepath.Dir(p), 0o750); err != nil {
		n.t.Fatal(err)
	}
	return p
}

func (n *node) publishReq(pod, target, secrets string) *csipb.NodePublishVolumeRequest {
	a := attrs(secrets, func(m map[string]string) { m[AttrPodUID] = pod })
	return &csipb.NodePublishVolumeRequest{
		VolumeId: "vol-" + pod + "-" + filepath.Base(filepath.Dir(target)), TargetPath: target, Readonly: true,
		VolumeCapability: &csipb.VolumeCapability{AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{}}},
		VolumeContext:    a,
	}
}

func (n *node) publish(req *csipb.NodePublishVolumeRequest) error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err := n.s.NodePublishVolume(ctx, req)
	return err
}

func (n *node) unpublish(volumeID, target string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err := n.s.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: volumeID, TargetPath: target})
	return err
}

// published publishes podA's volume of twoSecrets and returns its target and request.
func (n *node) published(t *testing.T) (string, *csipb.NodePublishVolumeRequest) {
	t.Helper()
	target := n.target(podA, "secrets")
	req := n.publishReq(podA, target, twoSecrets)
	if err := n.publish(req); err != nil {
		t.Fatal(err)
	}
	return target, req
}

const twoSecrets = "- {ref: payments/db, key: password, file: db-password}\n- {ref: shared/ca, key: crt, file: ca.crt, mode: \"0444\"}"

// A writable volume is refused before anything is fetched or mounted (Secrets Store CSI Driver does
// the same): in a writable volume a pod running as root could plant what the driver later reads.
func TestPublishRefusesAWritableVolume(t *testing.T) {
	n := newNode(t)
	target := n.target(podA, "secrets")
	req := n.publishReq(podA, target, twoSecrets)
	req.Readonly = false
	err := n.publish(req)
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), "readOnly: true") {
		t.Fatalf("writable volume: %v", err)
	}
	if _, serr := os.Stat(target); !os.IsNotExist(serr) {
		t.Fatal("a refused publish created the target")
	}
	if n.b.refusals() != 1 {
		t.Fatalf("%d refusal records, want 1", n.b.refusals())
	}
}

// Only kubelet's path of the claimed pod's CSI volume is ever mounted on, and no component of it may
// be a symlink: a request cannot aim the root-privileged driver at another pod's volume or at any
// other directory of the node.
func TestTargetPathMustBeKubeletsPathOfThePod(t *testing.T) {
	n := newNode(t)
	victim := filepath.Join(t.TempDir(), "victim")
	os.MkdirAll(victim, 0o755)
	os.WriteFile(filepath.Join(victim, "keep"), []byte("VICTIM"), 0o600)
	otherPod := n.target(podB, "secrets")
	linkedPod := filepath.Join(n.kubeletDir, "pods", "0b9e3c4e-8f1a-4d2b-9c3e-5a6b7c8d9e0c")
	os.Symlink(filepath.Join(n.kubeletDir, "pods", podB), linkedPod) // pods/<uid> -> another pod
	linkedVol := filepath.Join(n.kubeletDir, "pods", podA, "volumes/kubernetes.io~csi/evil")
	n.target(podA, "x")
	os.Symlink(victim, linkedVol) // <volume> -> a directory of the node
	for name, target := range map[string]string{
		"outside the kubelet dir":    filepath.Join(victim, "mount"),
		"relative":                   "pods/" + podA + "/volumes/kubernetes.io~csi/secrets/mount",
		"unclean":                    filepath.Join(n.kubeletDir, "pods", podA, "volumes/kubernetes.io~csi/secrets") + "/../secrets/mount",
		"not a CSI volume":           filepath.Join(n.kubeletDir, "pods", podA, "volumes/kubernetes.io~secret/secrets/mount"),
		"not the mount dir":          filepath.Join(n.kubeletDir, "pods", podA, "volumes/kubernetes.io~csi/secrets"),
		"another pod's volume":       otherPod,
		"pod dir is a symlink":       filepath.Join(linkedPod, "volumes/kubernetes.io~csi/secrets/mount"),
		"volume dir is a symlink":    filepath.Join(linkedVol, "mount"),
		"kubelet dir prefix, no sep": n.kubeletDir + "x/pods/" + podA + "/volumes/kubernetes.io~csi/secrets/mount",
	} {
		t.Run(name, func(t *testing.T) {
			req := n.publishReq(podA, target, twoSecrets)
			if name == "pod dir is a symlink" {
				req.VolumeContext[AttrPodUID] = filepath.Base(linkedPod)
			}
			err := n.publish(req)
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), "target_path") {
				t.Fatalf("publish to %s: %v", target, err)
			}
		})
	}
	if mps, _ := tmpfs.MountsUnder(filepath.Dir(n.kubeletDir)); len(mps) != 0 {
		t.Fatalf("mounted %v", mps)
	}
	if entries, _ := os.ReadDir(victim); len(entries) != 1 {
		t.Fatalf("the victim directory holds %v", entries)
	}

	// Unpublish checks the same way: a symlinked path to another pod's published volume is refused
	// and that volume keeps its files.
	if err := n.publish(n.publishReq(podB, otherPod, twoSecrets)); err != nil {
		t.Fatal(err)
	}
	for _, target := range []string{filepath.Join(linkedPod, "volumes/kubernetes.io~csi/secrets/mount"), filepath.Join(victim, "mount")} {
		if err := n.unpublish("vol-x", target); status.Code(err) != codes.InvalidArgument {
			t.Fatalf("unpublish through %s: %v", target, err)
		}
	}
	if files, err := tmpfs.Read(otherPod); err != nil || len(files) != 2 {
		t.Fatalf("the other pod's volume after a refused unpublish: %v %v", files, err)
	}
	if n.b.refusals() < 11 {
		t.Fatalf("%d refusals audited, want one per refused request", n.b.refusals())
	}
}

// Files are never writable, whatever the attributes ask, and the values handed to the server are
// zeroed (the bytes, not just the slices) once written.
func TestFilesAreReadOnlyAndValuesZeroed(t *testing.T) {
	n := newNode(t)
	target := n.target(podA, "secrets")
	if err := n.publish(n.publishReq(podA, target, twoSecrets)); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]os.FileMode{"db-password": 0o400, "ca.crt": 0o444} {
		st, err := os.Stat(filepath.Join(target, name))
		if err != nil || st.Mode().Perm() != want || st.Mode().Perm()&0o222 != 0 {
			t.Fatalf("%s: %v %v", name, st.Mode(), err)
		}
	}
	err := n.publish(n.publishReq(podA, n.target(podA, "w"), "- {ref: a/b, key: k, file: f, mode: \"0644\"}"))
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("a writable mode: %v", err)
	}
	n.b.mu.Lock()
	defer n.b.mu.Unlock()
	for _, v := range n.b.returned {
		if !bytes.Equal(v, make([]byte, len(v))) {
			t.Fatalf("a value was not zeroed after the publish: %q", v)
		}
	}
}

// A huge sparse file or a FIFO planted in a published volume (as a root pod could in a writable
// one) neither crashes nor blocks the driver: republish and unpublish complete.
func TestPlantedSparseFileAndFIFODoNotStopTheDriver(t *testing.T) {
	for name, plant := range map[string]func(payload string) error{
		"1 TiB sparse file": func(p string) error { return os.Truncate(filepath.Join(p, "db-password"), 1<<40) },
		"FIFO": func(p string) error {
			os.Remove(filepath.Join(p, "db-password"))
			return unix.Mkfifo(filepath.Join(p, "db-password"), 0o644)
		},
		"link to /dev/zero": func(p string) error {
			os.Remove(filepath.Join(p, "db-password"))
			return os.Symlink("/dev/zero", filepath.Join(p, "db-password"))
		},
	} {
		t.Run(name, func(t *testing.T) {
			n := newNode(t)
			target, req := n.published(t)
			payload, _ := os.Readlink(filepath.Join(target, "..data"))
			if err := plant(filepath.Join(target, payload)); err != nil {
				t.Fatal(err)
			}
			for i := range 2 {
				if err := n.publish(req); err != nil {
					t.Fatalf("republish %d: %v", i, err)
				}
			}
			if got, err := os.ReadFile(filepath.Join(target, "db-password")); err != nil || string(got) != "CANARY-payments/db" {
				t.Fatalf("after republish: %q %v", got, err)
			}
			if err := n.unpublish(req.VolumeId, target); err != nil {
				t.Fatalf("unpublish: %v", err)
			}
			if _, err := os.Stat(target); !os.IsNotExist(err) {
				t.Fatal("the target is still there")
			}
		})
	}
}

// A pod holding a lease on a delivered file cannot stall the driver: an unchanged republish opens
// nothing in the volume (the driver remembers what it delivered), and swaps that must remove the
// leased file's payload go on at once.
func TestALeaseOnADeliveredFileDoesNotStallTheDriver(t *testing.T) {
	n := newNode(t)
	target, req := n.published(t)
	payload, _ := os.Readlink(filepath.Join(target, "..data"))
	f, err := os.Open(filepath.Join(target, payload, "db-password"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := unix.FcntlInt(f.Fd(), unix.F_SETLEASE, unix.F_WRLCK); err != nil {
		t.Fatalf("taking a lease: %v", err)
	}
	harness.Within(t, 15*time.Second, "the driver waited for a pod's lease", func() error {
		if err := n.publish(req); err != nil {
			return fmt.Errorf("unchanged republish: %w", err)
		}
		if again, _ := os.Readlink(filepath.Join(target, "..data")); again != payload {
			return fmt.Errorf("an unchanged republish swapped the files")
		}
		for i := range 2 {
			n.b.set(fmt.Sprintf("ROTATED-%d", i), nil)
			if err := n.publish(req); err != nil {
				return fmt.Errorf("republish %d: %w", i, err)
			}
		}
		return nil
	})
	f.Close()
	if got, _ := os.ReadFile(filepath.Join(target, "db-password")); string(got) != "ROTATED-1-payments/db" {
		t.Fatalf("after the rotations the file holds %q", got)
	}
	if err := n.unpublish(req.VolumeId, target); err != nil {
		t.Fatal(err)
	}
}

// A republish clears the files only when access is withdrawn for certain; a backend down, Vault
// refusing or a token rejected for a pod that still exists keeps them (kubelet retries).
func TestRepublishClearsOnlyOnACertainWithdrawal(t *testing.T) {
	for _, tc := range []struct {
		name  string
		err   error
		clear bool
		code  codes.Code
	}{
		{"vault down", fmt.Errorf("vault read: 503: %w", fault.ErrUnavailable), false, codes.Unavailable},
		{"vault refuses the read", fmt.Errorf("vault read: 403: %w", fault.ErrDenied), false, codes.PermissionDenied},
		{"token rejected, pod still there", fmt.Errorf("token rejected: %w", fault.ErrUnauthenticated), false, codes.Unauthenticated},
		{"deadline", context.DeadlineExceeded, false, codes.DeadlineExceeded},
		{"grant removed", fault.Withdrawn(fmt.Errorf("no grant: %w", fault.ErrDenied)), true, codes.PermissionDenied},
		{"pod deleted", fault.Withdrawn(fmt.Errorf("token rejected; pod gone: %w", fault.ErrUnauthenticated)), true, codes.Unauthenticated},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newNode(t)
			target, req := n.published(t)
			n.b.set("CANARY", tc.err)
			if err := n.publish(req); status.Code(err) != tc.code {
				t.Fatalf("republish: %v, want %s", err, tc.code)
			}
			files, err := tmpfs.Read(target)
			if err != nil || (len(files) == 0) != tc.clear {
				t.Fatalf("after the refused republish: %d files (%v), want cleared %v", len(files), err, tc.clear)
			}
		})
	}
}

// Publishes are bounded by count and by the bytes of their volumes; the ones over the bound wait, and
// give up with ResourceExhausted at their deadline.
func TestConcurrentPublishesAreBounded(t *testing.T) {
	n := newNode(t, func(o *Options) { o.MaxConcurrentPublishes = 3; o.MaxPublishBytes = 2 * MaxWeight })
	n.b.block = make(chan struct{})
	var wg sync.WaitGroup
	errs := make([]error, 6)
	for i := range 6 {
		pod := fmt.Sprintf("0b9e3c4e-8f1a-4d2b-9c3e-5a6b7c8d9e%02d", i)
		req := n.publishReq(pod, n.target(pod, "secrets"), twoSecrets)
		req.VolumeContext[AttrSizeLimit] = fmt.Sprint(MaxSizeLimit)
		wg.Go(func() { errs[i] = n.publish(req) })
	}
	deadline := time.Now().Add(10 * time.Second)
	for n.b.inside.Load() < 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond) // a third publish would be inside by now if it could
	if in := n.b.inside.Load(); in != 2 {
		t.Fatalf("%d publishes of 16 MiB volumes inside at once, want 2 (the bytes bound)", in)
	}
	if w := n.s.Limiter().Waits(); w < 4 {
		t.Fatalf("%d publishes waited, want 4", w)
	}
	close(n.b.block)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
	}
	if m := n.b.maxIn.Load(); m > 2 {
		t.Fatalf("%d publishes were inside at once", m)
	}

	// Small volumes: the count bound.
	n2 := newNode(t, func(o *Options) { o.MaxConcurrentPublishes = 3 })
	n2.b.block = make(chan struct{})
	req := n2.publishReq(podA, n2.target(podA, "secrets"), twoSecrets)
	for i := range 5 {
		pod := fmt.Sprintf("0b9e3c4e-8f1a-4d2b-9c3e-5a6b7c8d9f%02d", i)
		r := n2.publishReq(pod, n2.target(pod, "secrets"), twoSecrets)
		wg.Go(func() { n2.publish(r) })
	}
	for n2.b.inside.Load() < 3 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	_, err := n2.s.NodePublishVolume(ctx, req)
	cancel()
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("a publish that found no slot before its deadline: %v", err)
	}
	close(n2.b.block)
	wg.Wait()
	if m := n2.b.maxIn.Load(); m != 3 {
		t.Fatalf("at most %d publishes were inside at once, want 3", m)
	}
}
