package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"

	"github.com/keyward/keyward/csi"
	"github.com/keyward/keyward/csi/tmpfs"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/test/harness"
)

// ambiguity is a published pod whose files must survive every fault that does not withdraw its
// access for certain.
type ambiguity struct {
	e      *brokerEnv
	d      *driver
	pod    *corev1.Pod
	target string
}

// The files a running pod holds survive everything that does not withdraw its access for certain:
// Vault down, Vault's own policy refusing, Vault unable to review tokens (a broken reviewer JWT), the
// apiserver down. Each refused republish answers with a retryable code and is audited; kubelet's
// next republish after the fault mends succeeds. (Before, Vault's 401/403/400 and a token the
// apiserver rejected cleared the files of every running pod within one republish period.)
func TestRepublishKeepsFilesThroughAmbiguousFailures(t *testing.T) {
	e := newBrokerEnv(t)
	a := &ambiguity{e: e, d: startDriver(t, e, driverOptions{config: "refusalAuditBurst: 1000\n"}), pod: e.pods["payments-prod"]}
	a.target = a.d.kl.target(t, a.pod)
	if err := a.d.kl.publish(t, a.pod, csiSecrets, ""); err != nil {
		t.Fatal(err)
	}
	runSteps(t,
		step{"Vault stopped, then back", a.vaultDown},
		step{"Vault's policy refuses the read", a.vaultPolicyRefuses},
		step{"Vault's reviewer JWT broken", a.reviewerBroken},
		step{"the apiserver restarted", a.apiserverRestart},
		step{"every refusal is audited", a.audited},
	)
}

func (a *ambiguity) kept(t *testing.T) {
	t.Helper()
	files, err := tmpfs.Read(a.target)
	if err != nil || len(files) != 2 || string(files[1].Data) != prodCanary {
		t.Fatalf("the pod's files are gone or changed: %d files, %v", len(files), err)
	}
}

func (a *ambiguity) refused(t *testing.T, want codes.Code) {
	t.Helper()
	if err := a.d.kl.publish(t, a.pod, csiSecrets, ""); status.Code(err) != want {
		t.Fatalf("republish %v, want %s", err, want)
	}
	a.kept(t)
}

func (a *ambiguity) mended(t *testing.T) {
	t.Helper()
	eventually(t, 30*time.Second, "republish after the fault mends", func() error { return a.d.kl.publish(t, a.pod, csiSecrets, "") })
	a.kept(t)
}

// Vault down, then back (a new dev server: every token it issued is gone).
func (a *ambiguity) vaultDown(t *testing.T) {
	a.e.vault.Stop()
	a.refused(t, codes.Unavailable)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := a.e.vault.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	provisionVault(t, a.e.vault, a.e.kube)
	a.mended(t)
}

// A Vault admin's mistake: the environment's policy no longer lets the role read. The token Vault
// refused is revoked, not left to its TTL: only the fresh login's token lives.
func (a *ambiguity) vaultPolicyRefuses(t *testing.T) {
	ctx := context.Background()
	if err := a.e.vault.Client.Sys().PutPolicyWithContext(ctx, "prod-read", `path "kv/data/nothing/*" { capabilities = ["read"] }`); err != nil {
		t.Fatal(err)
	}
	a.refused(t, codes.PermissionDenied)
	wantPodTokens(t, a.e.vault, 1, "one live pod token after a refused read and a fresh login")
	if err := a.e.vault.PutEnvironmentPolicy(ctx, "kubernetes", "kv", "prod"); err != nil {
		t.Fatal(err)
	}
	a.mended(t)
}

