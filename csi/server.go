package csi

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/csi/tmpfs"
	"github.com/keyward/keyward/internal/grpcserver"
)

// DriverName is the CSI driver's name (the CSIDriver object's name).
const DriverName = "secrets.keyward.dev"

// Fetcher is what the node server needs of the broker (broker.Service).
type Fetcher interface {
	Fetch(ctx context.Context, req broker.Request) ([]broker.Secret, error)
	// Refuse audits a request refused before it could reach Fetch (rate-limited per pod).
	Refuse(ctx context.Context, req broker.Request, err error) error
	// Release forgets, at once, the credentials held for a pod whose last volume went (or whose
	// access was revoked) and returns the function that revokes them at Vault (nil if none): a pod's
	// Vault token must not outlive its volumes.
	Release(podUID string) (revoke func(context.Context) error)
}

// DefaultKubeletDir is kubelet's default --root-dir.
const DefaultKubeletDir = "/var/lib/kubelet"

// Options configure NewServer.
type Options struct {
	NodeID  string
	Version string
	Broker  Fetcher
	// Auditor records unpublishes (publishes are audited by the broker).
	Auditor broker.Auditor
	// Audience of the token kubelet requests for the driver (the CSIDriver's tokenRequests).
	Audience string
	// KubeletDir is kubelet's root directory (default /var/lib/kubelet): every target path must be
	// kubelet's path of a CSI volume below it.
	KubeletDir string
	// MaxConcurrentPublishes bounds the publishes handled at once (default 16); MaxPublishBytes bounds
	// the sum of their volumes' size limits (default 32 MiB), which bounds the memory their secrets
	// take. Others wait for a slot (until their deadline). Limiter, if set, is used instead: share one
	// between the node and provider servers of a process.
	MaxConcurrentPublishes int
	MaxPublishBytes        int64
	Limiter                *PublishLimiter
	// AllowSwap mounts volumes without noswap when the kernel lacks it (see tmpfs.Mount).
	AllowSwap bool
	// Credentials tracks pods' volumes and fetches to release their credentials; share one between
	// the node and provider servers of a process (NewServer makes one if nil).
	Credentials *PodCredentials
	// Ready reports whether the broker can decide (informers synced, policy loaded); Probe uses it.
	Ready func() error
	Log   *zap.Logger
}

// Server is the CSI Identity and Node service: request -> broker call -> files in a tmpfs.
type Server struct {
	csipb.UnimplementedIdentityServer
	csipb.UnimplementedNodeServer
	csipb.UnimplementedControllerServer
	o     Options
	mu    sync.Mutex
	locks map[string]*volumeLock
	// delivered remembers, per volume, the payload the driver swapped in last and a keyed digest of
	// its files, so an unchanged republish is known without reading anything in the volume (a pod
	// holding a lease on a file cannot stall it). Lost at a restart: the first republish then swaps.
	deliveredMu sync.Mutex
	delivered   map[string]delivery
	digestKey   [32]byte
}

type delivery struct {
	payload string
	digest  [32]byte
}

type volumeLock struct {
	sync.Mutex
	refs int
}

// NewServer checks the options.
func NewServer(o Options) (*Server, error) {
	if o.NodeID == "" || o.Broker == nil || o.Auditor == nil || o.Log == nil || o.Audience == "" {
		return nil, errors.New("csi: NodeID, Broker, Auditor, Audience and Log are required")
	}
	if o.KubeletDir == "" {
		o.KubeletDir = DefaultKubeletDir
	}
	if !filepath.IsAbs(o.KubeletDir) || filepath.Clean(o.KubeletDir) != o.KubeletDir {
		return nil, fmt.Errorf("csi: kubelet directory %q must be absolute and clean", o.KubeletDir)
	}
	if err := o.limits(); err != nil {
		return nil, err
	}
	if o.Ready == nil {
		o.Ready = func() error { return nil }
	}
	if o.Credentials == nil {
		o.Credentials = NewPodCredentials(o.Broker, o.Log)
	}
	srv := &Server{o: o, locks: map[string]*volumeLock{}, delivered: map[string]delivery{}}
	if _, err := rand.Read(srv.digestKey[:]); err != nil {
		return nil, err
	}
	return srv, nil
}

