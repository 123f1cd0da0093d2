package csi

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
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
	// Release forgets, at once, the credentials held for a pod whose last volume went (or whose
	// access was revoked) and returns the function that revokes them at Vault (nil if none): a pod's
	// Vault token must not outlive its volumes.
	Release(podUID string) (revoke func(context.Context) error)
}

// Options configure NewServer.
type Options struct {
	NodeID  string
	Version string
	Broker  Fetcher
	// Auditor records unpublishes (publishes are audited by the broker).
	Auditor broker.Auditor
	// Audience of the token kubelet requests for the driver (the CSIDriver's tokenRequests).
	Audience string
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
	if o.Ready == nil {
		o.Ready = func() error { return nil }
	}
	if o.Credentials == nil {
		o.Credentials = NewPodCredentials(o.Broker, o.Log)
	}
	return &Server{o: o, locks: map[string]*volumeLock{}}, nil
}

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
// authorizes again: refused, it clears the files; allowed, it swaps them in only if they changed.
func (s *Server) NodePublishVolume(ctx context.Context, req *csipb.NodePublishVolumeRequest) (*csipb.NodePublishVolumeResponse, error) {
	target := req.GetTargetPath()
	switch {
	case req.GetVolumeId() == "":
		return nil, status.Error(codes.InvalidArgument, "volume_id is required")
	case target == "":
		return nil, status.Error(codes.InvalidArgument, "target_path is required")
	case req.GetVolumeCapability() == nil:
		return nil, status.Error(codes.InvalidArgument, "volume_capability is required")
	case req.GetVolumeCapability().GetBlock() != nil:
		return nil, status.Error(codes.InvalidArgument, "block volumes are not supported")
	}
	vol, err := ParseVolume(req.GetVolumeContext(), s.o.Audience)
	if err != nil {
		return nil, toStatus(err)
	}
	gid := -1
	if g := req.GetVolumeCapability().GetMount().GetVolumeMountGroup(); g != "" {
		n, err := strconv.Atoi(g)
		if err != nil || n < 0 {
			return nil, status.Errorf(codes.InvalidArgument, "volume_mount_group %q is not a group ID", g)
		}
		gid = n
	}
	unlock := s.lock(req.GetVolumeId())
	defer unlock()

	published := isPublished(target)
	podUID := vol.Claimed.PodUID
	s.o.Credentials.begin(podUID)
	holdsFiles := published // whether the volume holds the pod's files when this call ends
	defer func() { s.o.Credentials.end(req.GetVolumeId(), podUID, holdsFiles) }()
	secrets, err := s.o.Broker.Fetch(ctx, broker.Request{
		RequestID: req.GetVolumeId() + "/" + nonce(), Event: broker.EventMount,
		Token: vol.Token, Claimed: vol.Claimed, Refs: vol.Refs(),
	})
	if err != nil {
		if published && (errors.Is(err, broker.ErrDenied) || errors.Is(err, broker.ErrUnauthenticated)) {
			// Access was revoked (grant removed, pod deleted, token invalid): the files go now.
			if cerr := tmpfs.WriteAtomic(target, nil, gid); cerr != nil {
				s.o.Log.Error("clearing a revoked volume failed", zap.String("volume_id", req.GetVolumeId()), zap.Error(cerr))
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
			clear(f.Data)
		}
	}()
	if published {
		if current, err := tmpfs.Read(target); err == nil && sameFiles(current, files) {
			return &csipb.NodePublishVolumeResponse{}, nil
		}
		if err := tmpfs.WriteAtomic(target, files, gid); err != nil {
			return nil, status.Errorf(codes.Internal, "updating the files: %v", err)
		}
		return &csipb.NodePublishVolumeResponse{}, nil
	}
	if err := s.publish(target, vol.SizeLimit, files, gid); err != nil {
		return nil, status.Errorf(codes.Internal, "publishing: %v", err)
	}
	holdsFiles = true
	return &csipb.NodePublishVolumeResponse{}, nil
}

// WaitReleases waits for background revocations to finish.
func (s *Server) WaitReleases() { s.o.Credentials.Wait() }

// publish mounts and writes; on any failure it leaves no mount and no file behind.
func (s *Server) publish(target string, size int64, files []tmpfs.File, gid int) (err error) {
	created := false
	if _, statErr := os.Stat(target); os.IsNotExist(statErr) {
		if err := os.MkdirAll(target, 0o750); err != nil {
			return err
		}
		created = true
	}
	mounted := false
	defer func() {
		if err == nil {
			return
		}
		if mounted {
			if uerr := tmpfs.Unmount(target); uerr != nil {
				s.o.Log.Error("cleanup after a failed publish: unmount", zap.String("target", target), zap.Error(uerr))
			}
		}
		if created {
			os.Remove(target)
		}
	}()
	mode := os.FileMode(0o755)
	if gid >= 0 {
		mode = 0o750
	}
	if _, err := tmpfs.Mount(target, size, mode, gid); err != nil {
		return err
	}
	mounted = true
	return tmpfs.WriteAtomic(target, files, gid)
}

// NodeUnpublishVolume scrubs the files, unmounts the tmpfs and removes the directory. Idempotent.
func (s *Server) NodeUnpublishVolume(ctx context.Context, req *csipb.NodeUnpublishVolumeRequest) (*csipb.NodeUnpublishVolumeResponse, error) {
	if req.GetVolumeId() == "" || req.GetTargetPath() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume_id and target_path are required")
	}
	unlock := s.lock(req.GetVolumeId())
	defer unlock()
	start := time.Now()
	err := tmpfs.Unmount(req.GetTargetPath())
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

func isPublished(target string) bool {
	mp, err := tmpfs.IsMountPoint(target)
	if err != nil || !mp {
		return false
	}
	ok, err := tmpfs.IsTmpfs(target)
	return err == nil && ok
}

func sameFiles(a, b []tmpfs.File) bool {
	if len(a) != len(b) {
		return false
	}
	byName := map[string]tmpfs.File{}
	for _, f := range a {
		byName[f.Name] = f
	}
	for _, f := range b {
		g, ok := byName[f.Name]
		if !ok || g.Mode != f.Mode || !bytes.Equal(g.Data, f.Data) {
			return false
		}
	}
	return true
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