// Vault cannot review pod tokens any more (its reviewer JWT is wrong, as an expired one would be):
// every login fails. The pod's Vault token is revoked first so the driver must log in again.
func (a *ambiguity) reviewerBroken(t *testing.T) {
	ctx := context.Background()
	garbage, err := a.e.kube.SignToken(harness.TokenClaims{Namespace: "kube-system", ServiceAccount: "vault-auth-kubernetes",
		Audiences: []string{harness.DefaultIssuer}, Expiry: time.Now().Add(-time.Hour)}, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.e.vault.KubernetesAuthReviewer(ctx, "kubernetes", a.e.kube, garbage); err != nil {
		t.Fatal(err)
	}
	revokePodTokens(t, a.e.vault)
	a.refused(t, codes.Unavailable)
	reviewer, err := a.e.kube.ServiceAccountToken(ctx, "kube-system", "vault-auth-kubernetes", nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.e.vault.KubernetesAuthReviewer(ctx, "kubernetes", a.e.kube, reviewer); err != nil {
		t.Fatal(err)
	}
	a.mended(t)
}

// The apiserver restarts: while it is down, TokenReview fails. (kubelet's token is minted first;
// the driver's cache of positive reviews lasts 1s.)
func (a *ambiguity) apiserverRestart(t *testing.T) {
	tok, err := a.e.kube.PodToken(context.Background(), a.pod, []string{audience}, 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	a.e.kube.Stop()
	time.Sleep(1500 * time.Millisecond)
	if err := a.d.kl.publishWith(t, a.pod, tok, csiSecrets, ""); status.Code(err) != codes.Unavailable {
		t.Fatalf("apiserver down: republish %v, want Unavailable", err)
	}
	a.kept(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := a.e.kube.Start(ctx); err != nil {
		t.Fatal(err)
	}
	a.mended(t)
}

// Every refused republish is in the audit log, with the pod and the reason.
func (a *ambiguity) audited(t *testing.T) {
	byCode := map[string]int{}
	for _, r := range a.d.records(t) {
		if r.Decision != audit.Allowed && r.Subject.PodUID == string(a.pod.UID) {
			byCode[r.Code]++
		}
	}
	if byCode["Unavailable"] < 3 || byCode["PermissionDenied"] < 1 {
		t.Fatalf("refused republishes audited by code: %v", byCode)
	}
	if code, out := ctl(t, nil, "audit", "verify", a.d.auditLog, "--key-file", a.d.key); code != 0 {
		t.Fatalf("audit verify: %s", out)
	}
}

// refusals sends requests a kubelet would not, and a flood, to a driver with a small refusal burst.
type refusals struct {
	e       *brokerEnv
	d       *driver
	metrics string
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
	r := &refusals{e: e, metrics: fmt.Sprintf("127.0.0.1:%d", port)}
	r.d = startDriver(t, e, driverOptions{config: "refusalAuditBurst: 3\nrefusalAuditInterval: 1s\n", metrics: r.metrics})
	if _, err := e.vault.PutKV(context.Background(), "kv", "prod/payments-prod/big", map[string]any{"blob": strings.Repeat("B", 2<<20)}); err != nil {
		t.Fatal(err)
	}
	runSteps(t,
		step{"each kind of refusal is refused, audited, and leaves nothing", r.eachKind},
		step{"a flood is rate-limited and counted", r.flood},
		step{"the metrics and the logs", r.metricsAndLogs},
	)
}

// request publishes a volume of p (in payments-prod) as kubelet would, changed by mutate.
func (r *refusals) request(t *testing.T, p *corev1.Pod, mutate func(*csipb.NodePublishVolumeRequest)) error {
	t.Helper()
	tok, err := r.e.kube.PodToken(context.Background(), p, []string{audience}, 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	tokens, _ := json.Marshal(map[string]map[string]string{audience: {"token": tok}})
	req := &csipb.NodePublishVolumeRequest{
		VolumeId: "csi-" + string(p.UID), TargetPath: r.d.kl.target(t, p), Readonly: true,
		VolumeCapability: &csipb.VolumeCapability{AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{}}},
		VolumeContext: map[string]string{csi.AttrSecrets: csiSecrets, csi.AttrTokens: string(tokens), csi.AttrPodName: p.Name,
			csi.AttrPodNamespace: p.Namespace, csi.AttrPodUID: string(p.UID), csi.AttrSAName: "api"},
	}
	mutate(req)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err = r.d.kl.node.NodePublishVolume(ctx, req)
	return err
}

type refusalCase struct {
	name   string
	pod    *corev1.Pod
	mutate func(*csipb.NodePublishVolumeRequest)
	code   codes.Code
	reason string
}

func (r *refusals) cases(t *testing.T) []refusalCase {
	pod := func(name, node string) *corev1.Pod { return r.e.newPodOn(t, "payments-prod", name, node) }
	aud := pod("wa", "node-1")
	wrong, err := r.e.kube.PodToken(context.Background(), aud, []string{"vault"}, 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	wrongTokens, _ := json.Marshal(map[string]map[string]string{"vault": {"token": wrong}})
	set := func(k, v string) func(*csipb.NodePublishVolumeRequest) {
		return func(req *csipb.NodePublishVolumeRequest) { req.VolumeContext[k] = v }
	}
	return []refusalCase{
		{"writable volume", pod("w", "node-1"), func(req *csipb.NodePublishVolumeRequest) { req.Readonly = false }, codes.InvalidArgument, "readOnly: true"},
		{"no token", pod("nt", "node-1"), func(req *csipb.NodePublishVolumeRequest) { delete(req.VolumeContext, csi.AttrTokens) }, codes.Unauthenticated, "tokenRequests"},
		{"token for another audience", aud, set(csi.AttrTokens, string(wrongTokens)), codes.Unauthenticated, "audience"},
		{"malformed secrets", pod("ms", "node-1"), set(csi.AttrSecrets, "- {ref: ["), codes.InvalidArgument, "secrets"},
		{"traversal ref", pod("tr", "node-1"), set(csi.AttrSecrets, "- {ref: ../prod/x, key: k, file: f}"), codes.InvalidArgument, "ref"},
		{"oversized attribute", pod("oa", "node-1"), set(csi.AttrSecrets, csiSecrets+"\n#"+strings.Repeat("x", csi.MaxAttributeBytes)), codes.InvalidArgument, "max"},
		{"target outside kubelet's pods", pod("to", "node-1"), func(req *csipb.NodePublishVolumeRequest) { req.TargetPath = "/tmp/keyward-attack/mount" }, codes.InvalidArgument, "target_path"},
		{"token of a pod on another node", pod("on", "node-2"), func(*csipb.NodePublishVolumeRequest) {}, codes.PermissionDenied, `node "node-2"`},
		{"secret larger than the volume", pod("big", "node-1"), set(csi.AttrSecrets, "- {ref: payments-prod/big, key: blob, file: blob}"), codes.ResourceExhausted, "larger than"},
	}
}

func (r *refusals) eachKind(t *testing.T) {
	cases := r.cases(t)
	for _, tc := range cases {
		err := r.request(t, tc.pod, tc.mutate)
		if status.Code(err) != tc.code || !strings.Contains(status.Convert(err).Message(), tc.reason) {
			t.Errorf("%s: %v, want %s mentioning %q", tc.name, err, tc.code, tc.reason)
		}
		if _, serr := os.Stat(r.d.kl.target(t, tc.pod)); !os.IsNotExist(serr) {
			t.Errorf("%s: a refused publish left the target behind", tc.name)
		}
	}
	recs := r.d.records(t)
	for _, tc := range cases {
		found := false
		for _, rec := range recs {
			found = found || (rec.Subject.PodUID == string(tc.pod.UID) && rec.Decision == audit.Denied && rec.Code == tc.code.String() &&
				strings.Contains(rec.Reason, tc.reason) && rec.Type != "")
		}
		if !found {
			t.Errorf("%s: no audit record with the pod and the reason", tc.name)
		}
	}
	// The same secret, allowed in a volume large enough.
	if err := r.request(t, cases[len(cases)-1].pod, func(req *csipb.NodePublishVolumeRequest) {
		req.VolumeContext[csi.AttrSecrets] = "- {ref: payments-prod/big, key: blob, file: blob}"
		req.VolumeContext[csi.AttrSizeLimit] = fmt.Sprint(4 << 20)
	}); err != nil {
		t.Fatalf("a 2 MiB secret in a 4 MiB volume: %v", err)
	}
}

// A crash-looping pod: of 40 refusals in a row, at most the burst (3) plus one per interval that
// passed are recorded, and every other one is counted by the next record of the pod: records plus
// their suppressed counts account for every refusal. (The count is what must hold; how many
// intervals pass during the flood depends on the machine's load, so the bound uses the time it took.)
func (r *refusals) flood(t *testing.T) {
	flood := r.e.newPodOn(t, "payments-prod", "flood", "node-1")
	writable := func(req *csipb.NodePublishVolumeRequest) { req.Readonly = false }
	start := time.Now()
	for range 40 {
		r.request(t, flood, writable)
	}
	took := time.Since(start)
	of := func() (recs []audit.Record) {
		for _, rec := range r.d.records(t) {
			if rec.Subject.PodUID == string(flood.UID) {
				recs = append(recs, rec)
			}
		}
		return recs
	}
	if n, most := len(of()), 3+int(took/time.Second)+1; n > most {
		t.Fatalf("%d records for 40 refusals of one pod in %s with a burst of 3 and one per 1s: at most %d", n, took.Round(time.Millisecond), most)
	}
	time.Sleep(1100 * time.Millisecond)
	r.request(t, flood, writable)
	recs := of()
	accounted := 0
	for _, rec := range recs {
		accounted += 1 + rec.Suppressed
	}
	if accounted != 41 || recs[len(recs)-1].Suppressed == 0 {
		t.Fatalf("%d records account for %d of 41 refusals (the last counts %d suppressed)", len(recs), accounted, recs[len(recs)-1].Suppressed)
	}
}

// The metrics say so too, and that volumes are kept out of swap (this kernel has noswap); no token
// reached the audit log or the driver's log.
func (r *refusals) metricsAndLogs(t *testing.T) {
	resp, err := http.Get("http://" + r.metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{"keyward_broker_tmpfs_noswap 1", "keyward_broker_swap_active ", "keyward_broker_publishes_in_flight 0",
		"keyward_broker_refusal_records_suppressed_total ", `keyward_broker_publishes_total{code="InvalidArgument",result="refused"} `,
		`keyward_broker_publishes_total{code="Unauthenticated",result="refused"} `, `keyward_broker_publish_duration_seconds_count{result="refused"} `,
		`keyward_broker_tokenreview_duration_seconds_count{result="ok"} `, `keyward_broker_vault_request_duration_seconds_count{code="OK",op="login"} `,
		"keyward_broker_policy_generation 1",
		"keyward_broker_volumes ", "keyward_broker_pod_vault_tokens ", "keyward_audit_write_failures_total 0"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	if code, out := ctl(t, nil, "audit", "verify", r.d.auditLog, "--key-file", r.d.key); code != 0 {
		t.Fatalf("audit verify: %s", out)
	}
	if strings.Contains(readFile(t, r.d.auditLog), "eyJ") || strings.Contains(readFile(t, r.d.proc.log), "eyJ") {
		t.Fatal("a token reached the audit log or the driver log")
	}
}
