package e2e

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/yaml"
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

// The broker's DaemonSet runs the broker alone: it registers itself with kubelet (the registration
// directory mounted, kubelet told the CSI socket's host path, which is where the plugin directory's
// hostPath puts the socket) and kubelet probes its own /healthz and /livez on the pod's address.
func TestTheBrokerDaemonSetNeedsNoSidecar(t *testing.T) {
	for _, overlay := range []string{"../../deploy/overlays/dev", "../../deploy/overlays/prod"} {
		var ds *unstructured.Unstructured
		for _, o := range render(t, overlay) {
			if o.GetKind() == "DaemonSet" {
				ds = o
			}
		}
		if ds == nil {
			t.Fatalf("%s: no DaemonSet", overlay)
		}
		containers := nested(ds, "spec", "template", "spec", "containers")
		if len(containers) != 1 || containers[0].(map[string]any)["name"] != "broker" {
			t.Fatalf("%s: containers %v, want the broker alone", overlay, containers)
		}
		c := containers[0].(map[string]any)
		flags := map[string]string{}
		for _, a := range c["args"].([]any) {
			k, v, _ := strings.Cut(a.(string), "=")
			flags[k] = v
		}
		hostPaths, mounts := map[string]string{}, map[string]string{}
		for _, v := range nested(ds, "spec", "template", "spec", "volumes") {
			vm := v.(map[string]any)
			if hp, ok := vm["hostPath"].(map[string]any); ok {
				hostPaths[vm["name"].(string)] = hp["path"].(string)
			}
		}
		for _, m := range c["volumeMounts"].([]any) {
			mm := m.(map[string]any)
			mounts[mm["mountPath"].(string)] = hostPaths[mm["name"].(string)]
		}
		csiDir, csiName, _ := strings.Cut(strings.TrimPrefix(flags["--csi-socket"], "/"), "/")
		if got := mounts["/"+csiDir] + "/" + csiName; got != flags["--kubelet-registration-path"] || got != "/var/lib/kubelet/plugins/secrets.keyward.dev/csi.sock" {
			t.Errorf("%s: kubelet is told %q, the socket is at %q on the host", overlay, flags["--kubelet-registration-path"], got)
		}
		if mounts[flags["--kubelet-registration-dir"]] != "/var/lib/kubelet/plugins_registry" {
			t.Errorf("%s: --kubelet-registration-dir=%q is not kubelet's registration directory (mounts %v)", overlay, flags["--kubelet-registration-dir"], mounts)
		}
		if flags["--health-address"] != ":9808" {
			t.Errorf("%s: --health-address=%q, want :9808", overlay, flags["--health-address"])
		}
		for probe, path := range map[string]string{"readinessProbe": "/healthz", "livenessProbe": "/livez"} {
			p, _ := c[probe].(map[string]any)
			get, _ := p["httpGet"].(map[string]any)
			if get["path"] != path || get["port"] != "healthz" {
				t.Errorf("%s: %s %v, want httpGet %s on the healthz port", overlay, probe, p, path)
			}
		}
		port := c["ports"].([]any)[0].(map[string]any)
		if port["name"] != "healthz" || fmt.Sprint(port["containerPort"]) != "9808" {
			t.Errorf("%s: ports %v", overlay, c["ports"])
		}
	}
}

// The keyward-kms static pod mounts the PKCS#11 module kms.yaml names as a file, not its directory:
// Debian's /usr/lib/softhsm/libsofthsm2.so is a relative symlink out of that directory, so a
// directory mount left keyward-kms unable to load its module on a real node ("cannot load PKCS#11
// module"); the bind mount of the file follows the link.
func TestKMSPodMountsItsPKCS11ModuleAsAFile(t *testing.T) {
	var cfg struct {
		PKCS11 struct{ Module string } `json:"pkcs11"`
	}
	if err := yaml.Unmarshal([]byte(readFile(t, "../../deploy/control-plane/kms.yaml")), &cfg); err != nil || cfg.PKCS11.Module == "" {
		t.Fatalf("kms.yaml names no PKCS#11 module: %v", err)
	}
	var pod corev1.Pod
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(readObject(t, "../../deploy/control-plane/keyward-kms.yaml").Object, &pod); err != nil {
		t.Fatal(err)
	}
	var vol string
	for _, m := range pod.Spec.Containers[0].VolumeMounts {
		if m.MountPath == cfg.PKCS11.Module {
			vol = m.Name
		}
	}
	i := slices.IndexFunc(pod.Spec.Volumes, func(v corev1.Volume) bool { return v.Name == vol })
	if vol == "" || i < 0 {
		t.Fatalf("no volume is mounted at the module's path %s", cfg.PKCS11.Module)
	}
	hp := pod.Spec.Volumes[i].HostPath
	if hp == nil || hp.Path != cfg.PKCS11.Module || hp.Type == nil || *hp.Type != corev1.HostPathFile {
		t.Fatalf("the module's volume %s is %+v, want the host's %s as a File", vol, pod.Spec.Volumes[i].VolumeSource, cfg.PKCS11.Module)
	}
}
