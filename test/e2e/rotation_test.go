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

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyward/keyward/csi"
)

// Rotation the app and the operator can see, with keyward-broker (the binary), the simulated kubelet,
// the real apiserver and Vault: a republish that swaps a rotated secret writes the next ..version
// (the refs' Vault versions, no value) and posts SecretsRotated on the pod; a refused publish posts
// SecretsDenied with the text kubelet got; a restarted broker counts on from the volume; and
// keywardctl who-has reports which pod holds which version until every pod has the newest. The
// rotated value is in no event, no ..version and no who-has output.
func TestRotationIsVisibleToTheAppAndTheOperator(t *testing.T) {
	e := newBrokerEnv(t)
	d := startDriver(t, e, driverOptions{})
	ctx := context.Background()
	a, b := e.pods["payments-prod"], e.newPod(t, "payments-prod", "api-1")
	for _, p := range []*corev1.Pod{a, b} {
		if err := d.kl.publish(t, p, csiSecrets, ""); err != nil {
			t.Fatal(err)
		}
	}
	first := versionOf(t, d.kl.target(t, a))
	v0 := first.Refs["payments-prod/db#password"]
	if first.Version != 1 || v0 == 0 || first.Refs["shared/tls/ca#password"] == 0 || len(first.Refs) != 2 {
		t.Fatalf("..version after the first publish: %+v", first)
	}

	rotated := "CANARY-rotated-" + fmt.Sprint(time.Now().UnixNano())
	if _, err := e.vault.PutKV(ctx, "kv", "prod/payments-prod/db", map[string]any{"password": rotated}); err != nil {
		t.Fatal(err)
	}
	if err := d.kl.publish(t, a, csiSecrets, ""); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, filepath.Join(d.kl.target(t, a), "db-password")); got != rotated {
		t.Fatalf("the rotated value did not reach the file: %.30q", got)
	}
	second := versionOf(t, d.kl.target(t, a))
	if second.Version != 2 || second.Refs["payments-prod/db#password"] != v0+1 {
		t.Fatalf("..version after the rotation: %+v", second)
	}
	wantMsg := fmt.Sprintf("secrets volume swapped, ..version 2: payments-prod/db#password version %d -> %d", v0, v0+1)
	waitEvent(t, e, a, "SecretsRotated", wantMsg)

	// The operator: pod b still has the old version; after its republish, every pod has the newest.
	whoHas := func(want ...string) string {
		t.Helper()
		code, out := ctl(t, nil, "who-has", "payments-prod/db#password", d.auditLog)
		if code != 0 {
			t.Fatalf("who-has: %d %s", code, out)
		}
		for _, w := range want {
			if !strings.Contains(out, w) {
				t.Fatalf("who-has lacks %q:\n%s", w, out)
			}
		}
		return out
	}
	out := whoHas(fmt.Sprintf("newest version %d; 1 of 2 pods have it", v0+1))
	t.Logf("who-has before pod b's republish:\n%s", out)
	if err := d.kl.publish(t, b, csiSecrets, ""); err != nil {
		t.Fatal(err)
	}
	out += whoHas(fmt.Sprintf("newest version %d; 2 of 2 pods have it", v0+1))
	code, js := ctl(t, nil, "who-has", "payments-prod/db#password", d.auditLog, "-o", "json")
	var res []struct {
		Newest int `json:"newest"`
		Pods   []struct {
			Pod     string `json:"pod"`
			Version int    `json:"version"`
			Newest  bool   `json:"newest"`
		} `json:"pods"`
	}
	if err := json.Unmarshal([]byte(js), &res); code != 0 || err != nil || len(res) != 1 || len(res[0].Pods) != 2 || !res[0].Pods[0].Newest || !res[0].Pods[1].Newest {
		t.Fatalf("who-has -o json: %d %v %s", code, err, js)
	}
	out += js

	// A refused publish: the pod hears why, in the words kubelet got.
	c := e.newPod(t, "payments-prod", "api-2")
	err := d.kl.publish(t, c, "- {ref: payments-dev/db, key: password, file: pw}\n", "")
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("a publish of another namespace's secret: %v", err)
	}
	waitEvent(t, e, c, "SecretsDenied", "publish refused: "+status.Convert(err).Message())

	// A restarted broker counts on from the volume: an unchanged re-swap keeps ..version 2 and is
	// no rotation; the next rotation is 3.
	d.restart(t)
	if err := d.kl.publish(t, a, csiSecrets, ""); err != nil {
		t.Fatal(err)
	}
	if v := versionOf(t, d.kl.target(t, a)); v.Version != 2 {
		t.Fatalf("..version after a restart's re-swap: %+v", v)
	}
	if _, err := e.vault.PutKV(ctx, "kv", "prod/payments-prod/db", map[string]any{"password": rotated + "-2"}); err != nil {
		t.Fatal(err)
	}
	if err := d.kl.publish(t, a, csiSecrets, ""); err != nil {
		t.Fatal(err)
	}
	if v := versionOf(t, d.kl.target(t, a)); v.Version != 3 || v.Refs["payments-prod/db#password"] != v0+2 {
		t.Fatalf("..version after a rotation past a restart: %+v", v)
	}
	waitEvent(t, e, a, "SecretsRotated", fmt.Sprintf("secrets volume swapped, ..version 3: payments-prod/db#password version %d -> %d", v0+1, v0+2))
	if n := len(eventsOf(t, e, a, "SecretsRotated")); n != 2 {
		t.Fatalf("%d SecretsRotated events on pod a, want 2 (the restart's re-swap is none)", n)
	}

	// No value anywhere the app or the operator reads.
	evs, err := e.kube.Client.CoreV1().Events("payments-prod").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	everything := out
	for _, ev := range evs.Items {
		everything += ev.Message + "\n"
	}
	for _, p := range []*corev1.Pod{a, b} {
		raw, err := os.ReadFile(filepath.Join(d.kl.target(t, p), "..version"))
		if err != nil {
			t.Fatal(err)
		}
		everything += string(raw)
	}
	for _, v := range []string{prodCanary, rotated, "CANARY"} {
		if strings.Contains(everything, v) {
			t.Fatalf("a secret value (%s) in an event, a ..version or who-has:\n%s", v, everything)
		}
	}
	t.Logf("events on the pods:\n%s", everything[len(out):])
}

