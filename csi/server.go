package csi

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/csi/podevents"
	"github.com/keyward/keyward/csi/tmpfs"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/internal/grpcserver"
)

// DriverName is the CSI driver's name (the CSIDriver object's name).
const DriverName = "secrets.keyward.dev"

// Broker is what the node and provider servers need of the broker (broker.Service): fetching, the
// audit of refusals that happen before a fetch, and releasing a pod's credentials.
type Broker interface {
	Fetch(ctx context.Context, req broker.Request) ([]broker.Secret, error)
	// Refuse audits a request refused before it could reach Fetch (rate-limited per pod).
	Refuse(ctx context.Context, req broker.Request, err error) error
	// Release forgets, at once, the credentials held for a pod whose last volume went (or whose
	// access was revoked) and returns the function that revokes them at Vault (nil if none): a pod's
	// Vault token must not outlive its volumes.
	Release(podUID string) (revoke func(context.Context) error)
	// ReleaseVolume forgets, at once, the dynamic credentials issued for a volume that holds no files
	// (unpublished, withdrawn, or a first publish that failed) and returns the function that revokes
	// their leases (nil if none).
	ReleaseVolume(volumeID string) (revoke func(context.Context) error)
}

// DefaultKubeletDir is kubelet's default --root-dir.
const DefaultKubeletDir = "/var/lib/kubelet"

// Options configure NewServer.
type Options struct {
	NodeID  string
	Version string
	Broker  Broker
	// Auditor records unpublishes (publishes are audited by the broker).
	Auditor audit.Auditor
	// Mounter mounts and opens volumes (default: tmpfs on this node).
	Mounter Mounter
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
	// Observer, if set, is told how each NodePublishVolume ended (for metrics).
	Observer Observer
	// Events, if set, is told of each republish that swapped in changed secrets and of each refused
	// publish, to post Events on the pod. It must not block (podevents.Recorder queues).
	Events Events
	Log    *zap.Logger
}

// Events is told what a pod should see on its own events (podevents.Recorder).
type Events interface {
	// Rotated: the pod's volume swapped in changed secrets; ..version is now version.
	Rotated(pod podevents.Pod, version uint64, changes []podevents.Change)
	// Denied: a publish of the pod's volume was refused; reason is the status message kubelet got.
	Denied(pod podevents.Pod, reason string)
}

var _ Events = (*podevents.Recorder)(nil)

// Observer is told how each NodePublishVolume ended. It must not block.
type Observer interface {
	Published(p Publish)
}

// Publish is how one NodePublishVolume ended.
type Publish struct {
	Result PublishResult
	// Code is the gRPC code kubelet was answered with ("OK" on success).
	Code     string
	Duration time.Duration
}

// PublishResult is what a NodePublishVolume did.
type PublishResult string

// The results of a publish.
const (
	// ResultPublished: a first publish mounted the volume and wrote the pod's files.
	ResultPublished PublishResult = "published"
	// ResultRepublished: a republish kept the files or swapped in changed ones.
	ResultRepublished PublishResult = "republished"
	// ResultWithdrawn: a republish found the pod's access withdrawn and cleared its files.
	ResultWithdrawn PublishResult = "withdrawn"
	// ResultRefused: the request was refused (the pod, its token, its attributes or the policy);
	// a republish's files were kept.
	ResultRefused PublishResult = "refused"
	// ResultFailed: the broker could not serve the request (Vault, the apiserver, the audit log,
	// the mount, the bounds); kubelet retries; a republish's files were kept.
	ResultFailed PublishResult = "failed"
)

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
	// counted is each published volume's ..version count, kept while its files are cleared (a
	// withdrawal) so that a later swap counts on; dropped at unpublish.
	counted map[string]uint64
	// live is whom each delivered volume's files are for, and when (LiveVolumes; live.go).
	live      map[string]livePod
	digestKey [32]byte
}

type delivery struct {
	payload string
	digest  [32]byte
	// environment the files were read from (broker.Secret.Environment): a republish after the pod's
	// namespace moved to another environment withdraws them (broker.Request.Environment).
	environment string
	// version is the ..version in force, versionFile its file (for Intact).
	version     VersionDoc
	versionFile tmpfs.File
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
	if o.Mounter == nil {
		o.Mounter = nodeMounter{}
	}
	if o.Credentials == nil {
		o.Credentials = NewPodCredentials(o.Broker, o.Log)
	}
	srv := &Server{o: o, locks: map[string]*volumeLock{}, delivered: map[string]delivery{}, counted: map[string]uint64{}}
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

// Volumes is how many volumes hold a pod's files, as far as this process knows: those it published
// and those it republished since it started (a restarted driver learns the others at their next
// republish).
func (s *Server) Volumes() int { return s.o.Credentials.volumes() }

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

// refuse audits a refusal that happened before the broker's Fetch and returns its status.
func (s *Server) refuse(ctx context.Context, req broker.Request, err error) error {
	if aerr := s.o.Broker.Refuse(ctx, req, err); aerr != nil {
		s.o.Log.Error("audit record for a refused request not written", zap.Error(aerr))
	}
	return grpcserver.Status(err)
}

// claimedPod is who the attributes say the pod is, for the audit record of a refusal; parsed or not.
func claimedPod(attrs map[string]string) broker.Identity {
	return broker.Identity{Namespace: attrs[AttrPodNamespace], PodName: attrs[AttrPodName], PodUID: attrs[AttrPodUID], ServiceAccount: attrs[AttrSAName]}
}

// WaitReleases waits for background revocations to finish.
func (s *Server) WaitReleases() { s.o.Credentials.Wait() }

func nonce() string {
	b := make([]byte, 6)
	rand.Read(b)
	return hex.EncodeToString(b)
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
