package registration

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	"github.com/keyward/keyward/internal/grpcserver"
)

// DefaultDir is kubelet's plugin registration directory (below its default --root-dir).
const DefaultDir = "/var/lib/kubelet/plugins_registry"

// SupportedVersions are the CSI versions the driver tells kubelet it serves.
var SupportedVersions = []string{"1.0.0"}

// SocketPath is the registration socket of driver in kubelet's registration directory dir, named
// as node-driver-registrar names it (so the two forms replace each other cleanly).
func SocketPath(dir, driver string) string { return filepath.Join(dir, driver+"-reg.sock") }

// Options configure Start.
type Options struct {
	// Dir is kubelet's plugin registration directory as this process sees it; it must exist (kubelet
	// makes it).
	Dir string
	// Driver is the CSI driver's name (the CSIDriver object's).
	Driver string
	// Endpoint is the CSI socket's path as kubelet sees it (on the host).
	Endpoint string
	Log      *zap.Logger
}

// Server serves the Registration service until Stop.
type Server struct {
	registerapi.UnimplementedRegistrationServer
	o    Options
	path string
	gs   *grpc.Server
	done chan struct{}
	stop sync.Once

	mu         sync.Mutex
	registered bool
	err        error // kubelet's last word, if it refused
	failures   uint64
}

// Start listens on the registration socket in o.Dir and serves kubelet's calls in the background.
func Start(o Options) (*Server, error) {
	if o.Dir == "" || o.Driver == "" || o.Endpoint == "" || o.Log == nil {
		return nil, errors.New("registration: Dir, Driver, Endpoint and Log are required")
	}
	if st, err := os.Stat(o.Dir); err != nil || !st.IsDir() {
		return nil, fmt.Errorf("kubelet's plugin registration directory %s: not a directory (%v)", o.Dir, err)
	}
	s := &Server{o: o, path: SocketPath(o.Dir, o.Driver), done: make(chan struct{})}
	lis, err := grpcserver.Listen(s.path)
	if err != nil {
		return nil, err
	}
	s.gs = grpcserver.NewServer(o.Log, nil)
	registerapi.RegisterRegistrationServer(s.gs, s)
	go func() {
		defer close(s.done)
		if err := s.gs.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			o.Log.Error("registration socket stopped", zap.Error(err))
		}
	}()
	o.Log.Info("waiting for kubelet to register the driver", zap.String("socket", s.path), zap.String("endpoint", o.Endpoint))
	return s, nil
}

// Path is the registration socket's path.
func (s *Server) Path() string { return s.path }

// GetInfo tells kubelet the driver's name, its CSI endpoint and the CSI versions it serves.
func (s *Server) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{Type: registerapi.CSIPlugin, Name: s.o.Driver, Endpoint: s.o.Endpoint,
		SupportedVersions: append([]string(nil), SupportedVersions...)}, nil
}

// NotifyRegistrationStatus keeps kubelet's answer. A refusal makes Health fail (kubelet retries; its
// next success clears it), unlike node-driver-registrar, which exits: the broker still serves the
// pods kubelet already knows it for.
func (s *Server) NotifyRegistrationStatus(_ context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	s.mu.Lock()
	s.registered = st.GetPluginRegistered()
	if s.registered {
		s.err = nil
	} else {
		s.failures++
		s.err = fmt.Errorf("kubelet refused to register the driver: %s", st.GetError())
	}
	s.mu.Unlock()
	if st.GetPluginRegistered() {
		s.o.Log.Info("registered with kubelet", zap.String("endpoint", s.o.Endpoint))
	} else {
		s.o.Log.Error("kubelet refused to register the driver; it retries", zap.String("endpoint", s.o.Endpoint),
			zap.String("kubelet_error", st.GetError()))
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// Health is nil unless kubelet's last answer was a refusal (not yet asked is not a failure).
func (s *Server) Health() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Registered reports whether kubelet's last answer was a successful registration.
func (s *Server) Registered() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.registered
}

// Failures counts kubelet's refusals since Start.
func (s *Server) Failures() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.failures
}

// Stop stops serving and removes the socket, so kubelet deregisters the driver (as it does when the
// node-driver-registrar sidecar stops); a restarted broker registers again. Safe to call twice.
func (s *Server) Stop() {
	s.stop.Do(func() {
		s.gs.Stop()
		<-s.done
		if err := os.Remove(s.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			s.o.Log.Warn("removing the registration socket", zap.String("socket", s.path), zap.Error(err))
		}
	})
}
