package e2e

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// The shipped manifests say what the README says: the NetworkPolicy lets the broker reach the
// apiserver's endpoints after Service translation (the form most CNIs need), the broker's audit
// key is the node's own (a hostPath, not one Secret every node reads), and both daemons write
// audit streams bound to their node.
func TestManifestsShipTheTrustChainDefaults(t *testing.T) {
	serviceRange := netip.MustParsePrefix("10.96.0.0/12")
	for _, overlay := range []string{"../../deploy/overlays/dev", "../../deploy/overlays/prod"} {
		var np, ds *unstructured.Unstructured
		for _, o := range render(t, overlay) {
			switch o.GetKind() {
			case "NetworkPolicy":
				np = o
			case "DaemonSet":
				ds = o
			}
		}
		if np == nil || ds == nil {
			t.Fatalf("%s: no NetworkPolicy or DaemonSet", overlay)
		}
		egress := nested(np, "spec", "egress")
		endpointRule := false
		for _, r := range egress {
			rule := r.(map[string]any)
			to, _ := rule["to"].([]any)
			ports, _ := rule["ports"].([]any)
			for _, p := range ports {
				if fmt.Sprint(p.(map[string]any)["port"]) != "6443" || len(to) == 0 {
					continue
				}
				// An endpoint, not the Service VIP (kubeadm's default Service range).
				ipb, _ := to[0].(map[string]any)["ipBlock"].(map[string]any)
				if prefix, err := netip.ParsePrefix(fmt.Sprint(ipb["cidr"])); err == nil && !serviceRange.Contains(prefix.Addr()) {
					endpointRule = true
				}
			}
		}
		if !endpointRule {
			t.Errorf("%s: the NetworkPolicy has no egress rule to the apiserver's endpoints (ipBlock, port 6443)", overlay)
		}
		containers := nested(ds, "spec", "template", "spec", "containers")
		var args []string
		for _, c := range containers {
			if c.(map[string]any)["name"] == "broker" {
				for _, a := range c.(map[string]any)["args"].([]any) {
					args = append(args, a.(string))
				}
			}
		}
		if !slices.ContainsFunc(args, func(a string) bool { return strings.HasPrefix(a, "--audit-dir=") }) {
			t.Errorf("%s: broker args %v lack --audit-dir", overlay, args)
		}
		volumes := nested(ds, "spec", "template", "spec", "volumes")
		for _, v := range volumes {
			vm := v.(map[string]any)
			if vm["name"] == "audit-key" && (vm["hostPath"] == nil || vm["secret"] != nil) {
				t.Errorf("%s: the audit key is %v, want the node's own (hostPath)", overlay, vm)
			}
		}
	}
	kms := readObject(t, "../../deploy/control-plane/keyward-kms.yaml")
	containers := nested(kms, "spec", "containers")
	args := strings.Join(func() []string {
		var out []string
		for _, a := range containers[0].(map[string]any)["args"].([]any) {
			out = append(out, a.(string))
		}
		return out
	}(), " ")
	if !strings.Contains(args, "--node-name=$(NODE_NAME)") || !strings.Contains(args, "--audit-dir=") {
		t.Errorf("keyward-kms args: %s", args)
	}
}

// nested is the list at path in o (rendered manifests hold plain ints, which NestedSlice's deep
// copy refuses).
func nested(o *unstructured.Unstructured, path ...string) []any {
	v, _, _ := unstructured.NestedFieldNoCopy(o.Object, path...)
	l, _ := v.([]any)
	return l
}