// limits sets the Limiter from the bounds (or their defaults) unless one is given.
func (o *Options) limits() error {
	if o.Limiter != nil {
		return nil
	}
	if o.MaxConcurrentPublishes <= 0 {
		o.MaxConcurrentPublishes = 16
	}
	if o.MaxPublishBytes <= 0 {
		o.MaxPublishBytes = 32 << 20
	}
	if o.MaxPublishBytes < MaxWeight {
		return fmt.Errorf("csi: the publish memory bound %d must hold at least one publish of the largest volume, %d", o.MaxPublishBytes, MaxWeight)
	}
	o.Limiter = NewPublishLimiter(o.MaxConcurrentPublishes, o.MaxPublishBytes)
	return nil
}

// Limiter is the server's publish limiter (for metrics).
func (s *Server) Limiter() *PublishLimiter { return s.o.Limiter }

// Register registers the Identity and Node services, and a Controller service that only answers
// ControllerGetCapabilities with none (ephemeral volumes have no controller side; tools such as
// csi-sanity ask).
func (s *Server) Register(g *grpc.Server) {
	csipb.RegisterIdentityServer(g, s)
	csipb.RegisterNodeServer(g, s)
	csipb.RegisterControllerServer(g, s)
}

// ControllerGetCapabilities: none.
func (s *Server) ControllerGetCapabilities(context.Context, *csipb.ControllerGetCapabilitiesRequest) (*csipb.ControllerGetCapabilitiesResponse, error) {
	return &csipb.ControllerGetCapabilitiesResponse{}, nil
}

// GetPluginInfo implements CSI.
func (s *Server) GetPluginInfo(context.Context, *csipb.GetPluginInfoRequest) (*csipb.GetPluginInfoResponse, error) {
	return &csipb.GetPluginInfoResponse{Name: DriverName, VendorVersion: s.o.Version}, nil
}

// GetPluginCapabilities implements CSI: a node-only driver (no controller service).
func (s *Server) GetPluginCapabilities(context.Context, *csipb.GetPluginCapabilitiesRequest) (*csipb.GetPluginCapabilitiesResponse, error) {
	return &csipb.GetPluginCapabilitiesResponse{}, nil
}

// Probe reports ready only when the broker can decide.
func (s *Server) Probe(context.Context, *csipb.ProbeRequest) (*csipb.ProbeResponse, error) {
	if err := s.o.Ready(); err != nil {
		s.o.Log.Info("probe: not ready", zap.Error(err))
		return &csipb.ProbeResponse{Ready: wrapperspb.Bool(false)}, nil
	}
	return &csipb.ProbeResponse{Ready: wrapperspb.Bool(true)}, nil
}

// NodeGetInfo implements CSI.
func (s *Server) NodeGetInfo(context.Context, *csipb.NodeGetInfoRequest) (*csipb.NodeGetInfoResponse, error) {
	return &csipb.NodeGetInfoResponse{NodeId: s.o.NodeID}, nil
}

// NodeGetCapabilities: VOLUME_MOUNT_GROUP, so kubelet passes the pod's fsGroup.
func (s *Server) NodeGetCapabilities(context.Context, *csipb.NodeGetCapabilitiesRequest) (*csipb.NodeGetCapabilitiesResponse, error) {
	return &csipb.NodeGetCapabilitiesResponse{Capabilities: []*csipb.NodeServiceCapability{{
		Type: &csipb.NodeServiceCapability_Rpc{Rpc: &csipb.NodeServiceCapability_RPC{Type: csipb.NodeServiceCapability_RPC_VOLUME_MOUNT_GROUP}},
	}}}, nil
}

func (s *Server) lock(volumeID string) func() {
	s.mu.Lock()
	l := s.locks[volumeID]
	if l == nil {
		l = &volumeLock{}
		s.locks[volumeID] = l
	}
	l.refs++
	s.mu.Unlock()
	l.Lock()
	return func() {
		l.Unlock()
		s.mu.Lock()
		if l.refs--; l.refs == 0 {
			delete(s.locks, volumeID)
		}
		s.mu.Unlock()
	}
}

