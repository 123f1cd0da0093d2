package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keyward/keyward/internal/apiserver/apitest"
	"github.com/keyward/keyward/internal/audit"
	adminv1 "github.com/keyward/keyward/proto/keyward/admin/v1"
	"github.com/keyward/keyward/test/harness"
)

// The real keyward-broker, with --api-address, against the real apiserver and Vault: after a
// publish, its Admin service shows the live volume (pod, ref, the Vault version delivered), the
// pod's service-account Vault token by accessor hash, the policy and health; keywardctl volumes,
// who-has --live and status read them; and no answer carries the secret value, the Vault token or
// its accessor (canary scan of every Admin answer, with Vault's own list of live accessors);
// keywardctl audit follow reads and verifies the broker's stream (mount records in full, the rest
// elided) up to its newest record.
func TestBrokerAdminAPIShowsLiveVolumesAndNoSecrets(t *testing.T) {
	e := newBrokerEnv(t)
	pki := apitest.New(t, harness.Dir(t))
	port, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	d := startDriver(t, e, driverOptions{args: []string{"--api-address", addr, "--api-tls-cert", pki.ServerCert, "--api-tls-key", pki.ServerKey,
		"--api-client-ca", pki.CAFile, "--api-audit-readers", "keyward-security-team", "--api-admins", "keyward-operator"}})
	pod := e.pods["payments-prod"]
	if err := d.kl.publish(t, pod, csiSecrets, ""); err != nil {
		t.Fatal(err)
	}
	op, opKey := pki.Client("keyward-operator")
	api := []string{"--addr", addr, "--server-name", "localhost", "--ca", pki.CAFile, "--cert", op, "--key", opKey}

	code, out := ctl(t, nil, append([]string{"volumes"}, api...)...)
	if code != 0 || !strings.Contains(out, "payments-prod/api-0") || !strings.Contains(out, "payments-prod/db#password") {
		t.Fatalf("keywardctl volumes: %d\n%s", code, out)
	}
	code, out = ctl(t, nil, append([]string{"who-has", "payments-prod/db#password", "--live"}, api...)...)
	if code != 0 || !strings.Contains(out, "payments-prod/api-0") || !strings.Contains(out, "1 of 1 pods have it") {
		t.Fatalf("keywardctl who-has --live: %d\n%s", code, out)
	}
	code, out = ctl(t, nil, append([]string{"status"}, api...)...)
	if code != 0 || !strings.Contains(out, "node-1") || !strings.Contains(out, "gen ") || !strings.Contains(out, "1 (pod mode)") {
		t.Fatalf("keywardctl status: %d\n%s", code, out)
	}
	t.Logf("keywardctl status:\n%s", out)

	// Every Admin answer, scanned for the secret value, every live Vault token accessor, and tokens.
	pem, _ := os.ReadFile(pki.CAFile)
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	kp, _ := tls.LoadX509KeyPair(op, opKey)
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, Certificates: []tls.Certificate{kp},
		ServerName: "localhost", MinVersion: tls.VersionTLS13})))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	c := adminv1.NewAdminClient(cc)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var answers []proto.Message
	for _, call := range []func() (proto.Message, error){
		func() (proto.Message, error) { return c.ListVolumes(ctx, &adminv1.ListVolumesRequest{}) },
		func() (proto.Message, error) { return c.ListVaultTokens(ctx, &adminv1.ListVaultTokensRequest{}) },
		func() (proto.Message, error) { return c.GetPolicy(ctx, &adminv1.GetPolicyRequest{}) },
		func() (proto.Message, error) { return c.GetHealth(ctx, &adminv1.GetHealthRequest{}) },
	} {
		m, err := call()
		if err != nil {
			t.Fatal(err)
		}
		answers = append(answers, m)
	}
	canaries := []string{prodCanary, "hvs.", "hvb."}
	list, err := e.vault.Client.Logical().List("auth/token/accessors")
	if err != nil || list == nil {
		t.Fatalf("listing Vault's token accessors: %v", err)
	}
	keys, _ := list.Data["keys"].([]any)
	for _, k := range keys {
		canaries = append(canaries, fmt.Sprint(k))
	}
	if len(keys) < 2 { // the root token's and the pod's service account's
		t.Fatalf("Vault lists %d accessors", len(keys))
	}
	for _, m := range answers {
		js := protojson.Format(m)
		for _, c := range canaries {
			if strings.Contains(js, c) {
				t.Errorf("an Admin answer carries %q: %s", c, js)
			}
		}
	}
	vols := answers[0].(*adminv1.ListVolumesResponse).GetVolumes()
	toks := answers[1].(*adminv1.ListVaultTokensResponse).GetTokens()
	if len(vols) != 1 || vols[0].GetPodUid() != string(pod.UID) || vols[0].GetRefs()[0].GetVaultVersion() != 1 ||
		len(toks) != 1 || toks[0].GetNamespace() != "payments-prod" || len(toks[0].GetAccessorSha256()) != 12 {
		t.Fatalf("volumes %v, tokens %v", vols, toks)
	}
	// keywardctl finds the nodes through the EndpointSlices of the broker's API Service, as in a
	// cluster (deploy/components/api). The apiserver refuses loopback addresses in EndpointSlices
	// and this test dials nothing else, so it checks what keywardctl resolves (keywardctl nodes),
	// with a documentation address (TEST-NET-1) that is never dialed.
	if _, err := e.kube.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "keyward-system"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	portName, ready, notReady := "api", true, false
	nodeA, nodeB := "node-1", "node-2"
	p32 := int32(9443)
	if _, err := e.kube.Client.DiscoveryV1().EndpointSlices("keyward-system").Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "keyward-broker-api-1", Labels: map[string]string{discoveryv1.LabelServiceName: "keyward-broker-api"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"192.0.2.10"}, NodeName: &nodeA, Conditions: discoveryv1.EndpointConditions{Ready: &ready}},
			{Addresses: []string{"192.0.2.11"}, NodeName: &nodeB, Conditions: discoveryv1.EndpointConditions{Ready: &notReady}}},
		Ports: []discoveryv1.EndpointPort{{Name: &portName, Port: &p32}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	kubeconfig, err := e.kube.WriteKubeconfig(harness.Dir(t)+"/kubeconfig", "")
	if err != nil {
		t.Fatal(err)
	}
	if code, out := ctl(t, nil, "nodes", "--kubeconfig", kubeconfig); code != 0 || !strings.Contains(out, "node-1  192.0.2.10:9443") || strings.Contains(out, "node-2") {
		t.Fatalf("keywardctl nodes: %d\n%s", code, out)
	}
	if code, out := ctl(t, nil, "volumes", "--node", "node-2", "--kubeconfig", kubeconfig); code != 1 || !strings.Contains(out, `no ready endpoint of the broker's API on node "node-2"`) {
		t.Fatalf("keywardctl volumes --node node-2 (not ready): %d\n%s", code, out)
	}

	// The broker's own audit stream, followed and verified by keywardctl up to the newest record.
	key, _ := audit.ReadKey(d.key)
	rep, err := audit.VerifyDir(d.auditLog, audit.VerifyOptions{Key: key, Node: "node-1", Stream: "broker"})
	if err != nil {
		t.Fatal(err)
	}
	reader, readerKey := pki.Client("keyward-security-team")
	code, out = ctl(t, nil, "audit", "follow", "--node", "node-1", "--key-file", d.key, "--until-seq", fmt.Sprint(rep.LastSeq), "--event", "mount",
		"--addr", addr, "--server-name", "localhost", "--ca", pki.CAFile, "--cert", reader, "--key", readerKey)
	if code != 0 || !strings.Contains(out, `"event":"mount"`) || !strings.Contains(out, `"pod":"api-0"`) || strings.Contains(out, prodCanary) {
		t.Fatalf("keywardctl audit follow on the broker: %d\n%s", code, out)
	}

	if err := d.kl.unpublish(t, pod); err != nil {
		t.Fatal(err)
	}
	if code, out := ctl(t, nil, append([]string{"volumes"}, api...)...); code != 0 || strings.Contains(out, "payments-prod/api-0") {
		t.Fatalf("after unpublish, keywardctl volumes: %d\n%s", code, out)
	}
}
