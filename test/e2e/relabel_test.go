package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/keyward/keyward/csi/tmpfs"
	"github.com/keyward/keyward/internal/audit"
)

// relabel is keyward-broker serving pods of payments-prod while a cluster admin relabels the
// namespace.
type relabel struct {
	e *brokerEnv
	d *driver
}

// Relabelling a namespace takes effect at the next republish: the driver's namespace informer sees
// the new label, and the files of a pod whose namespace lost its environment, or moved to another
// one, are cleared and the republish is audited as denied. (Before, a namespace moved from prod to
// dev kept its pods' prod files: the refs resolved under dev, Vault refused the login with the dev
// role, and that ambiguous refusal kept the files.)
func TestRelabelWithdrawsAtTheNextRepublish(t *testing.T) {
	e := newBrokerEnv(t)
	r := &relabel{e: e, d: startDriver(t, e, driverOptions{config: "refusalAuditBurst: 1000\n"})}
	runSteps(t,
		step{"the label removed", r.labelRemoved},
		step{"moved to another environment", r.moved},
		step{"moved to an environment the policy does not define", r.unknownEnvironment},
	)
}

// setEnvironment sets (or, with "", removes) payments-prod's environment label as a cluster admin.
func (r *relabel) setEnvironment(t *testing.T, env string) {
	t.Helper()
	v := "null"
	if env != "" {
		v = fmt.Sprintf("%q", env)
	}
	if _, err := r.e.kube.Client.CoreV1().Namespaces().Patch(context.Background(), "payments-prod", types.MergePatchType,
		[]byte(fmt.Sprintf(`{"metadata":{"labels":{%q:%s}}}`, envLabel, v)), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
}

// published publishes a fresh pod of payments-prod and checks its files.
func (r *relabel) published(t *testing.T, name string) *corev1.Pod {
	t.Helper()
	pod := r.e.newPod(t, "payments-prod", name)
	// The driver's informer sees the label a moment after it is set.
	eventually(t, 20*time.Second, "the first publish", func() error { return r.d.kl.publish(t, pod, csiSecrets, "") })
	if files, err := tmpfs.Read(r.d.kl.target(t, pod)); err != nil || len(files) != 2 {
		t.Fatalf("published: %d files, %v", len(files), err)
	}
	return pod
}

// withdrawn relabels the namespace to env and republishes pod (as kubelet does, every period) until
// the republish is refused PermissionDenied; the files must be gone and the refusal audited as a
// denial naming why.
func (r *relabel) withdrawn(t *testing.T, pod *corev1.Pod, env, why string) {
	t.Helper()
	r.setEnvironment(t, env)
	start := time.Now()
	eventually(t, 20*time.Second, "a republish refused after the relabel", func() error {
		err := r.d.kl.publish(t, pod, csiSecrets, "")
		if status.Code(err) == codes.PermissionDenied {
			return nil
		}
		if err != nil {
			if files, rerr := tmpfs.Read(r.d.kl.target(t, pod)); rerr == nil && len(files) > 0 {
				return fmt.Errorf("republish %v with %d files kept", err, len(files))
			}
		}
		return fmt.Errorf("republish: %v", err)
	})
	t.Logf("relabelled to %q: the first republish refused %s after the relabel", env, time.Since(start).Round(10*time.Millisecond))
	if files, err := tmpfs.Read(r.d.kl.target(t, pod)); err != nil || len(files) != 0 {
		t.Fatalf("files left after the relabel: %d, %v", len(files), err)
	}
	found := false
	for _, rec := range r.d.records(t) {
		found = found || (rec.Subject.PodUID == string(pod.UID) && rec.Decision == audit.Denied && rec.Code == "PermissionDenied" &&
			rec.Type == audit.EventAuthorize && strings.Contains(rec.Reason, why))
	}
	if !found {
		t.Fatalf("no audit record denying the pod's republish with %q", why)
	}
	// kubelet's next republish does not bring the files back.
	if err := r.d.kl.publish(t, pod, csiSecrets, ""); err == nil {
		t.Fatal("the republish after the withdrawal was allowed")
	}
	if files, err := tmpfs.Read(r.d.kl.target(t, pod)); err != nil || len(files) != 0 {
		t.Fatalf("files back after the withdrawal: %d, %v", len(files), err)
	}
}

func (r *relabel) labelRemoved(t *testing.T) {
	pod := r.published(t, "api-unlabelled")
	r.withdrawn(t, pod, "", "no keyward.dev/environment label")
	// Labelled again, the next republish delivers again.
	r.setEnvironment(t, "prod")
	eventually(t, 20*time.Second, "a republish after the label is back", func() error { return r.d.kl.publish(t, pod, csiSecrets, "") })
	if files, err := tmpfs.Read(r.d.kl.target(t, pod)); err != nil || len(files) != 2 || string(files[1].Data) != prodCanary {
		t.Fatalf("after the label came back: %d files, %v", len(files), err)
	}
}

// payments-prod moves to dev: the grant (payments-prod/*) still matches, but under dev; the files
// delivered under prod are withdrawn.
func (r *relabel) moved(t *testing.T) {
	r.setEnvironment(t, "prod")
	pod := r.published(t, "api-moved")
	r.withdrawn(t, pod, "dev", `moved from environment "prod" to "dev"`)
}

func (r *relabel) unknownEnvironment(t *testing.T) {
	r.setEnvironment(t, "prod")
	pod := r.published(t, "api-retired")
	r.withdrawn(t, pod, "retired", `environment "retired", which the policy does not define`)
}
