package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"

	"github.com/keyward/keyward/csi"
	"github.com/keyward/keyward/csi/tmpfs"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/test/harness"
)

// driver is keyward-broker, the binary, serving CSI to a simulated kubelet.
type driver struct {
	proc               *proc
	kl                 *kubelet
	dir, auditLog, key string
}

// startDriver starts keyward-broker as node-1 against the env's apiserver and Vault, with extra
// lines appended to its config file and metrics on metrics ("": off).
func startDriver(t *testing.T, e *brokerEnv, extraConfig, metrics string) *driver {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("the CSI e2e tests mount tmpfs and need root, as the node plugin does")
	}
	dir := harness.Dir(t)
	policyPath := filepath.Join(dir, "policy.yaml")
	os.WriteFile(policyPath, []byte(brokerPolicy), 0o600)
	kubeconfig, err := e.kube.WriteKubeconfig(filepath.Join(dir, "kubeconfig"), "")
	if err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "broker.yaml")
	os.WriteFile(cfgPath, []byte(fmt.Sprintf("policyFile: %s\ntokenReviewCacheTTL: 1s\nvault:\n  address: %s\n  allowInsecureHTTP: true\n%s",
		policyPath, e.vault.Addr, extraConfig)), 0o600)
	d := &driver{dir: dir, auditLog: filepath.Join(dir, "broker-audit.log"), key: filepath.Join(dir, "audit.key")}
	os.WriteFile(d.key, []byte(strings.Repeat("h", 40)), 0o600)
	sock := filepath.Join(dir, "csi.sock")
	d.proc = start(t, nil, filepath.Join(dir, "keyward-broker.log"), "keyward-broker", "--csi-socket", sock, "--node-id", "node-1",
		"--kubelet-dir", filepath.Join(dir, "kubelet"), "--metrics-address", metrics, "--config", cfgPath, "--kubeconfig", kubeconfig,
		"--audit-log", d.auditLog, "--audit-key-file", d.key, "--log-level", "debug")
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	d.kl = &kubelet{t: t, e: e, node: csipb.NewNodeClient(conn), id: csipb.NewIdentityClient(conn), root: filepath.Join(dir, "kubelet")}
	t.Cleanup(func() { tmpfs.UnmountAllUnder(d.kl.root) })
	eventually(t, 30*time.Second, "driver ready", func() error {
		if d.proc.exited() {
			t.Fatalf("driver exited: %s", readFile(t, d.proc.log))
		}
		r, err := d.kl.id.Probe(context.Background(), &csipb.ProbeRequest{})
		if err != nil || !r.GetReady().GetValue() {
			return fmt.Errorf("probe %v %v", r, err)
		}
		return nil
	})
	return d
}

// records reads the driver's audit log back.
func (d *driver) records(t *testing.T) []audit.Record {
	t.Helper()
	f, err := os.Open(d.auditLog)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	recs, err := audit.Query(f, audit.Filter{})
	if err != nil {
		t.Fatal(err)
	}
	return recs
}

