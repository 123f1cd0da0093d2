package apiserver

import (
	"context"
	"sort"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	adminv1 "github.com/keyward/keyward/proto/keyward/admin/v1"
)

// Volume is a live volume as the Admin service shows it: who it is for and which versions it holds,
// never a value.
type Volume struct {
	ID                                                  string
	Namespace, Pod, PodUID, ServiceAccount, Environment string
	// Refs maps each delivered "ref#key" to the Vault version it was read at.
	Refs          map[string]int
	Version       uint64
	Since, LastAt time.Time
	// Leases are the volume's dynamic credentials in use.
	Leases []Lease
}

// Lease is a dynamic credential's lease: its name, a hash of its ID (never the ID), TTL, end, and a
// certificate's serial.
type Lease struct {
	Name, SHA256, Serial string
	TTL                  time.Duration
	Expires              time.Time
}

// VaultToken is a cached Vault token as the Admin service shows it: a hash of its accessor, never
// the token or the accessor.
type VaultToken struct {
	AccessorSHA256                               string
	Namespace, ServiceAccount, Role, Environment string
	Issued                                       time.Time
	TTL                                          time.Duration
	Renewable                                    bool
	Holders                                      int
}

// Check is one health check and why it fails (nil: ok).
type Check struct {
	Name string
	Err  error
}

// AdminOptions are the Admin service's sources; a nil source makes its RPC Unimplemented (keyward-kms
// has no volumes, Vault tokens or policy).
type AdminOptions struct {
	Node, Component, Version string
	Volumes                  func() []Volume
	// VaultTokens returns the Vault mode ("pod" or "broker") and the tokens held for pods.
	VaultTokens func() (string, []VaultToken)
	// Policy returns the policy's generation and hash.
	Policy func() (uint64, string)
	// Health returns every check; the daemon is healthy when none fails.
	Health func() []Check
}

// AdminServer is the read-only Admin service.
type AdminServer struct {
	adminv1.UnimplementedAdminServer
	o AdminOptions
}

// NewAdminServer returns the service over o's sources.
func NewAdminServer(o AdminOptions) *AdminServer { return &AdminServer{o: o} }

// Register registers the service.
func (s *AdminServer) Register(g *grpc.Server) { adminv1.RegisterAdminServer(g, s) }

// ListVolumes lists the live volumes, by namespace, pod and volume ID.
func (s *AdminServer) ListVolumes(_ context.Context, req *adminv1.ListVolumesRequest) (*adminv1.ListVolumesResponse, error) {
	if s.o.Volumes == nil {
		return nil, toStatus(errNotServed)
	}
	out := &adminv1.ListVolumesResponse{Node: s.o.Node}
	for _, v := range s.o.Volumes() {
		if req.GetNamespace() != "" && v.Namespace != req.GetNamespace() {
			continue
		}
		pv := &adminv1.Volume{VolumeId: v.ID, Namespace: v.Namespace, Pod: v.Pod, PodUid: v.PodUID, ServiceAccount: v.ServiceAccount,
			Environment: v.Environment, Version: v.Version, Since: ts(v.Since), LastDelivered: ts(v.LastAt)}
		for ref, ver := range v.Refs {
			pv.Refs = append(pv.Refs, &adminv1.RefVersion{Ref: ref, VaultVersion: int64(ver)})
		}
		sort.Slice(pv.Refs, func(i, j int) bool { return pv.Refs[i].Ref < pv.Refs[j].Ref })
		for _, l := range v.Leases {
			pv.Leases = append(pv.Leases, &adminv1.Lease{Name: l.Name, LeaseSha256: l.SHA256, Ttl: durationpb.New(l.TTL), Expires: ts(l.Expires), Serial: l.Serial})
		}
		sort.Slice(pv.Leases, func(i, j int) bool { return pv.Leases[i].Name < pv.Leases[j].Name })
		out.Volumes = append(out.Volumes, pv)
	}
	sort.Slice(out.Volumes, func(i, j int) bool {
		a, b := out.Volumes[i], out.Volumes[j]
		if a.Namespace+"/"+a.Pod != b.Namespace+"/"+b.Pod {
			return a.Namespace+"/"+a.Pod < b.Namespace+"/"+b.Pod
		}
		return a.VolumeId < b.VolumeId
	})
	return out, nil
}

// ListVaultTokens lists the Vault tokens held for pods' service accounts.
func (s *AdminServer) ListVaultTokens(context.Context, *adminv1.ListVaultTokensRequest) (*adminv1.ListVaultTokensResponse, error) {
	if s.o.VaultTokens == nil {
		return nil, toStatus(errNotServed)
	}
	mode, toks := s.o.VaultTokens()
	out := &adminv1.ListVaultTokensResponse{Node: s.o.Node, Mode: mode}
	for _, t := range toks {
		out.Tokens = append(out.Tokens, &adminv1.VaultToken{AccessorSha256: t.AccessorSHA256, Namespace: t.Namespace,
			ServiceAccount: t.ServiceAccount, Role: t.Role, Environment: t.Environment, Issued: ts(t.Issued),
			Ttl: durationpb.New(t.TTL), Expires: ts(t.Issued.Add(t.TTL)), Renewable: t.Renewable, Holders: uint32(t.Holders)})
	}
	sort.Slice(out.Tokens, func(i, j int) bool {
		a, b := out.Tokens[i], out.Tokens[j]
		return a.Namespace+"/"+a.ServiceAccount+"/"+a.Environment < b.Namespace+"/"+b.ServiceAccount+"/"+b.Environment
	})
	return out, nil
}

// GetPolicy is the policy's generation and hash.
func (s *AdminServer) GetPolicy(context.Context, *adminv1.GetPolicyRequest) (*adminv1.GetPolicyResponse, error) {
	if s.o.Policy == nil {
		return nil, toStatus(errNotServed)
	}
	gen, hash := s.o.Policy()
	return &adminv1.GetPolicyResponse{Generation: gen, Hash: hash}, nil
}

// GetHealth runs the health checks.
func (s *AdminServer) GetHealth(context.Context, *adminv1.GetHealthRequest) (*adminv1.GetHealthResponse, error) {
	out := &adminv1.GetHealthResponse{Node: s.o.Node, Component: s.o.Component, Version: s.o.Version, Healthy: true}
	if s.o.Health == nil {
		return out, nil
	}
	for _, c := range s.o.Health() {
		hc := &adminv1.HealthCheck{Name: c.Name, Ok: c.Err == nil}
		if c.Err != nil {
			hc.Reason, out.Healthy = c.Err.Error(), false
		}
		out.Checks = append(out.Checks, hc)
	}
	return out, nil
}

func ts(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}
