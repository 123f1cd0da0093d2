package plugin

import (
	"context"

	"google.golang.org/grpc"
	kmsapi "k8s.io/kms/apis/v2"
	"k8s.io/kms/pkg/service"

	"github.com/keyward/keyward/internal/grpcserver"
)

// GRPCServer adapts a KMS v2 service.Service to the KMS v2 gRPC API. It only translates types and
// errors (internal/grpcserver.Status: the one map from error classes to codes); it holds no logic.
// Error texts never hold a plaintext, key material or a PIN (the wrappers' messages are written so).
type GRPCServer struct {
	kmsapi.UnsafeKeyManagementServiceServer
	svc service.Service
}

var _ kmsapi.KeyManagementServiceServer = (*GRPCServer)(nil)

// NewGRPCServer returns the adapter; Register it on a grpc.Server.
func NewGRPCServer(svc service.Service) *GRPCServer { return &GRPCServer{svc: svc} }

// Register registers the KMS v2 service.
func (g *GRPCServer) Register(s *grpc.Server) { kmsapi.RegisterKeyManagementServiceServer(s, g) }

// Status implements KMS v2 Status.
func (g *GRPCServer) Status(ctx context.Context, _ *kmsapi.StatusRequest) (*kmsapi.StatusResponse, error) {
	r, err := g.svc.Status(ctx)
	if err != nil {
		return nil, grpcserver.Status(err)
	}
	return &kmsapi.StatusResponse{Version: r.Version, Healthz: r.Healthz, KeyId: r.KeyID}, nil
}

// Encrypt implements KMS v2 Encrypt.
func (g *GRPCServer) Encrypt(ctx context.Context, req *kmsapi.EncryptRequest) (*kmsapi.EncryptResponse, error) {
	r, err := g.svc.Encrypt(ctx, req.Uid, req.Plaintext)
	if err != nil {
		return nil, grpcserver.Status(err)
	}
	return &kmsapi.EncryptResponse{Ciphertext: r.Ciphertext, KeyId: r.KeyID, Annotations: r.Annotations}, nil
}

// Decrypt implements KMS v2 Decrypt.
func (g *GRPCServer) Decrypt(ctx context.Context, req *kmsapi.DecryptRequest) (*kmsapi.DecryptResponse, error) {
	pt, err := g.svc.Decrypt(ctx, req.Uid, &service.DecryptRequest{Ciphertext: req.Ciphertext, KeyID: req.KeyId, Annotations: req.Annotations})
	if err != nil {
		return nil, grpcserver.Status(err)
	}
	return &kmsapi.DecryptResponse{Plaintext: pt}, nil
}