// NodePublishVolume mounts a tmpfs at the target path and writes the pod's secrets into it. Called
// again for a published volume (requiresRepublish, with a fresh token), it authenticates and
// authorizes again: if access is withdrawn for certain (the policy denies it, or the pod is gone) it
// clears the files; any other failure keeps them, and kubelet retries; allowed, it swaps the files
// in only if they changed. Every refusal is audited, whatever stage refused it.
func (s *Server) NodePublishVolume(ctx context.Context, req *csipb.NodePublishVolumeRequest) (*csipb.NodePublishVolumeResponse, error) {
	breq := broker.Request{RequestID: req.GetVolumeId() + "/" + nonce(), Event: broker.EventMount, Claimed: claimedPod(req.GetVolumeContext())}
	vol, gid, err := s.checkPublish(req)
	if err != nil {
		return nil, s.refuse(ctx, breq, err)
	}
	target := req.GetTargetPath()
	breq.Claimed, breq.Token, breq.Refs, breq.MaxBytes = vol.Claimed, vol.Token, vol.Refs(), vol.SizeLimit
	unlock := s.lock(req.GetVolumeId())
	defer unlock()
	release, err := s.o.Limiter.acquire(ctx, vol.Weight())
	if err != nil {
		return nil, s.refuse(ctx, breq, err)
	}
	defer release()

	published, err := tmpfs.Published(target)
	if err != nil {
		return nil, s.refuse(ctx, breq, fmt.Errorf("inspecting the target: %v: %w", err, broker.ErrUnavailable))
	}
	breq.Published = published
	podUID := vol.Claimed.PodUID
	s.o.Credentials.begin(podUID)
	holdsFiles := published // whether the volume holds the pod's files when this call ends
	defer func() { s.o.Credentials.end(req.GetVolumeId(), podUID, holdsFiles) }()
	secrets, err := s.o.Broker.Fetch(ctx, breq)
	if err != nil {
		if published && errors.Is(err, broker.ErrWithdrawn) {
			// Access was withdrawn (grant removed, pod deleted): the files go now.
			if cerr := s.clear(req.GetVolumeId(), target, vol.SizeLimit); cerr != nil {
				s.o.Log.Error("clearing a withdrawn volume failed", zap.String("volume_id", req.GetVolumeId()), zap.Error(cerr))
			} else {
				holdsFiles = false
			}
		}
		return nil, toStatus(err)
	}
	files := make([]tmpfs.File, len(secrets))
	for i, sec := range secrets {
		mode := vol.Modes[i]
		if gid >= 0 && vol.Entries[i].Mode == "" {
			mode |= 0o040 // the pod's fsGroup reads the default-mode files
		}
		files[i] = tmpfs.File{Name: vol.Entries[i].File, Mode: mode, Data: sec.Value}
	}
	defer func() {
		for _, f := range files {
			clear(f.Data) // the bytes, not just the slices: nothing of the values is left for the GC
		}
	}()
	if published {
		if err := s.update(req.GetVolumeId(), target, vol.SizeLimit, files, gid); err != nil {
			return nil, status.Errorf(codes.Internal, "updating the files: %v", err)
		}
		return &csipb.NodePublishVolumeResponse{}, nil
	}
	if err := s.publish(req.GetVolumeId(), target, vol.SizeLimit, files, gid); err != nil {
		return nil, status.Errorf(codes.Internal, "publishing: %v", err)
	}
	holdsFiles = true
	return &csipb.NodePublishVolumeResponse{}, nil
}

// checkPublish validates a publish request before anything is fetched or mounted.
func (s *Server) checkPublish(req *csipb.NodePublishVolumeRequest) (Volume, int, error) {
	switch {
	case req.GetVolumeId() == "":
		return Volume{}, 0, fmt.Errorf("volume_id is required: %w", broker.ErrInvalid)
	case req.GetTargetPath() == "":
		return Volume{}, 0, fmt.Errorf("target_path is required: %w", broker.ErrInvalid)
	case req.GetVolumeCapability() == nil:
		return Volume{}, 0, fmt.Errorf("volume_capability is required: %w", broker.ErrInvalid)
	case req.GetVolumeCapability().GetBlock() != nil:
		return Volume{}, 0, fmt.Errorf("block volumes are not supported: %w", broker.ErrInvalid)
	case !req.GetReadonly():
		return Volume{}, 0, fmt.Errorf("the volume must be read-only: set readOnly: true on the CSI volume in the pod spec (a writable volume would let the pod change what the driver reads back): %w", broker.ErrInvalid)
	}
	vol, err := ParseVolume(req.GetVolumeContext(), s.o.Audience)
	if err != nil {
		return Volume{}, 0, err
	}
	if err := CheckTarget(s.o.KubeletDir, req.GetTargetPath(), vol.Claimed.PodUID); err != nil {
		return Volume{}, 0, err
	}
	gid := -1
	if g := req.GetVolumeCapability().GetMount().GetVolumeMountGroup(); g != "" {
		n, err := strconv.Atoi(g)
		if err != nil || n < 0 {
			return Volume{}, 0, fmt.Errorf("volume_mount_group %q is not a group ID: %w", g, broker.ErrInvalid)
		}
		gid = n
	}
	return vol, gid, nil
}

