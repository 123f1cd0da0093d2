package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keyward/keyward/csi"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/test/realnode"
)

// keywardEnvImage is test/images' keyward-env as BuildImages names it with the tag "dev".
const keywardEnvImage = "keyward/keyward-env:dev"

// keyward-env on the real node (issue 14, section 1), as the README's pod example runs it: an init
// container of the keyward-env image installs the binary into an emptyDir, and the application's
// containers (secretcheck) run it as their entrypoint. "app" execs secretcheck in place (PID 1 of
// its container, found on PATH) with DB_PASSWORD and APP_DB_PASSWORD holding the volume's file;
// "missing" names a file the volume lacks and exits 4 with the reason in its termination message;
// after a rotation in Vault, "restarted" (--on-change restart) runs secretcheck again with the new
// value in the same container (no kubelet restart), and "signalled" (--on-change signal:HUP)
// delivers SIGHUP, which kills secretcheck, whose status 129 keyward-env passes on. No value is in
// the pod object, the events or any container log.
//
// Issue 14 end to end on the node: the volume also carries a rendered file (db-dsn, a template over
// the same key) that the apps read as DB_DSN; the rotation changes it and ..version, posts
// SecretsRotated on the pod, and keywardctl who-has, over the broker's verified audit stream on the
// node's disk, reports the pod at the newest version.
func TestRealNodeKeywardEnv(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("the real-node e2e runs kubelet and containerd and needs root")
	}
	r := startRealNode(t)
	ctx := context.Background()
	start := time.Now()
	imgs, err := realnode.BuildImages(ctx, r.Repo, filepath.Join(r.HostDir, "keyward-env-image"), "", "keyward-env")
	check(t, err)
	check(t, r.Node.ImportImage(ctx, imgs["keyward-env"].Tar))
	t.Logf("keyward-env's image built and imported in %s: %s, tar %d bytes, binary %d bytes",
		time.Since(start).Round(100*time.Millisecond), imgs["keyward-env"].Digest, imgs["keyward-env"].TarSize, imgs["keyward-env"].Content)

	var pod *corev1.Pod
	runSteps(t,
		step{"the broker DaemonSet becomes Ready and registers with kubelet", r.deployBroker},
		step{"an app sees its secret as environment variables; a missing file is refused", func(t *testing.T) { pod = r.envPod(t) }},
		step{"a rotation restarts one app with the new value and signals the other", func(t *testing.T) { r.envRotation(t, pod) }},
		step{"the rotation changed the rendered file and ..version, is on the pod's events and in who-has", func(t *testing.T) { r.envRotationSeen(t, pod) }},
		step{"no value in the pod, its events or its logs", func(t *testing.T) { r.envNoValue(t, pod) }},
	)
}