func versionOf(t *testing.T, target string) csi.VersionDoc {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(target, "..version"))
	if err != nil {
		t.Fatal(err)
	}
	d, ok := csi.ParseVersion(raw)
	if !ok {
		t.Fatalf("..version %q", raw)
	}
	return d
}

// eventsOf lists the pod's events of reason.
func eventsOf(t *testing.T, e *brokerEnv, pod *corev1.Pod, reason string) []corev1.Event {
	t.Helper()
	evs, err := e.kube.Client.CoreV1().Events(pod.Namespace).List(context.Background(),
		metav1.ListOptions{FieldSelector: "involvedObject.uid=" + string(pod.UID) + ",reason=" + reason})
	if err != nil {
		t.Fatal(err)
	}
	return evs.Items
}

// waitEvent waits for an event of reason with message on pod, from keyward-broker on node-1.
func waitEvent(t *testing.T, e *brokerEnv, pod *corev1.Pod, reason, message string) {
	t.Helper()
	eventually(t, 20*time.Second, reason+" on "+pod.Name, func() error {
		evs := eventsOf(t, e, pod, reason)
		for _, ev := range evs {
			if ev.Message == message {
				if ev.Source.Component != "keyward-broker" || ev.Source.Host != "node-1" || ev.InvolvedObject.Kind != "Pod" || ev.InvolvedObject.Name != pod.Name {
					t.Fatalf("event %+v", ev)
				}
				return nil
			}
		}
		var got []string
		for _, ev := range evs {
			got = append(got, ev.Message)
		}
		return fmt.Errorf("events %q", got)
	})
}
