package e2e

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/keyward/keyward/csi/tmpfs"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/test/harness"
)

// smallDisk mounts a tmpfs of size bytes at dir: an audit disk the test can fill.
func smallDisk(t *testing.T, dir string, size int64) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, fmt.Sprintf("size=%d,mode=0700", size)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
}

// fill writes a file into dir until the file system is full; removing it frees the disk.
func fill(t *testing.T, dir string) (free func()) {
	t.Helper()
	p := filepath.Join(dir, "filler")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 4096)
	for {
		if _, err := f.Write(chunk); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			break
		}
	}
	f.Close()
	return func() { os.Remove(p) }
}

// A full audit disk, for real: keyward-kms refuses every Encrypt (no record, no operation), its
// Status and its metric say why, and when the disk has room again it recovers by itself, with a
// record of the outage. (Before, healthz stayed "ok" while every call failed.)
func TestKMSAuditDiskFullFailsClosedAndRecovers(t *testing.T) {
	p := newKMSPlugin(t)
	p.proc.stop(t)
	p.auditLog = filepath.Join(p.dir, "small-audit")
	smallDisk(t, p.auditLog, 256<<10)
	p.start(t)
	ctx := context.Background()
	encrypt := func() error {
		_, err := p.client.Encrypt(ctx, &kmsapi.EncryptRequest{Uid: "disk", Plaintext: []byte(secretCanary)})
		return err
	}
	if err := encrypt(); err != nil {
		t.Fatal(err)
	}
	free := fill(t, p.auditLog)
	// The segment's last page may still hold a few records: write until the disk refuses.
	eventually(t, 20*time.Second, "an Encrypt refused for want of its record", func() error {
		if err := encrypt(); status.Code(err) != codes.Unavailable {
			return fmt.Errorf("encrypt: %v", err)
		}
		return nil
	})
	st := p.waitHealthz(t, "", 20*time.Second)
	if !strings.Contains(st.Healthz, "no space left on device") {
		t.Fatalf("healthz on a full audit disk: %q", st.Healthz)
	}
	if m := p.metric(t, "keyward_audit_healthy"); !strings.HasSuffix(m, " 0") {
		t.Fatalf("metric on a full disk: %q", m)
	}
	free()
	p.waitHealthz(t, "ok", 30*time.Second)
	if m := p.metric(t, "keyward_audit_healthy"); !strings.HasSuffix(m, " 1") {
		t.Fatalf("metric after recovery: %q", m)
	}
	if err := encrypt(); err != nil {
		t.Fatalf("encrypt after recovery: %v", err)
	}
	p.proc.stop(t)
	recovered, err := audit.QueryPath(p.auditLog, audit.Filter{Event: string(audit.EventAuditRecovered)})
	if err != nil || len(recovered) == 0 || !strings.Contains(recovered[0].Reason, "records were refused") {
		t.Fatalf("no record of the outage: %v %+v", err, recovered)
	}
	if code, out := ctl(t, nil, "audit", "verify", p.auditLog, "--key-file", p.auditKey, "--node", "node-1", "--stream", "kms"); code != 0 {
		t.Fatalf("audit verify: %s", out)
	}
}

// The same for keyward-broker: publishes fail Unavailable, the CSI Probe and /healthz report not
// ready (so kubelet's readiness probe sees it), the metrics say so, and all of it recovers by itself.
func TestBrokerAuditDiskFullFailsClosedAndRecovers(t *testing.T) {
	e := newBrokerEnv(t)
	port, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	metrics := fmt.Sprintf("127.0.0.1:%d", port)
	d := startDriver(t, e, driverOptions{metrics: metrics, auditDisk: 256 << 10})
	pod := e.pods["payments-prod"]
	if err := d.kl.publish(t, pod, csiSecrets, ""); err != nil {
		t.Fatal(err)
	}
	target := d.kl.target(t, pod)
	free := fill(t, d.auditLog)
	eventually(t, 20*time.Second, "a republish refused for want of its record", func() error {
		if err := d.kl.publish(t, pod, csiSecrets, ""); status.Code(err) != codes.Unavailable {
			return fmt.Errorf("publish: %v", err)
		}
		return nil
	})
	if files, err := tmpfs.Read(target); err != nil || len(files) != 2 || string(files[1].Data) != prodCanary {
		t.Fatalf("the running pod's files were touched: %d files, %v", len(files), err)
	}
	if r, err := d.kl.id.Probe(context.Background(), &csipb.ProbeRequest{}); err != nil || r.GetReady().GetValue() {
		t.Fatalf("probe on a full audit disk: %v %v, want not ready", r, err)
	}
	if m := scrape(t, metrics, "keyward_audit_healthy"); !strings.HasSuffix(m, " 0") {
		t.Fatalf("metric on a full disk: %q", m)
	}
	if m := scrape(t, metrics, `keyward_broker_publishes_total{code="Unavailable",result="failed"}`); m == "" || strings.HasSuffix(m, " 0") {
		t.Fatalf("publishes refused for want of their records are not counted as failed: %q", m)
	}
	if m := scrape(t, metrics, "keyward_audit_write_failures_total"); m == "" || strings.HasSuffix(m, " 0") {
		t.Fatalf("audit write failures not counted: %q", m)
	}
	if code := httpStatus(t, "http://"+metrics+"/healthz"); code != http.StatusServiceUnavailable {
		t.Fatalf("/healthz on a full audit disk: %d, want 503", code)
	}
	free()
	d.waitReady(t)
	if code := httpStatus(t, "http://"+metrics+"/healthz"); code != http.StatusOK {
		t.Fatalf("/healthz after recovery: %d", code)
	}
	if err := d.kl.publish(t, pod, csiSecrets, ""); err != nil {
		t.Fatalf("republish after recovery: %v", err)
	}
	if m := scrape(t, metrics, "keyward_audit_healthy"); !strings.HasSuffix(m, " 1") {
		t.Fatalf("metric after recovery: %q", m)
	}
	if err := d.kl.unpublish(t, pod); err != nil {
		t.Fatal(err)
	}
	d.proc.stop(t)
	if code, out := ctl(t, nil, "audit", "verify", d.auditLog, "--key-file", d.key, "--node", "node-1", "--stream", "broker"); code != 0 {
		t.Fatalf("audit verify: %s", out)
	}
	if !strings.Contains(readFile(t, d.auditLog), `"event":"audit_recovered"`) {
		t.Fatal("no record of the outage")
	}
}

// httpStatus is the status code of a GET of url.
func httpStatus(t *testing.T, url string) int {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}
