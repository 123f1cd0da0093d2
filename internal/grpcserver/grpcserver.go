package grpcserver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyward/keyward/internal/fault"
)

// ErrInUse means another process is serving the socket.
var ErrInUse = errors.New("socket is served by another process")

var umaskMu sync.Mutex

// Listen listens on a unix socket at path with mode 0600. An existing socket that answers is left
// alone (ErrInUse); one that does not answer is stale and removed; any other file there is an error.
func Listen(path string) (net.Listener, error) {
	if len(path) > 100 {
		return nil, fmt.Errorf("socket path %s is %d bytes; unix sockets allow about 100", path, len(path))
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	if st, err := os.Lstat(path); err == nil {
		if st.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket; refusing to replace it", path)
		}
		c, derr := net.DialTimeout("unix", path, time.Second)
		if derr == nil {
			c.Close()
			return nil, fmt.Errorf("%s: %w", path, ErrInUse)
		}
		if !errors.Is(derr, syscall.ECONNREFUSED) && !errors.Is(derr, syscall.ENOENT) {
			return nil, fmt.Errorf("probing existing socket %s: %w", path, derr)
		}
		if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
			return nil, fmt.Errorf("removing stale socket %s: %w", path, err)
		}
	}
	// The socket is created 0600 from the start (no window with wider permissions).
	umaskMu.Lock()
	old := syscall.Umask(0o177)
	l, err := net.Listen("unix", path)
	syscall.Umask(old)
	umaskMu.Unlock()
	if err != nil {
		return nil, err
	}
	return l, nil
}

// Describer picks the fields of a request that are safe to log. It is the one place a protocol
// adapter decides what of a request may be logged: tokens and secret payloads never are.
type Describer func(req any) []zap.Field

// NewServer returns a gRPC server that logs each RPC once (method, code, duration, and what describe
// allows of the request; never payloads).
func NewServer(log *zap.Logger, describe Describer, opts ...grpc.ServerOption) *grpc.Server {
	// WaitForHandlers: even a forced Stop (grace exceeded) returns only once every handler has
	// returned, so nothing a handler does can race with the process's own shutdown steps.
	return grpc.NewServer(append([]grpc.ServerOption{grpc.ChainUnaryInterceptor(LoggingInterceptor(log, describe)),
		grpc.WaitForHandlers(true)}, opts...)...)
}

// LoggingInterceptor logs one line per unary RPC: OK at debug level, failures at info level. It logs
// the status message, which Keyward's adapters keep free of secrets, and of the request only what
// describe returns (nothing if describe is nil).
func LoggingInterceptor(log *zap.Logger, describe Describer) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		start := time.Now()
		resp, err := handler(ctx, req)
		st := status.Convert(err)
		fields := []zap.Field{zap.String("method", info.FullMethod), zap.String("code", st.Code().String()),
			zap.Duration("duration", time.Since(start))}
		if describe != nil {
			fields = append(fields, describe(req)...)
		}
		if err != nil {
			log.Info("rpc failed", append(fields, zap.String("message", st.Message()))...)
		} else if ce := log.Check(zap.DebugLevel, "rpc"); ce != nil {
			ce.Write(fields...)
		}
		return resp, err
	}
}

// StreamLoggingInterceptor logs one line per streaming RPC when it ends, as LoggingInterceptor does
// for unary ones (method, code, duration, the status message; never a message of the stream).
func StreamLoggingInterceptor(log *zap.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		start := time.Now()
		err := handler(srv, ss)
		st := status.Convert(err)
		fields := []zap.Field{zap.String("method", info.FullMethod), zap.String("code", st.Code().String()),
			zap.Duration("duration", time.Since(start))}
		if err != nil {
			log.Info("rpc failed", append(fields, zap.String("message", st.Message()))...)
		} else if ce := log.Check(zap.DebugLevel, "rpc"); ce != nil {
			ce.Write(fields...)
		}
		return err
	}
}

// ErrHandlersRunning is returned by Serve when handlers were still running after being cut: the
// caller must not assume no handler runs any more.
var ErrHandlersRunning = errors.New("grpc handlers still running after the server was stopped")

// Serve serves until ctx ends, then stops gracefully: in-flight calls get up to grace to finish, after
// which they are cut (their contexts cancelled) and get another grace to return. The listener (and so
// the socket file) is closed either way. If serving fails on its own, the server is stopped the same
// way before Serve returns, so no handler outlives it.
func Serve(ctx context.Context, s *grpc.Server, l net.Listener, grace time.Duration) error {
	errc := make(chan error, 1)
	go func() { errc <- s.Serve(l) }()
	select {
	case err := <-errc:
		if serr := stop(s, 0, grace); serr != nil {
			return errors.Join(err, serr)
		}
		return err
	case <-ctx.Done():
	}
	if err := stop(s, grace, grace); err != nil {
		return err
	}
	<-errc
	return nil
}

// stop lets in-flight calls finish for up to grace, then cuts them and waits up to cut for their
// handlers to return (the servers are built with WaitForHandlers).
func stop(s *grpc.Server, grace, cut time.Duration) error {
	done := make(chan struct{})
	go func() { s.GracefulStop(); close(done) }()
	select {
	case <-done:
		return nil
	case <-time.After(grace):
	}
	go s.Stop()
	select {
	case <-done:
		return nil
	case <-time.After(cut):
		return ErrHandlersRunning
	}
}

// codes by class: the one map from Keyward's error vocabulary to gRPC.
var codeOf = [...]codes.Code{fault.OK: codes.OK, fault.Unauthenticated: codes.Unauthenticated, fault.Denied: codes.PermissionDenied,
	fault.Invalid: codes.InvalidArgument, fault.NotFound: codes.NotFound, fault.TooLarge: codes.ResourceExhausted,
	fault.Unavailable: codes.Unavailable, fault.DeadlineExceeded: codes.DeadlineExceeded, fault.Canceled: codes.Canceled,
	fault.Internal: codes.Internal}

// Code is the gRPC code of an error class.
func Code(c fault.Class) codes.Code {
	if c < 0 || int(c) >= len(codeOf) {
		return codes.Internal
	}
	return codeOf[c]
}

// Status is the gRPC status a handler returns for err (nil for nil): the code of its class, and its
// message, which Keyward's errors keep free of tokens, secrets and PINs.
func Status(err error) error {
	if err == nil {
		return nil
	}
	return status.Error(Code(fault.ClassOf(err)), err.Error())
}
