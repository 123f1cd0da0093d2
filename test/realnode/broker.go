package realnode

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/keyward/keyward/csi"
)

// Render is `kustomize build dir` as objects.
func Render(dir string) ([]*unstructured.Unstructured, error) {
	rm, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		return nil, fmt.Errorf("kustomize build %s: %w", dir, err)
	}
	var objects []*unstructured.Unstructured
	for _, r := range rm.Resources() {
		m, err := r.Map()
		if err != nil {
			return nil, err
		}
		objects = append(objects, &unstructured.Unstructured{Object: m})
	}
	return objects, nil
}

// BrokerDirs are the host paths the patched DaemonSet mounts instead of the shipped /etc/keyward/audit-key
// and /var/log/keyward.
func (c *Cluster) BrokerDirs() (auditKey, auditLog string) {
	return filepath.Join(c.HostDir, "broker-audit-key"), filepath.Join(c.HostDir, "broker-log")
}

// RenderBroker renders deploy/overlays/dev and patches it for this machine (PatchForThisNode) with
// policy as the broker's policy file.
func (c *Cluster) RenderBroker(policy string) ([]*unstructured.Unstructured, error) {
	objects, err := Render(filepath.Join(c.Repo, "deploy/overlays/dev"))
	if err != nil {
		return nil, err
	}
	return objects, c.PatchForThisNode(objects, policy)
}

// PatchForThisNode changes the rendered manifests only where this machine forces it; each change
// says why. Everything else (image, arguments, probes, mounts, security context, RBAC) is as shipped.
func (c *Cluster) PatchForThisNode(objects []*unstructured.Unstructured, policy string) error {
	patched := map[string]bool{}
	for _, o := range objects {
		var err error
		switch o.GetKind() + "/" + o.GetName() {
		case "ConfigMap/keyward-broker":
			// Vault is the harness's dev server on the host's loopback, plain HTTP (a cluster's is
			// https://vault.vault.svc:8200 with its CA): only the address and the scheme change.
			err = editData(o, "broker.yaml", func(s string) (string, error) {
				var cfg map[string]any
				if err := yaml.Unmarshal([]byte(s), &cfg); err != nil {
					return "", err
				}
				v, _ := cfg["vault"].(map[string]any)
				if v == nil {
					return "", fmt.Errorf("the shipped broker config has no vault section: %s", s)
				}
				v["address"], v["allowInsecureHTTP"] = c.Vault.Addr, true
				delete(v, "caFile")
				out, err := yaml.Marshal(cfg)
				return string(out), err
			})
		case "ConfigMap/keyward-policy":
			// The shipped policy grants nothing (deny by default); an operator adds the grants of
			// the cluster's namespaces: here the caller's.
			err = editData(o, "policy.yaml", func(string) (string, error) { return policy, nil })
		case "DaemonSet/keyward-broker":
			err = c.patchDaemonSet(o)
		default:
			continue
		}
		if err != nil {
			return fmt.Errorf("%s/%s: %w", o.GetKind(), o.GetName(), err)
		}
		patched[o.GetKind()+"/"+o.GetName()] = true
	}
	if len(patched) != 3 {
		return fmt.Errorf("patched %v; the manifests no longer have the broker's ConfigMaps and DaemonSet", patched)
	}
	return nil
}

func editData(o *unstructured.Unstructured, key string, f func(string) (string, error)) error {
	data, _, err := unstructured.NestedStringMap(o.Object, "data")
	if err != nil {
		return err
	}
	if data[key], err = f(data[key]); err != nil {
		return err
	}
	m := map[string]any{}
	for k, v := range data {
		m[k] = v
	}
	return unstructured.SetNestedMap(o.Object, m, "data")
}