// refuse audits a refusal that happened before the broker's Fetch and returns its status.
func (s *Server) refuse(ctx context.Context, req broker.Request, err error) error {
	if aerr := s.o.Broker.Refuse(ctx, req, err); aerr != nil {
		s.o.Log.Error("audit record for a refused request not written", zap.Error(aerr))
	}
	return toStatus(err)
}

// claimedPod is who the attributes say the pod is, for the audit record of a refusal; parsed or not.
func claimedPod(attrs map[string]string) broker.Identity {
	return broker.Identity{Namespace: attrs[AttrPodNamespace], PodName: attrs[AttrPodName], PodUID: attrs[AttrPodUID], ServiceAccount: attrs[AttrSAName]}
}

// WaitReleases waits for background revocations to finish.
func (s *Server) WaitReleases() { s.o.Credentials.Wait() }

func dirMode(gid int) os.FileMode {
	if gid >= 0 {
		return 0o750
	}
	return 0o755
}

// digest is a keyed hash of a set of files (names, modes, group, contents): equal digests, equal
// sets. The key is random per process, so the digest says nothing about the values.
func (s *Server) digest(files []tmpfs.File, gid int) [32]byte {
	h := hmac.New(sha256.New, s.digestKey[:])
	var n [8]byte
	put := func(b []byte) {
		binary.BigEndian.PutUint64(n[:], uint64(len(b)))
		h.Write(n[:])
		h.Write(b)
	}
	put([]byte(strconv.Itoa(gid)))
	for _, f := range files {
		put([]byte(f.Name))
		put([]byte(strconv.FormatUint(uint64(f.Mode), 8)))
		put(f.Data)
	}
	var out [32]byte
	copy(out[:], h.Sum(nil))
	return out
}

// swapped records what a volume delivers after a swap.
func (s *Server) swapped(volumeID string, v *tmpfs.Volume, sum [32]byte) {
	payload, _ := v.Current()
	s.deliveredMu.Lock()
	s.delivered[volumeID] = delivery{payload: payload, digest: sum}
	s.deliveredMu.Unlock()
}

func (s *Server) forget(volumeID string) {
	s.deliveredMu.Lock()
	delete(s.delivered, volumeID)
	s.deliveredMu.Unlock()
}

// update swaps new files into a published volume, unless it already delivers exactly them: the
// payload in force is the one this process swapped in, with the same digest, and its layout is
// intact (metadata only: nothing in the volume is opened).
func (s *Server) update(volumeID, target string, limit int64, files []tmpfs.File, gid int) error {
	v, err := tmpfs.Open(target, limit)
	if err != nil {
		return err
	}
	defer v.Close()
	sum := s.digest(files, gid)
	s.deliveredMu.Lock()
	d, known := s.delivered[volumeID]
	s.deliveredMu.Unlock()
	if cur, ok := v.Current(); known && ok && cur == d.payload && d.digest == sum && v.Intact(files, gid) {
		return nil
	}
	if err := v.Swap(files, gid, dirMode(gid)); errors.Is(err, tmpfs.ErrScrub) {
		s.o.Log.Warn("republish: the new files are in force; an old file could not be overwritten first", zap.String("volume_id", volumeID), zap.Error(err))
	} else if err != nil {
		s.forget(volumeID)
		return err
	}
	s.swapped(volumeID, v, sum)
	return nil
}

// clear removes a published volume's files.
func (s *Server) clear(volumeID, target string, limit int64) error {
	s.forget(volumeID)
	v, err := tmpfs.Open(target, limit)
	if err != nil {
		return err
	}
	defer v.Close()
	if err := v.Clear(); errors.Is(err, tmpfs.ErrScrub) {
		s.o.Log.Warn("clearing: the files are gone; an old file could not be overwritten first", zap.String("volume_id", volumeID), zap.Error(err))
	} else if err != nil {
		return err
	}
	return nil
}

