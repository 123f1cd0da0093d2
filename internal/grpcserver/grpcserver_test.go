package grpcserver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/keyward/keyward/internal/fault"
)

func shortDir(t *testing.T) string {
	d, err := os.MkdirTemp("/tmp", "kw-gs-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func TestListenSocketHygiene(t *testing.T) {
	path := filepath.Join(shortDir(t), "s.sock")
	l, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, %v; want 0600", st.Mode().Perm(), err)
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	if _, err := Listen(path); !errors.Is(err, ErrInUse) {
		t.Fatalf("second Listen on a served socket: %v, want ErrInUse", err)
	}
	// A stale socket (nothing answers) is replaced.
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	if _, err := os.Stat(path); err != nil {
		t.Fatal("test setup: stale socket vanished")
	}
	l2, err := Listen(path)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	l2.Close()
	// A regular file is never removed.
	file := filepath.Join(filepath.Dir(path), "f.sock")
	os.WriteFile(file, []byte("x"), 0o600)
	if _, err := Listen(file); err == nil {
		t.Fatal("Listen replaced a regular file")
	}
	if _, err := os.Stat(file); err != nil {
		t.Fatal("the regular file was removed")
	}
}

func TestServeGracefulStopRemovesSocketAndLogsOnce(t *testing.T) {
	path := filepath.Join(shortDir(t), "s.sock")
	core, logs := observer.New(zap.DebugLevel)
	s := NewServer(zap.New(core), nil)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(s, hs)
	l, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- Serve(ctx, s, l, 5*time.Second) }()
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := healthpb.NewHealthClient(conn)
	if _, err := c.Check(context.Background(), &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatal(err)
	}
	_, err = c.Check(context.Background(), &healthpb.HealthCheckRequest{Service: "nope"})
	if status.Code(err) != codes.NotFound {
		t.Fatalf("unknown service: %v", err)
	}
	if n := logs.FilterMessage("rpc").Len(); n != 1 {
		t.Errorf("%d debug lines for 1 OK call", n)
	}
	if n := logs.FilterMessage("rpc failed").Len(); n != 1 {
		t.Errorf("%d lines for 1 failed call", n)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("socket left behind after stop: %v", err)
	}
}

// Every class maps to the gRPC code of the same name (audit records carry the name), and Status
// keeps the message.
func TestStatusAndCode(t *testing.T) {
	for c := fault.OK; c <= fault.Internal; c++ {
		if got := Code(c); got.String() != c.String() {
			t.Errorf("class %s -> code %s", c, got)
		}
	}
	err := Status(fmt.Errorf("vault read x: %w", fault.ErrUnavailable))
	if st := status.Convert(err); st.Code() != codes.Unavailable || st.Message() != "vault read x: unavailable" {
		t.Fatalf("%v", st)
	}
	if Status(nil) != nil {
		t.Fatal("Status(nil) is not nil")
	}
}

// blockingHealth's Check blocks: until its context ends (polite) or until release closes (stuck).
type blockingHealth struct {
	healthpb.UnimplementedHealthServer
	polite   bool
	entered  chan struct{}
	release  chan struct{}
	returned atomic.Bool
}

func (b *blockingHealth) Check(ctx context.Context, _ *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	defer b.returned.Store(true)
	close(b.entered)
	if b.polite {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	<-b.release
	return &healthpb.HealthCheckResponse{}, nil
}

// Past the grace, calls are cut; Serve returns only once their handlers have returned, or reports
// that one is still running instead of hanging.
func TestServeCutsCallsAndWaitsForTheirHandlers(t *testing.T) {
	for _, polite := range []bool{true, false} {
		t.Run(fmt.Sprintf("polite=%v", polite), func(t *testing.T) {
			path := filepath.Join(shortDir(t), "s.sock")
			s := NewServer(zap.NewNop(), nil)
			b := &blockingHealth{polite: polite, entered: make(chan struct{}), release: make(chan struct{})}
			defer close(b.release)
			healthpb.RegisterHealthServer(s, b)
			l, err := Listen(path)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- Serve(ctx, s, l, 200*time.Millisecond) }()
			conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			go healthpb.NewHealthClient(conn).Check(context.Background(), &healthpb.HealthCheckRequest{})
			<-b.entered
			cancel()
			err = <-done
			switch {
			case polite && (err != nil || !b.returned.Load()):
				t.Fatalf("polite handler: Serve = %v, handler returned = %v", err, b.returned.Load())
			case !polite && !errors.Is(err, ErrHandlersRunning):
				t.Fatalf("stuck handler: Serve = %v, want ErrHandlersRunning", err)
			}
		})
	}
}
