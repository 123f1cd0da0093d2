package apiserver

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/keyward/keyward/internal/grpcserver"
)

// Service names, as their certificate allow-lists are called.
const (
	AuditReaders = "audit-readers"
	Admins       = "admins"
)

// The method prefixes of each service: a method outside them is refused.
const (
	auditPrefix = "/keyward.audit.v1.AuditStream/"
	adminPrefix = "/keyward.admin.v1.Admin/"
)

// Options configure the API listener.
type Options struct {
	// Address is the TCP address to listen on ("": the API is off).
	Address string
	// CertFile and KeyFile are the server's certificate and key (PEM), read again when they change
	// (a rotated certificate is used from the next connection on); ClientCAFile the CA (PEM) client
	// certificates must chain to.
	CertFile, KeyFile, ClientCAFile string
	// AuditReaders and Admins are the client certificates allowed to call AuditStream and Admin, each
	// entry one of (see Allowed): "uri:U", a SAN URI (a SPIFFE ID); "dns:D", a SAN DNS name; an entry
	// holding "=", the whole distinguished name as Go prints it ("CN=x,O=y"); else the common name.
	// The client CA must be dedicated to this API: any certificate it signs is a candidate.
	AuditReaders, Admins []string
}

// Enabled reports whether the API is configured.
func (o Options) Enabled() bool { return o.Address != "" }

// Validate reports the first problem with the options of an enabled API.
func (o Options) Validate() error {
	if !o.Enabled() {
		return nil
	}
	if _, _, err := net.SplitHostPort(o.Address); err != nil {
		return fmt.Errorf("--api-address: %w", err)
	}
	if o.CertFile == "" || o.KeyFile == "" || o.ClientCAFile == "" {
		return errors.New("--api-address needs --api-tls-cert, --api-tls-key and --api-client-ca: the API is served over TLS with client certificates only")
	}
	if len(o.AuditReaders) == 0 && len(o.Admins) == 0 {
		return errors.New("--api-address needs --api-audit-readers or --api-admins: with neither, every call would be refused")
	}
	for _, e := range append(slices.Clone(o.AuditReaders), o.Admins...) {
		if e == "uri:" || e == "dns:" {
			return fmt.Errorf("allow-list entry %q names nothing", e)
		}
	}
	return nil
}