// publish mounts and writes; on any failure it leaves no mount and no file behind.
func (s *Server) publish(volumeID, target string, size int64, files []tmpfs.File, gid int) (err error) {
	created := false
	if err := os.Mkdir(target, 0o750); err == nil {
		created = true
	} else if !errors.Is(err, os.ErrExist) {
		return err
	}
	mounted := false
	defer func() {
		if err == nil {
			return
		}
		if mounted {
			if _, uerr := tmpfs.Unmount(target, size); uerr != nil {
				s.o.Log.Error("cleanup after a failed publish: unmount", zap.String("target", target), zap.Error(uerr))
			}
		}
		if created {
			os.Remove(target)
		}
	}()
	if _, err := tmpfs.Mount(target, tmpfs.MountOptions{Size: tmpfs.SizeFor(size, len(files)), Mode: dirMode(gid), GID: gid, AllowSwap: s.o.AllowSwap}); err != nil {
		return err
	}
	mounted = true
	v, err := tmpfs.Open(target, size)
	if err != nil {
		return err
	}
	defer v.Close()
	if err := v.Swap(files, gid, dirMode(gid)); err != nil {
		return err
	}
	s.swapped(volumeID, v, s.digest(files, gid))
	return nil
}

// NodeUnpublishVolume scrubs the files, unmounts the tmpfs and removes the directory. Idempotent. The
// target path is checked as for a publish before anything is touched.
func (s *Server) NodeUnpublishVolume(ctx context.Context, req *csipb.NodeUnpublishVolumeRequest) (*csipb.NodeUnpublishVolumeResponse, error) {
	breq := broker.Request{RequestID: req.GetVolumeId(), Event: broker.EventUnmount}
	switch {
	case req.GetVolumeId() == "" || req.GetTargetPath() == "":
		return nil, s.refuse(ctx, breq, fmt.Errorf("volume_id and target_path are required: %w", broker.ErrInvalid))
	}
	if err := CheckTarget(s.o.KubeletDir, req.GetTargetPath(), ""); err != nil {
		return nil, s.refuse(ctx, breq, err)
	}
	unlock := s.lock(req.GetVolumeId())
	defer unlock()
	s.forget(req.GetVolumeId())
	start := time.Now()
	scrubErr, err := tmpfs.Unmount(req.GetTargetPath(), MaxSizeLimit)
	if scrubErr != nil {
		s.o.Log.Warn("unpublish: the volume held objects the driver did not make; unmounted anyway", zap.String("volume_id", req.GetVolumeId()), zap.Error(scrubErr))
	}
	if err == nil {
		if rerr := os.Remove(req.GetTargetPath()); rerr != nil && !os.IsNotExist(rerr) {
			err = rerr
		}
	}
	ev := broker.Event{Time: start, RequestID: req.GetVolumeId(), Type: broker.EventUnmount, Decision: broker.Allow,
		Reason: "unpublished " + req.GetTargetPath(), Code: "OK", Latency: time.Since(start)}
	if err != nil {
		ev.Decision, ev.Reason, ev.Code = broker.Error, err.Error(), "Internal"
	}
	if aerr := s.o.Auditor.Record(ctx, ev); aerr != nil {
		s.o.Log.Error("audit record for an unpublish not written", zap.Error(aerr))
	}
	if err != nil {
		return nil, status.Errorf(codes.Internal, "unpublishing: %v", err)
	}
	s.o.Credentials.unpublished(req.GetVolumeId(), req.GetTargetPath())
	return &csipb.NodeUnpublishVolumeResponse{}, nil
}

func nonce() string {
	b := make([]byte, 6)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// toStatus maps broker errors to gRPC codes for the CSI adapter, with the same mapping the broker
// uses for its audit records (broker.CodeName), so what kubelet sees and what is audited agree.
func toStatus(err error) error {
	return status.Error(grpcserver.CodeFromName(broker.CodeName(err)), err.Error())
}

// Describe is the CSI adapter's grpcserver.Describer: what of a request may be logged. The token
// attribute and any secret are never among it.
func Describe(req any) []zap.Field {
	switch r := req.(type) {
	case *csipb.NodePublishVolumeRequest:
		vc := r.GetVolumeContext()
		return []zap.Field{zap.String("volume_id", r.GetVolumeId()), zap.String("target_path", r.GetTargetPath()),
			zap.String("pod", vc[AttrPodNamespace]+"/"+vc[AttrPodName]), zap.String("pod_uid", vc[AttrPodUID]),
			zap.Bool("token_present", vc[AttrTokens] != ""), zap.Int("secrets_attr_bytes", len(vc[AttrSecrets]))}
	case *csipb.NodeUnpublishVolumeRequest:
		return []zap.Field{zap.String("volume_id", r.GetVolumeId()), zap.String("target_path", r.GetTargetPath())}
	}
	return nil
}