// envPod starts the pod and checks the "app", "missing" and the supervised containers' first run.
func (r *realNode) envPod(t *testing.T) *corev1.Pod {
	ctx := context.Background()
	env := func(extra ...string) []string {
		return append([]string{"--from", realnode.SecretsMount, "--env", "DB_PASSWORD=db-password", "--env", "DB_DSN=db-dsn"}, extra...)
	}
	verify := []string{"secretcheck", "-dir", realnode.SecretsMount, "-expect-env", "DB_PASSWORD=db-password", "-expect-env", "DB_DSN=db-dsn"}
	p := realnode.SecretPod("payments-prod", "env-reader", "payments-prod/db", map[string][]string{
		"app":       append(env("--env-all-prefix", "APP_", "--"), append(verify, "-expect-env", "APP_DB_PASSWORD=db-password", "-expect-env", "APP_DB_DSN=db-dsn")...),
		"missing":   append(env("--env", "OTHER=no-such-file", "--"), verify...),
		"restarted": append(env("--on-change", "restart", "--min-interval", "1s", "--jitter", "2s", "--"), append(verify, "-hold")...),
		"signalled": append(env("--on-change", "signal:HUP", "--min-interval", "1s", "--jitter", "2s", "--"), append(verify, "-hold")...),
	})
	// A rendered file beside the plain one (README "Rendered files"): a DSN over the same key.
	p.Spec.Volumes[0].CSI.VolumeAttributes["secrets"] += dsnEntry
	// The README's example: the init container copies keyward-env into an emptyDir; each
	// application container runs it from there, its own arguments after "--".
	p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: "keyward-bin", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}})
	p.Spec.InitContainers = []corev1.Container{{
		Name: "install-keyward-env", Image: keywardEnvImage, ImagePullPolicy: corev1.PullNever,
		Args:         []string{"install", "/keyward/bin"},
		VolumeMounts: []corev1.VolumeMount{{Name: "keyward-bin", MountPath: "/keyward/bin"}},
	}}
	for i := range p.Spec.Containers {
		c := &p.Spec.Containers[i]
		c.Command = []string{"/keyward/bin/keyward-env"}
		c.Args = c.Args[2:] // SecretPod's "-dir /secrets" is secretcheck's, given after "--" here
		c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{Name: "keyward-bin", MountPath: "/keyward/bin", ReadOnly: true})
		c.TerminationMessagePolicy = corev1.TerminationMessageFallbackToLogsOnError
	}
	p, err := r.Kube.Client.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var cur *corev1.Pod
	eventually(t, 3*time.Minute, "the app and missing containers done", func() error {
		if cur, err = r.Kube.Client.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{}); err != nil {
			return err
		}
		for _, c := range []string{"app", "missing"} {
			if st := realnode.ContainerStatus(cur, c); st == nil || st.State.Terminated == nil {
				return fmt.Errorf("%s not terminated: %s", c, r.PodStates(ctx, p.Namespace))
			}
		}
		return nil
	})
	v, code, err := realnode.ContainerVerdict(cur, "app")
	if err != nil || code != 0 || !v.Passed() {
		t.Fatalf("the app container: exit %d, %v, verdict %+v", code, err, v)
	}
	var extra struct {
		Pid int      `json:"pid"`
		Env []envVar `json:"env"`
	}
	json.Unmarshal([]byte(realnode.ContainerStatus(cur, "app").State.Terminated.Message), &extra)
	if extra.Pid != 1 {
		t.Errorf("secretcheck ran as PID %d, want 1: keyward-env (the container's first process) did not exec it in place", extra.Pid)
	}
	if got, want := fmt.Sprint(extra.Env), fmt.Sprint(wantEnv(prodCanary, "APP_DB_DSN", "APP_DB_PASSWORD", "DB_DSN", "DB_PASSWORD")); got != want {
		t.Errorf("the app's variables: %s, want %s", got, want)
	}
	st := realnode.ContainerStatus(cur, "missing").State.Terminated
	if st.ExitCode != 4 || !strings.Contains(st.Message, "has no file no-such-file (it has: db-dsn, db-password)") {
		t.Errorf("the missing container: exit %d, message %q; want 4 and the reason", st.ExitCode, st.Message)
	}
	t.Logf("app: PID %d, variables %+v; missing: exit %d, %q", extra.Pid, extra.Env, st.ExitCode, strings.TrimSpace(st.Message))
	for _, c := range []string{"restarted", "signalled"} {
		if s := realnode.ContainerStatus(cur, c); s == nil || s.State.Running == nil {
			t.Fatalf("the %s container is not running: %+v", c, s)
		}
	}
	return cur
}

// containerLog is a container's log as kubelet wrote it (its CRI log files on the node).
func (r *realNode) containerLog(t *testing.T, p *corev1.Pod, container string) string {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(r.Node.PodLogDir, p.Namespace+"_"+p.Name+"_"+string(p.UID), container, "*.log"))
	var out strings.Builder
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		out.Write(b)
	}
	return out.String()
}

type envVerdict struct {
	Verdict string   `json:"verdict"`
	Pid     int      `json:"pid"`
	Env     []envVar `json:"env"`
}

type envVar struct {
	Name  string `json:"name"`
	Bytes int    `json:"bytes"`
}

// dsnEntry is the template entry the env pod's volume adds: the file db-dsn rendered from the
// password (userinfo leaves the canaries' letters, digits and '-' as they are).
const dsnEntry = `- file: db-dsn
  template: 'postgresql://{{ userinfo "api" .db.password }}@db:5432/payments'
  refs: {db: payments-prod/db}
`

// dsn is db-dsn rendered with password.
func dsn(password string) string { return "postgresql://api:" + password + "@db:5432/payments" }

// wantEnv is secretcheck's report of the variables names (sorted) when the password is password:
// the *_DSN ones hold dsn(password), the others the password.
func wantEnv(password string, names ...string) []envVar {
	var out []envVar
	for _, n := range names {
		b := len(password)
		if strings.HasSuffix(n, "_DSN") {
			b = len(dsn(password))
		}
		out = append(out, envVar{Name: n, Bytes: b})
	}
	return out
}

func verdictsIn(log string) []envVerdict {
	var out []envVerdict
	for _, l := range strings.Split(log, "\n") {
		if i := strings.Index(l, `{"verdict"`); i >= 0 {
			var v envVerdict
			if json.Unmarshal([]byte(l[i:]), &v) == nil {
				out = append(out, v)
			}
		}
	}
	return out
}

