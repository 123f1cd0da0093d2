package registration

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// kubelet plays kubelet's plugin watcher: it finds the socket in the registration directory by its
// name, asks for the plugin's info and tells it how the registration went.
func kubelet(t *testing.T, dir string) registerapi.RegistrationClient {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var sock string
	for _, e := range entries {
		if e.Type()&os.ModeSocket != 0 {
			sock = filepath.Join(dir, e.Name())
		}
	}
	if sock != filepath.Join(dir, "secrets.keyward.dev-reg.sock") {
		t.Fatalf("sockets in the registration directory: %v, want secrets.keyward.dev-reg.sock", entries)
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return registerapi.NewRegistrationClient(conn)
}

func TestKubeletRegistersTheDriver(t *testing.T) {
	dir := t.TempDir()
	s, err := Start(Options{Dir: dir, Driver: "secrets.keyward.dev", Endpoint: "/var/lib/kubelet/plugins/secrets.keyward.dev/csi.sock", Log: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	kl := kubelet(t, dir)
	info, err := kl.GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.GetType() != registerapi.CSIPlugin || info.GetName() != "secrets.keyward.dev" ||
		info.GetEndpoint() != "/var/lib/kubelet/plugins/secrets.keyward.dev/csi.sock" || !slices.Equal(info.GetSupportedVersions(), []string{"1.0.0"}) {
		t.Fatalf("GetInfo: %v", info)
	}
	if s.Health() != nil || s.Registered() {
		t.Fatalf("before kubelet's answer: health %v, registered %v", s.Health(), s.Registered())
	}

	// A refusal shows in health and in the failure count; kubelet's next success clears it.
	if _, err := kl.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: false, Error: "no NodeGetInfo"}); err != nil {
		t.Fatal(err)
	}
	if err := s.Health(); err == nil || !strings.Contains(err.Error(), "no NodeGetInfo") || s.Registered() || s.Failures() != 1 {
		t.Fatalf("after a refusal: health %v, registered %v, %d failures", err, s.Registered(), s.Failures())
	}
	if _, err := kl.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Fatal(err)
	}
	if s.Health() != nil || !s.Registered() || s.Failures() != 1 {
		t.Fatalf("after a registration: health %v, registered %v, %d failures", s.Health(), s.Registered(), s.Failures())
	}

	// Stop removes the socket: kubelet deregisters the driver.
	s.Stop()
	if _, err := os.Lstat(s.Path()); !os.IsNotExist(err) {
		t.Fatalf("the registration socket outlived Stop: %v", err)
	}
	s.Stop() // twice: nothing to do
}

func TestStartNeedsKubeletsDirectory(t *testing.T) {
	log := zaptest.NewLogger(t)
	missing := filepath.Join(t.TempDir(), "plugins_registry")
	if _, err := Start(Options{Dir: missing, Driver: "d", Endpoint: "/e", Log: log}); err == nil {
		t.Fatal("started without kubelet's registration directory")
	}
	if _, err := os.Stat(missing); !os.IsNotExist(err) {
		t.Fatal("made kubelet's registration directory")
	}
	if _, err := Start(Options{Dir: t.TempDir(), Log: log}); err == nil {
		t.Fatal("started without a driver name and endpoint")
	}
}
