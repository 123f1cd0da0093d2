package main

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/keyward/keyward/internal/apiserver"
)

func TestVolumesStatusAndWhoHasLive(t *testing.T) {
	n := newAPINode(t, 1<<20, 10)
	n.shutdown()
	since := time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)
	healthy := true
	n.admin = apiserver.AdminOptions{Node: "node-a", Component: "broker", Version: "v-test",
		Volumes: func() []apiserver.Volume {
			return []apiserver.Volume{
				{ID: "csi-1", Namespace: "payments", Pod: "api-0", PodUID: "u0", Environment: "prod", Refs: map[string]int{"payments/db#password": 7, "shared/ca#crt": 1}, Version: 3, Since: since, LastAt: since},
				{ID: "csi-2", Namespace: "payments", Pod: "api-1", PodUID: "u1", Environment: "prod", Refs: map[string]int{"payments/db#password": 6}, Version: 1, Since: since, LastAt: since},
			}
		},
		VaultTokens: func() (string, []apiserver.VaultToken) {
			return "pod", []apiserver.VaultToken{{AccessorSHA256: "abc", TTL: time.Hour}}
		},
		Policy: func() (uint64, string) { return 4, "cafe01" },
		Health: func() []apiserver.Check {
			if healthy {
				return []apiserver.Check{{Name: "audit"}}
			}
			return []apiserver.Check{{Name: "audit", Err: errors.New("audit records cannot be synced")}}
		}}
	n.start()
	api := n.apiArgs("operator")

	var out, errb syncBuf
	if code := run(append([]string{"volumes"}, api...), &out, &errb); code != 0 {
		t.Fatalf("volumes: %d %s", code, errb.String())
	}
	for _, want := range []string{"payments/api-0", "csi-1", "payments/db#password", "shared/ca#crt", "payments/api-1"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("volumes lacks %q:\n%s", want, out.String())
		}
	}
	out = syncBuf{}
	if code := run(append([]string{"status"}, api...), &out, &errb); code != 0 || !strings.Contains(out.String(), "gen 4, cafe01") || !strings.Contains(out.String(), "1 (pod mode)") {
		t.Fatalf("status: %d %s %s", code, out.String(), errb.String())
	}
	healthy = false
	out, errb = syncBuf{}, syncBuf{}
	if code := run(append([]string{"status"}, api...), &out, &errb); code != 1 || !strings.Contains(out.String(), "audit: audit records cannot be synced") {
		t.Fatalf("unhealthy status: %d %s %s", code, out.String(), errb.String())
	}
	out = syncBuf{}
	if code := run(append([]string{"who-has", "payments/db#password", "--live", "-o", "json"}, api...), &out, &errb); code != 0 {
		t.Fatalf("who-has --live: %d %s", code, errb.String())
	}
	var res []Holders
	if err := json.Unmarshal([]byte(out.String()), &res); err != nil || len(res) != 1 || res[0].Newest != 7 || res[0].Current != 1 || len(res[0].Pods) != 2 ||
		res[0].Pods[1].Pod != "api-1" || res[0].Pods[1].Newest || res[0].Pods[0].Node != "node-a" {
		t.Fatalf("who-has --live: %v %s", err, out.String())
	}
	// An audit reader's certificate does not open the Admin service.
	if code := run(append([]string{"volumes"}, n.apiArgs("security-team")...), &out, &errb); code != 1 || !strings.Contains(errb.String(), "PermissionDenied") {
		t.Fatalf("volumes as an audit reader: %d %s", code, errb.String())
	}
}

func TestEndpointTargets(t *testing.T) {
	name, port, ready, notReady := "api", int32(9443), true, false
	node := func(s string) *string { return &s }
	slices := []discoveryv1.EndpointSlice{{
		Ports: []discoveryv1.EndpointPort{{Name: &name, Port: &port}},
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"10.244.0.5"}, NodeName: node("node-b"), Conditions: discoveryv1.EndpointConditions{Ready: &ready}},
			{Addresses: []string{"10.244.1.7"}, NodeName: node("node-a")},
			{Addresses: []string{"10.244.2.9"}, NodeName: node("node-c"), Conditions: discoveryv1.EndpointConditions{Ready: &notReady}},
		},
	}}
	ts, err := endpointTargets(slices, "")
	if err != nil || len(ts) != 2 || ts[0] != (target{"node-a", "10.244.1.7:9443"}) || ts[1] != (target{"node-b", "10.244.0.5:9443"}) {
		t.Fatalf("%v %v", ts, err)
	}
	if ts, err := endpointTargets(slices, "node-b"); err != nil || len(ts) != 1 || ts[0].node != "node-b" {
		t.Fatalf("--node node-b: %v %v", ts, err)
	}
	if _, err := endpointTargets(slices, "node-c"); err == nil {
		t.Fatal("a node whose endpoint is not ready was found")
	}
}

// A daemon answering as another node than the one asked for (a wrong endpoint, or a server
// impersonating the node's API) is refused, not shown under the node's name.
func TestAdminAnswersMustBeTheNodeAskedFor(t *testing.T) {
	n := newAPINode(t, 1<<20, 10)
	n.shutdown()
	n.admin = apiserver.AdminOptions{Node: "node-b", Component: "broker", Version: "v-test",
		Volumes:     func() []apiserver.Volume { return nil },
		VaultTokens: func() (string, []apiserver.VaultToken) { return "pod", nil },
		Health:      func() []apiserver.Check { return []apiserver.Check{{Name: "audit"}} }}
	n.start()
	for _, cmd := range [][]string{{"volumes"}, {"status"}, {"who-has", "payments/db#password", "--live"}} {
		var out, errb syncBuf
		args := append(append(cmd, "--node", "node-a"), n.apiArgs("operator")...)
		if code := run(args, &out, &errb); code != 1 || !strings.Contains(errb.String(), `answered as node "node-b"`) {
			t.Errorf("%s: exit %d: %s", cmd[0], code, errb.String())
		}
		// Asked for node-b, it is node-b.
		args = append(append(cmd, "--node", "node-b"), n.apiArgs("operator")...)
		if code := run(args, &out, &errb); code != 0 {
			t.Errorf("%s --node node-b: exit %d: %s", cmd[0], code, errb.String())
		}
	}
}