// envRotation writes a new value in Vault and waits for the supervised containers to act.
func (r *realNode) envRotation(t *testing.T, p *corev1.Pod) {
	ctx := context.Background()
	_, err := r.Vault.PutKV(ctx, "kv", "prod/payments-prod/db", map[string]any{"password": rotatedValue})
	check(t, err)
	start := time.Now()
	eventually(t, 4*time.Minute, "the rotated container restarted with the new value", func() error {
		vs := verdictsIn(r.containerLog(t, p, "restarted"))
		if len(vs) < 2 {
			return fmt.Errorf("%d verdicts in the restarted container's log", len(vs))
		}
		last := vs[len(vs)-1]
		if last.Verdict != "pass" || fmt.Sprint(last.Env) != fmt.Sprint(wantEnv(rotatedValue, "DB_DSN", "DB_PASSWORD")) || last.Pid == vs[0].Pid {
			t.Fatalf("the restarted container's verdicts: %+v", vs)
		}
		return nil
	})
	restarted := time.Since(start)
	var cur *corev1.Pod
	eventually(t, time.Minute, "the signalled container killed by SIGHUP", func() error {
		if cur, err = r.Kube.Client.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{}); err != nil {
			return err
		}
		if st := realnode.ContainerStatus(cur, "signalled"); st == nil || st.State.Terminated == nil {
			return fmt.Errorf("not terminated: %s", r.PodStates(ctx, p.Namespace))
		}
		return nil
	})
	if st := realnode.ContainerStatus(cur, "signalled").State.Terminated; st.ExitCode != 129 {
		t.Errorf("the signalled container exited %d, want 129 (SIGHUP killed secretcheck, keyward-env passed it on): %q", st.ExitCode, st.Message)
	}
	if st := realnode.ContainerStatus(cur, "restarted"); st.State.Running == nil || st.RestartCount != 0 {
		t.Errorf("the restarted container: %+v, want running with no kubelet restart", st)
	}
	log := r.containerLog(t, p, "restarted")
	if !strings.Contains(log, "keyward-env: restarting the application (pid ") || !strings.Contains(log, "): DB_DSN, DB_PASSWORD changed") {
		t.Errorf("keyward-env's report is not in the log:\n%s", log)
	}
	t.Logf("the rotation restarted the app %s after the Vault write (kubelet's republish, then --min-interval 1s --jitter 2s)", restarted.Round(100*time.Millisecond))
}

// envRotationSeen: after the rotation, the rendered file holds the new password, ..version counts
// 2 with the new Vault version, the broker posted SecretsRotated on the pod, and who-has, over the
// broker's audit stream on the node (verified first), reports the pod holding the newest version.
func (r *realNode) envRotationSeen(t *testing.T, p *corev1.Pod) {
	vol := r.VolumePath(p)
	got, err := os.ReadFile(filepath.Join(vol, "db-dsn"))
	check(t, err)
	if string(got) != dsn(rotatedValue) {
		t.Errorf("the rendered db-dsn after the rotation is not the template over the new password (%d bytes, want %d)", len(got), len(dsn(rotatedValue)))
	}
	raw, err := os.ReadFile(filepath.Join(vol, "..version"))
	check(t, err)
	ver, ok := csi.ParseVersion(raw)
	if !ok || ver.Version != 2 || ver.Refs["payments-prod/db#password"] < 2 || strings.Contains(string(raw), "CANARY") {
		t.Fatalf("..version after the rotation: %s", raw)
	}
	ev := r.brokerEvent(t, p, "SecretsRotated", "secrets volume swapped, ..version 2: payments-prod/db#password version ")
	keyDir, logDir := r.BrokerDirs()
	dir := filepath.Join(logDir, "broker-audit")
	key, err := audit.ReadKey(filepath.Join(keyDir, "audit.key"))
	check(t, err)
	if rep, err := audit.VerifyDir(dir, audit.VerifyOptions{Key: key, Node: r.Node.Name, Stream: "broker"}); err != nil || rep.Problem != "" {
		t.Fatalf("the broker's audit stream does not verify: %v %+v", err, rep)
	}
	code, out := ctl(t, nil, "who-has", "payments-prod/db#password", dir)
	want := fmt.Sprintf("payments-prod/db#password: newest version %d; 1 of 1 pods have it", ver.Refs["payments-prod/db#password"])
	if code != 0 || !strings.Contains(out, want) || !strings.Contains(out, "payments-prod/"+p.Name) || strings.Contains(out, "CANARY") {
		t.Fatalf("who-has: exit %d, want %q and the pod:\n%s", code, want, out)
	}
	t.Logf("db-dsn rendered anew; ..version %s; the pod's event: %s; who-has:\n%s", strings.TrimSpace(string(raw)), ev.Message, out)
}

// envNoValue: neither value is in the pod object, the namespace's events or any container log.
func (r *realNode) envNoValue(t *testing.T, p *corev1.Pod) {
	ctx := context.Background()
	cur, err := r.Kube.Client.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
	check(t, err)
	obj, _ := json.Marshal(cur)
	evs, err := r.Kube.Client.CoreV1().Events(p.Namespace).List(ctx, metav1.ListOptions{})
	check(t, err)
	evJSON, _ := json.Marshal(evs)
	all := string(obj) + string(evJSON)
	for _, c := range []string{"install-keyward-env", "app", "missing", "restarted", "signalled"} {
		l := r.containerLog(t, p, c)
		if l == "" && c != "install-keyward-env" {
			t.Errorf("no log of the %s container: the check below would prove nothing", c)
		}
		all += l
	}
	for _, v := range []string{prodCanary, rotatedValue} {
		if strings.Contains(all, v) {
			t.Errorf("a secret value is in the pod, its events or its logs")
		}
	}
	zero := int64(0)
	check(t, r.Kube.Client.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}))
}