func (c *Cluster) patchDaemonSet(o *unstructured.Unstructured) error {
	var ds appsv1.DaemonSet
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &ds); err != nil {
		return err
	}
	spec := &ds.Spec.Template.Spec
	// The harness has no kube-proxy (so no Service VIPs) and its pods' network reaches nothing off
	// the node, while the apiserver and Vault listen on the host's loopback: the broker joins the
	// host's network namespace and is told the apiserver's address (kubelet would give it the
	// `kubernetes` Service's VIP, 10.96.0.1, which nothing here translates).
	spec.HostNetwork = true
	u, err := url.Parse(c.Kube.URL)
	if err != nil {
		return err
	}
	spec.Containers[0].Env = append(spec.Containers[0].Env,
		corev1.EnvVar{Name: "KUBERNETES_SERVICE_HOST", Value: u.Hostname()},
		corev1.EnvVar{Name: "KUBERNETES_SERVICE_PORT", Value: u.Port()})
	// kubelet's paths stay as shipped (the node's kubelet runs with its default root,
	// /var/lib/kubelet). The node's audit key and audit stream are the cluster's HostDir's.
	keyDir, logDir := c.BrokerDirs()
	moved := 0
	for i, v := range spec.Volumes {
		switch {
		case v.HostPath == nil:
		case v.Name == "audit-key":
			spec.Volumes[i].HostPath.Path = keyDir
			moved++
		case v.Name == "audit-log":
			spec.Volumes[i].HostPath.Path = logDir
			moved++
		case !strings.HasPrefix(v.HostPath.Path, "/var/lib/kubelet/"):
			return fmt.Errorf("the DaemonSet mounts the host's %s: this patch does not know why", v.HostPath.Path)
		}
	}
	if moved != 2 {
		return fmt.Errorf("the DaemonSet has no audit-key and audit-log hostPath volumes: %+v", spec.Volumes)
	}
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&ds)
	if err != nil {
		return err
	}
	o.Object = m
	return nil
}

// ProvisionBrokerNode does on the node what deploy/README.md asks of every node before the DaemonSet
// runs: its audit key (key: 32 random bytes, hex, when empty) in the audit-key directory, 0400.
func (c *Cluster) ProvisionBrokerNode(key []byte) error {
	keyDir, _ := c.BrokerDirs()
	if err := os.MkdirAll(keyDir, 0o700); err != nil {
		return err
	}
	if len(key) == 0 {
		raw := make([]byte, 32)
		if _, err := rand.Read(raw); err != nil {
			return err
		}
		key = []byte(hex.EncodeToString(raw))
	}
	return os.WriteFile(filepath.Join(keyDir, "audit.key"), key, 0o400)
}

// Apply creates the objects as kubectl apply does for new objects (strict field validation), and
// after keyward-system the keyward-vault-ca ConfigMap deploy/README.md asks users to create (the
// harness Vault speaks plain HTTP, so its content is any CA: the patched config names no caFile).
// created receives "kind/name" of each object, as kubectl prints it.
func (c *Cluster) Apply(ctx context.Context, objects []*unstructured.Unstructured, created func(string)) error {
	dyn, err := dynamic.NewForConfig(c.Kube.Config)
	if err != nil {
		return err
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(c.Kube.Client.Discovery()))
	for _, o := range objects {
		gvk := o.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			return fmt.Errorf("%s: %w", gvk, err)
		}
		var ri dynamic.ResourceInterface = dyn.Resource(m.Resource)
		if m.Scope.Name() == "namespace" {
			ri = dyn.Resource(m.Resource).Namespace(o.GetNamespace())
		}
		if _, err := ri.Create(ctx, o, metav1.CreateOptions{FieldValidation: "Strict"}); err != nil {
			return fmt.Errorf("creating %s %s/%s: %w", gvk.Kind, o.GetNamespace(), o.GetName(), err)
		}
		if created != nil {
			created(strings.ToLower(gvk.Kind) + "/" + o.GetName())
		}
		if gvk.Kind == "Namespace" && o.GetName() == SystemNamespace {
			cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "keyward-vault-ca"}, Data: map[string]string{"ca.crt": string(c.Kube.CAData)}}
			if _, err := c.Kube.Client.CoreV1().ConfigMaps(SystemNamespace).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
				return err
			}
		}
	}
	return nil
}