// The files a running pod holds survive everything that does not withdraw its access for certain:
// Vault down, Vault's own policy refusing, Vault unable to review tokens (a broken reviewer JWT), the
// apiserver down. Each refused republish answers with a retryable code and is audited; kubelet's
// next republish after the fault mends succeeds. (Before, Vault's 401/403/400 and a token the
// apiserver rejected cleared the files of every running pod within one republish period.)
func TestRepublishKeepsFilesThroughAmbiguousFailures(t *testing.T) {
	e := newBrokerEnv(t)
	d := startDriver(t, e, "refusalAuditBurst: 1000\n", "")
	ctx := context.Background()
	pod := e.pods["payments-prod"]
	target := d.kl.target(pod)
	if err := d.kl.publish(pod, csiSecrets, ""); err != nil {
		t.Fatal(err)
	}
	kept := func(step string) {
		t.Helper()
		files, err := tmpfs.Read(target)
		if err != nil || len(files) != 2 || string(files[1].Data) != prodCanary {
			t.Fatalf("%s: the pod's files are gone or changed: %d files, %v", step, len(files), err)
		}
	}
	refused := func(step string, want codes.Code) {
		t.Helper()
		err := d.kl.publish(pod, csiSecrets, "")
		if status.Code(err) != want {
			t.Fatalf("%s: republish %v, want %s", step, err, want)
		}
		kept(step)
	}
	mended := func(step string) {
		t.Helper()
		eventually(t, 30*time.Second, step, func() error { return d.kl.publish(pod, csiSecrets, "") })
		kept(step)
	}

	// Vault down, then back (a new dev server: every token it issued is gone).
	e.vault.Stop()
	refused("vault stopped", codes.Unavailable)
	rctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := e.vault.Restart(rctx); err != nil {
		t.Fatal(err)
	}
	provisionVault(t, e.vault, e.kube)
	mended("vault back")

	// A Vault admin's mistake: the environment's policy no longer lets the role read.
	if err := e.vault.Client.Sys().PutPolicyWithContext(ctx, "prod-read", `path "kv/data/nothing/*" { capabilities = ["read"] }`); err != nil {
		t.Fatal(err)
	}
	refused("Vault policy refuses the read", codes.PermissionDenied)
	// The token Vault refused was revoked, not left to its TTL: only the fresh login's token lives.
	wantPodTokens(t, e.vault, 1, "one live pod token after a refused read and a fresh login")
	if err := e.vault.Client.Sys().PutPolicyWithContext(ctx, "prod-read", `path "kv/data/prod/*" { capabilities = ["read"] }`); err != nil {
		t.Fatal(err)
	}
	mended("Vault policy mended")

	// Vault cannot review pod tokens any more (its reviewer JWT is wrong, as an expired one would be):
	// every login fails. The pod's Vault token is revoked first so the driver must log in again.
	garbage, err := e.kube.SignToken(harness.TokenClaims{Namespace: "kube-system", ServiceAccount: "vault-auth-kubernetes",
		Audiences: []string{harness.DefaultIssuer}, Expiry: time.Now().Add(-time.Hour)}, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.vault.KubernetesAuthReviewer(ctx, "kubernetes", e.kube, garbage); err != nil {
		t.Fatal(err)
	}
	revokePodTokens(t, e.vault)
	refused("Vault's reviewer JWT broken", codes.Unavailable)
	reviewer, err := e.kube.ServiceAccountToken(ctx, "kube-system", "vault-auth-kubernetes", nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.vault.KubernetesAuthReviewer(ctx, "kubernetes", e.kube, reviewer); err != nil {
		t.Fatal(err)
	}
	mended("Vault's reviewer JWT mended")

	// The apiserver restarts: while it is down, TokenReview fails. (kubelet's token is minted first;
	// the driver's cache of positive reviews lasts 1s.)
	tok, err := e.kube.PodToken(ctx, pod, []string{audience}, 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	e.kube.Stop()
	time.Sleep(1500 * time.Millisecond)
	if err := d.kl.publishWith(pod, tok, csiSecrets, ""); status.Code(err) != codes.Unavailable {
		t.Fatalf("apiserver down: republish %v, want Unavailable", err)
	}
	kept("apiserver down")
	sctx, scancel := context.WithTimeout(ctx, 2*time.Minute)
	defer scancel()
	if err := e.kube.Start(sctx); err != nil {
		t.Fatal(err)
	}
	mended("apiserver back")

	// Every refused republish is in the audit log, with the pod and the reason.
	byCode := map[string]int{}
	for _, r := range d.records(t) {
		if r.Decision != "allow" && r.Subject.PodUID == string(pod.UID) {
			byCode[r.Code]++
		}
	}
	if byCode["Unavailable"] < 3 || byCode["PermissionDenied"] < 1 {
		for _, r := range d.records(t) {
			t.Logf("%s %s %s %s %s", r.Type, r.Decision, r.Code, r.Subject.PodUID, r.Reason)
		}
		t.Fatalf("refused republishes audited by code: %v", byCode)
	}
	if code, out := ctl(t, nil, "audit", "verify", d.auditLog, "--key-file", d.key); code != 0 {
		t.Fatalf("audit verify: %s", out)
	}
}

// revokePodTokens revokes every Vault token a kubernetes-auth login issued.
func revokePodTokens(t *testing.T, v *harness.Vault) {
	t.Helper()
	list, err := v.Client.Logical().List("auth/token/accessors")
	if err != nil || list == nil {
		t.Fatalf("listing token accessors: %v", err)
	}
	keys, _ := list.Data["keys"].([]any)
	for _, k := range keys {
		l, err := v.Client.Logical().Write("auth/token/lookup-accessor", map[string]any{"accessor": k})
		if err != nil || l == nil {
			continue
		}
		if p, _ := l.Data["path"].(string); strings.HasPrefix(p, "auth/kubernetes/login") {
			if _, err := v.Client.Logical().Write("auth/token/revoke-accessor", map[string]any{"accessor": k}); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// Every refused publish leaves one audit record with the claimed pod and the reason, whatever stage
// refused it (before, refusals before the broker's Fetch left none); a flood from one pod is
// rate-limited and the next record counts what was suppressed. Also: a token of a pod on another
// node is refused, and a secret larger than its volume is refused before it is held whole.
func TestEveryRefusalIsAudited(t *testing.T) {
	e := newBrokerEnv(t)
	port, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	metrics := fmt.Sprintf("127.0.0.1:%d", port)
	d := startDriver(t, e, "refusalAuditBurst: 3\nrefusalAuditInterval: 1s\n", metrics)
	ctx := context.Background()
	kl := d.kl
	if _, err := e.vault.PutKV(ctx, "kv", "prod/payments-prod/big", map[string]any{"blob": strings.Repeat("B", 2<<20)}); err != nil {
		t.Fatal(err)
	}
	pod := func(name, node string) *corev1.Pod {
		p, err := e.kube.CreatePod(ctx, "payments-prod", name, "api", node)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	request := func(p *corev1.Pod, mutate func(*csipb.NodePublishVolumeRequest)) error {
		tok, err := e.kube.PodToken(ctx, p, []string{audience}, 10*time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		tokens, _ := json.Marshal(map[string]map[string]string{audience: {"token": tok}})
		req := &csipb.NodePublishVolumeRequest{
			VolumeId: "csi-" + string(p.UID), TargetPath: kl.target(p), Readonly: true,
			VolumeCapability: &csipb.VolumeCapability{AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{}}},
			VolumeContext: map[string]string{csi.AttrSecrets: csiSecrets, csi.AttrTokens: string(tokens), csi.AttrPodName: p.Name,
				csi.AttrPodNamespace: p.Namespace, csi.AttrPodUID: string(p.UID), csi.AttrSAName: "api"},
		}
		mutate(req)
		cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		_, err = kl.node.NodePublishVolume(cctx, req)
		return err
	}
	wrongAud := func(p *corev1.Pod) string {
		tok, err := e.kube.PodToken(ctx, p, []string{"vault"}, 10*time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := json.Marshal(map[string]map[string]string{"vault": {"token": tok}})
		return string(b)
	}
	cases := []struct {
		name   string
		pod    *corev1.Pod
		mutate func(*csipb.NodePublishVolumeRequest)
		code   codes.Code
		reason string
	}{
		{"writable volume", pod("w", "node-1"), func(r *csipb.NodePublishVolumeRequest) { r.Readonly = false }, codes.InvalidArgument, "readOnly: true"},
		{"no token", pod("nt", "node-1"), func(r *csipb.NodePublishVolumeRequest) { delete(r.VolumeContext, csi.AttrTokens) }, codes.Unauthenticated, "tokenRequests"},
		{"token for another audience", pod("wa", "node-1"), nil, codes.Unauthenticated, "audience"},
		{"malformed secrets", pod("ms", "node-1"), func(r *csipb.NodePublishVolumeRequest) { r.VolumeContext[csi.AttrSecrets] = "- {ref: [" }, codes.InvalidArgument, "secrets"},
		{"traversal ref", pod("tr", "node-1"), func(r *csipb.NodePublishVolumeRequest) {
			r.VolumeContext[csi.AttrSecrets] = "- {ref: ../prod/x, key: k, file: f}"
		}, codes.InvalidArgument, "ref"},
		{"oversized attribute", pod("oa", "node-1"), func(r *csipb.NodePublishVolumeRequest) {
			r.VolumeContext[csi.AttrSecrets] += "\n#" + strings.Repeat("x", csi.MaxAttributeBytes)
		}, codes.InvalidArgument, "max"},
		{"target outside kubelet's pods", pod("to", "node-1"), func(r *csipb.NodePublishVolumeRequest) { r.TargetPath = "/tmp/keyward-attack/mount" }, codes.InvalidArgument, "target_path"},
		{"token of a pod on another node", pod("on", "node-2"), func(r *csipb.NodePublishVolumeRequest) {}, codes.PermissionDenied, `node "node-2"`},
		{"secret larger than the volume", pod("big", "node-1"), func(r *csipb.NodePublishVolumeRequest) {
			r.VolumeContext[csi.AttrSecrets] = "- {ref: payments-prod/big, key: blob, file: blob}"
		}, codes.ResourceExhausted, "larger than"},
	}
	for i := range cases {
		if cases[i].name == "token for another audience" {
			p := cases[i].pod
			tokens := wrongAud(p)
			cases[i].mutate = func(r *csipb.NodePublishVolumeRequest) { r.VolumeContext[csi.AttrTokens] = tokens }
		}
	}
	for _, tc := range cases {
		err := request(tc.pod, tc.mutate)
		if status.Code(err) != tc.code || !strings.Contains(status.Convert(err).Message(), tc.reason) {
			t.Errorf("%s: %v, want %s mentioning %q", tc.name, err, tc.code, tc.reason)
		}
		if _, serr := os.Stat(kl.target(tc.pod)); !os.IsNotExist(serr) {
			t.Errorf("%s: a refused publish left the target behind", tc.name)
		}
	}
	recs := d.records(t)
	for _, tc := range cases {
		found := false
		for _, r := range recs {
			found = found || (r.Subject.PodUID == string(tc.pod.UID) && r.Decision == "deny" && r.Code == tc.code.String() &&
				strings.Contains(r.Reason, tc.reason) && r.Type != "")
		}
		if !found {
			t.Errorf("%s: no audit record with the pod and the reason", tc.name)
		}
	}
	// The same volume, allowed in a volume large enough.
	if err := request(cases[len(cases)-1].pod, func(r *csipb.NodePublishVolumeRequest) {
		r.VolumeContext[csi.AttrSecrets] = "- {ref: payments-prod/big, key: blob, file: blob}"
		r.VolumeContext[csi.AttrSizeLimit] = fmt.Sprint(4 << 20)
	}); err != nil {
		t.Fatalf("a 2 MiB secret in a 4 MiB volume: %v", err)
	}

	// A crash-looping pod: 40 refusals in a row leave at most the burst (3) in the log; after the
	// interval, the next record counts the suppressed ones.
	flood := pod("flood", "node-1")
	writable := func(r *csipb.NodePublishVolumeRequest) { r.Readonly = false }
	for range 40 {
		request(flood, writable)
	}
	n := 0
	for _, r := range d.records(t) {
		if r.Subject.PodUID == string(flood.UID) {
			n++
		}
	}
	if n > 4 {
		t.Fatalf("%d records for 40 refusals of one pod with a burst of 3", n)
	}
	time.Sleep(1100 * time.Millisecond)
	request(flood, writable)
	var last audit.Record
	for _, r := range d.records(t) {
		if r.Subject.PodUID == string(flood.UID) {
			last = r
		}
	}
	if last.Suppressed < 30 {
		t.Fatalf("the record after the flood counts %d suppressed refusals", last.Suppressed)
	}
	// The metrics say so too, and that volumes are kept out of swap (this kernel has noswap).
	resp, err := http.Get("http://" + metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{"keyward_broker_tmpfs_noswap 1", "keyward_broker_swap_active ", "keyward_broker_publishes_in_flight 0",
		"keyward_broker_refusal_records_suppressed_total "} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	if code, out := ctl(t, nil, "audit", "verify", d.auditLog, "--key-file", d.key); code != 0 {
		t.Fatalf("audit verify: %s", out)
	}
	if strings.Contains(readFile(t, d.auditLog), "eyJ") || strings.Contains(readFile(t, d.proc.log), "eyJ") {
		t.Fatal("a token reached the audit log or the driver log")
	}
}
