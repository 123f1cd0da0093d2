package csi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	provider "sigs.k8s.io/secrets-store-csi-driver/provider/v1alpha1"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/internal/fault"
	"github.com/keyward/keyward/internal/grpcserver"
)

// Attributes the Secrets Store CSI Driver adds to a provider's MountRequest besides the
// SecretProviderClass parameters and the pod information.
const attrSecretProviderClass = "secretProviderClass"

// ProviderServer serves the Secrets Store CSI Driver provider API, so clusters that already run that
// driver can use Keyward as a provider: the same attributes (in the SecretProviderClass parameters),
// the same authentication, scoping and audit. The driver writes the files it returns.
type ProviderServer struct {
	provider.UnimplementedCSIDriverProviderServer
	o Options
}

// NewProviderServer shares Options with the CSI node server.
func NewProviderServer(o Options) (*ProviderServer, error) {
	if o.Broker == nil || o.Log == nil || o.Audience == "" {
		return nil, errors.New("csi provider: Broker, Audience and Log are required")
	}
	if o.Credentials == nil {
		o.Credentials = NewPodCredentials(o.Broker, o.Log)
	}
	if err := o.limits(); err != nil {
		return nil, err
	}
	return &ProviderServer{o: o}, nil
}

// Register registers the provider service.
func (p *ProviderServer) Register(g *grpc.Server) { provider.RegisterCSIDriverProviderServer(g, p) }

// Version implements the provider API.
func (p *ProviderServer) Version(context.Context, *provider.VersionRequest) (*provider.VersionResponse, error) {
	v := p.o.Version
	if v == "" || v == "dev" {
		v = "0.0.0-dev"
	}
	return &provider.VersionResponse{Version: "v1alpha1", RuntimeName: "keyward", RuntimeVersion: v}, nil
}

// Mount authenticates the pod, authorizes and fetches its secrets, and returns them as files. Every
// refusal is audited, whatever stage refused it.
func (p *ProviderServer) Mount(ctx context.Context, req *provider.MountRequest) (*provider.MountResponse, error) {
	breq := broker.Request{RequestID: "provider/" + nonce(), Event: audit.EventMount}
	var attrs map[string]string
	if err := json.Unmarshal([]byte(req.GetAttributes()), &attrs); err != nil {
		return nil, p.refuse(ctx, breq, fmt.Errorf("attributes are not a JSON object of strings: %w", fault.ErrInvalid))
	}
	delete(attrs, attrSecretProviderClass)
	breq.Claimed = claimedPod(attrs)
	breq.RequestID = "provider/" + breq.Claimed.PodUID + "/" + nonce()
	vol, err := ParseVolume(attrs, nil, p.o.Audience) // the provider API gets the token in the attributes
	if err != nil {
		return nil, p.refuse(ctx, breq, err)
	}
	breq.Claimed, breq.Token, breq.Refs, breq.MaxBytes = vol.Claimed, vol.Token, vol.Refs(), vol.SizeLimit
	for i, f := range vol.Files {
		if f.Format.Randomized() {
			// The Secrets Store CSI Driver rewrites a file whose bytes changed, and a PKCS#12 encoding
			// differs every time: each rotation poll would rewrite the keystore (and wake every app
			// watching it). Keyward's own driver compares the inputs instead.
			return nil, p.refuse(ctx, breq, fmt.Errorf("secrets[%d] (file %q): format %s is not served through the Secrets Store CSI Driver, "+
				"which would rewrite the keystore at every rotation poll: use Keyward's CSI driver (%s) or format pem: %w", i, f.Name, f.Format, DriverName, fault.ErrInvalid))
		}
	}
	release, err := p.o.Limiter.acquire(ctx, vol.Weight())
	if err != nil {
		return nil, p.refuse(ctx, breq, err)
	}
	defer release()
	// The pod's credentials (its service account's Vault token) stay held after a successful mount
	// while the node's pod informer says the pod lives (PodCredentials.WatchPods), so the rotation
	// polls of a live pod do not log in and revoke each time; a refused or failed mount releases them.
	p.o.Credentials.begin(vol.Claimed.PodUID)
	ok := false
	defer func() { p.o.Credentials.endMount(vol.Claimed.PodUID, ok) }()
	secrets, err := p.o.Broker.Fetch(ctx, breq)
	if err != nil {
		return nil, grpcserver.Status(err)
	}
	// The response holds the plain files' values until it is sent: those are not cleared here.
	pl, err := vol.render(secrets, -1)
	if err != nil {
		return nil, p.refuse(ctx, breq, err)
	}
	resp := &provider.MountResponse{}
	for _, f := range pl.files {
		resp.Files = append(resp.Files, &provider.File{Path: f.Name, Mode: int32(f.Mode.Perm()), Contents: f.Data})
	}
	for i, r := range vol.Refs() {
		resp.ObjectVersion = append(resp.ObjectVersion, &provider.ObjectVersion{Id: r.Ref + "#" + r.Key, Version: strconv.Itoa(secrets[i].Version)})
	}
	ok = true
	return resp, nil
}

func (p *ProviderServer) refuse(ctx context.Context, req broker.Request, err error) error {
	if aerr := p.o.Broker.Refuse(ctx, req, err); aerr != nil {
		p.o.Log.Error("audit record for a refused request not written", zap.Error(aerr))
	}
	return grpcserver.Status(err)
}

// DescribeProvider is the provider API's grpcserver.Describer: the pod, never the token or contents.
func DescribeProvider(req any) []zap.Field {
	r, ok := req.(*provider.MountRequest)
	if !ok {
		return nil
	}
	var attrs map[string]string
	if json.Unmarshal([]byte(r.GetAttributes()), &attrs) != nil {
		return []zap.Field{zap.Bool("attributes_parse", false)}
	}
	return []zap.Field{zap.String("pod", attrs[AttrPodNamespace]+"/"+attrs[AttrPodName]), zap.String("pod_uid", attrs[AttrPodUID]),
		zap.Bool("token_present", attrs[AttrTokens] != "")}
}