// DeployBroker provisions the node's audit key (auditKey; random when empty), renders, patches and
// applies the broker with policy, and waits until its DaemonSet is Ready and kubelet lists the driver
// on the node's CSINode. created is told each object Apply creates. It returns the broker's pod.
func (c *Cluster) DeployBroker(ctx context.Context, policy string, auditKey []byte, created func(string)) (*corev1.Pod, error) {
	if err := c.ProvisionBrokerNode(auditKey); err != nil {
		return nil, err
	}
	objects, err := c.RenderBroker(policy)
	if err != nil {
		return nil, err
	}
	if err := c.Apply(ctx, objects, created); err != nil {
		return nil, err
	}
	return c.WaitBroker(ctx, "")
}

// WaitBroker waits until the DaemonSet's one pod is Ready (a pod other than the one of UID notUID)
// and kubelet has registered the driver.
func (c *Cluster) WaitBroker(ctx context.Context, notUID string) (*corev1.Pod, error) {
	var pod *corev1.Pod
	err := Poll(ctx, 3*time.Minute, "the broker DaemonSet Ready", func() error {
		ds, err := c.Kube.Client.AppsV1().DaemonSets(SystemNamespace).Get(ctx, "keyward-broker", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if ds.Status.DesiredNumberScheduled != 1 || ds.Status.NumberReady != 1 {
			return fmt.Errorf("DaemonSet: %d desired, %d ready; %s", ds.Status.DesiredNumberScheduled, ds.Status.NumberReady, c.PodStates(ctx, SystemNamespace))
		}
		p, err := c.BrokerPod(ctx)
		if err == nil && string(p.UID) == notUID {
			err = fmt.Errorf("still the old pod %s", p.Name)
		}
		pod = p
		return err
	})
	if err != nil {
		return nil, err
	}
	if pod.Spec.NodeName != c.Node.Name {
		return nil, fmt.Errorf("the broker pod runs on %q, not the node %q", pod.Spec.NodeName, c.Node.Name)
	}
	return pod, c.WaitRegistered(ctx)
}

// WaitRegistered waits until kubelet lists secrets.keyward.dev on the node's CSINode with the node's
// name as its ID: the broker's plugin-registration socket was found and the registration accepted.
func (c *Cluster) WaitRegistered(ctx context.Context) error {
	return Poll(ctx, time.Minute, "kubelet registered "+csi.DriverName, func() error {
		cn, err := c.Kube.Client.StorageV1().CSINodes().Get(ctx, c.Node.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, d := range cn.Spec.Drivers {
			if d.Name == csi.DriverName {
				if d.NodeID != c.Node.Name {
					return fmt.Errorf("CSINode lists %s with node ID %q, want %q", d.Name, d.NodeID, c.Node.Name)
				}
				return nil
			}
		}
		return fmt.Errorf("CSINode %s lists no %s: %+v", c.Node.Name, csi.DriverName, cn.Spec.Drivers)
	})
}

// BrokerPod is the broker DaemonSet's pod, once it is Running and Ready.
func (c *Cluster) BrokerPod(ctx context.Context) (*corev1.Pod, error) {
	pods, err := c.Kube.Client.CoreV1().Pods(SystemNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=keyward-broker"})
	if err != nil {
		return nil, err
	}
	var live []corev1.Pod
	for _, p := range pods.Items {
		if p.DeletionTimestamp == nil {
			live = append(live, p)
		}
	}
	if len(live) != 1 {
		return nil, fmt.Errorf("%d broker pods", len(live))
	}
	p := live[0]
	if p.Status.Phase != corev1.PodRunning || !PodReady(&p) {
		return nil, fmt.Errorf("broker pod %s: %s, not Ready", p.Name, p.Status.Phase)
	}
	return &p, nil
}