// SplitList parses an allow-list flag: entries separated by commas, or, to name whole
// distinguished names (which hold commas), entries separated by '|'.
func SplitList(s string) []string {
	sep := ","
	if strings.Contains(s, "|") {
		sep = "|"
	}
	var out []string
	for _, f := range strings.Split(s, sep) {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// TLSConfig is the server side: TLS 1.3 only; a client certificate chaining to the client CA is
// required at the handshake, so a peer without one never reaches HTTP/2 or a handler (the
// interceptor's Unauthenticated stays as a second check).
func (o Options) TLSConfig() (*tls.Config, error) {
	pem, err := os.ReadFile(o.ClientCAFile)
	if err != nil {
		return nil, fmt.Errorf("--api-client-ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("--api-client-ca %s holds no PEM certificate", o.ClientCAFile)
	}
	kp := &keyPair{cert: o.CertFile, key: o.KeyFile}
	if _, err := kp.get(nil); err != nil {
		return nil, err
	}
	return &tls.Config{MinVersion: tls.VersionTLS13, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool,
		GetCertificate: kp.get, NextProtos: []string{"h2"}}, nil
}

// keyPair is the server certificate, read again when either file's modification time changes.
type keyPair struct {
	cert, key string
	mu        sync.Mutex
	mod       [2]time.Time
	cur       *tls.Certificate
}

func (k *keyPair) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	var mod [2]time.Time
	for i, p := range []string{k.cert, k.key} {
		st, err := os.Stat(p)
		if err != nil {
			return nil, fmt.Errorf("API TLS: %w", err)
		}
		mod[i] = st.ModTime()
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.cur != nil && mod == k.mod {
		return k.cur, nil
	}
	c, err := tls.LoadX509KeyPair(k.cert, k.key)
	if err != nil {
		if k.cur != nil {
			return k.cur, nil // a rotation half written: keep the certificate in force
		}
		return nil, fmt.Errorf("API TLS key pair: %w", err)
	}
	k.cur, k.mod = &c, mod
	return k.cur, nil
}

// authorizer checks the caller's certificate subject against the service's allow-list.
type authorizer struct {
	lists map[string][]string // method prefix -> subjects
}

func (a authorizer) check(ctx context.Context, method string) error {
	p, ok := peer.FromContext(ctx)
	var chains [][]*x509.Certificate
	if ok {
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok {
			chains = ti.State.VerifiedChains
		}
	}
	if len(chains) == 0 || len(chains[0]) == 0 {
		return status.Error(codes.Unauthenticated, "a client certificate signed by the API's client CA is required")
	}
	c := chains[0][0]
	for prefix, allowed := range a.lists {
		if strings.HasPrefix(method, prefix) {
			if slices.ContainsFunc(allowed, func(entry string) bool { return Allowed(entry, c) }) {
				return nil
			}
			return status.Errorf(codes.PermissionDenied, "certificate subject %q is not on this service's allow-list", c.Subject.String())
		}
	}
	return status.Errorf(codes.PermissionDenied, "method %s is not served", method)
}

// Allowed reports whether an allow-list entry names the certificate. Each form is compared with one
// field only, so no field can pass for another (a common name that reads "CN=x,O=y" is not that
// distinguished name): "uri:U" a SAN URI, exactly (a SPIFFE ID: "uri:spiffe://example.org/ns/x/sa/y");
// "dns:D" a SAN DNS name (case-insensitive); an entry holding "=" the whole subject distinguished
// name as Go prints it; any other entry the subject's common name.
func Allowed(entry string, c *x509.Certificate) bool {
	switch {
	case strings.HasPrefix(entry, "uri:"):
		return slices.ContainsFunc(c.URIs, func(u *url.URL) bool { return u.String() == entry[len("uri:"):] })
	case strings.HasPrefix(entry, "dns:"):
		return slices.ContainsFunc(c.DNSNames, func(d string) bool { return strings.EqualFold(d, entry[len("dns:"):]) })
	case strings.Contains(entry, "="):
		return entry == c.Subject.String()
	default:
		return entry == c.Subject.CommonName
	}
}

func (a authorizer) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if err := a.check(ctx, info.FullMethod); err != nil {
		return nil, err
	}
	return h(ctx, req)
}

func (a authorizer) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	if err := a.check(ss.Context(), info.FullMethod); err != nil {
		return err
	}
	return h(srv, ss)
}

// Server is the API's gRPC server and its listener.
type Server struct {
	GRPC *grpc.Server
	lis  net.Listener
	log  *zap.Logger
}

// Listen listens on o.Address and builds the server (TLS, client-certificate allow-lists, logging);
// register the services on GRPC, then Serve.
func Listen(o Options, log *zap.Logger) (*Server, error) {
	cfg, err := o.TLSConfig()
	if err != nil {
		return nil, err
	}
	a := authorizer{lists: map[string][]string{auditPrefix: o.AuditReaders, adminPrefix: o.Admins}}
	lis, err := net.Listen("tcp", o.Address)
	if err != nil {
		return nil, err
	}
	gs := grpcserver.NewServer(log, nil, grpc.Creds(credentials.NewTLS(cfg)),
		// The allow-list runs before the logging interceptor's handler: refused calls are logged too.
		grpc.ChainUnaryInterceptor(a.unary), grpc.ChainStreamInterceptor(grpcserver.StreamLoggingInterceptor(log), a.stream))
	return &Server{GRPC: gs, lis: lis, log: log}, nil
}

// Addr is the listener's address.
func (s *Server) Addr() net.Addr { return s.lis.Addr() }

// Serve serves until ctx ends, then stops within grace (grpcserver.Serve).
func (s *Server) Serve(ctx context.Context, grace time.Duration) error {
	return grpcserver.Serve(ctx, s.GRPC, s.lis, grace)
}
