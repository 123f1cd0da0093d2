package main

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

const systemNS = "keyward-system"

// benchPolicy grants the bench namespace's api service account its own secrets only.
const benchPolicy = `
environments:
  - {name: prod, vaultMount: kv, vaultPrefix: prod, vaultRole: prod}
grants:
  - namespace: bench
    serviceAccount: api
    paths: ["bench/*"]
`

// deployBroker applies the kustomize render of deploy/overlays/dev, patched as the real-node e2e
// (test/e2e/realnode_test.go) patches it, except that kubelet's root is /var/lib/kubelet here, so no
// path moves; it waits until the DaemonSet is Ready and kubelet lists the driver on the CSINode.
func (b *bench) deployBroker(ctx context.Context, repo string) error {
	rm, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), filepath.Join(repo, "deploy/overlays/dev"))
	if err != nil {
		return fmt.Errorf("kustomize: %w", err)
	}
	var objects []*unstructured.Unstructured
	for _, r := range rm.Resources() {
		m, err := r.Map()
		if err != nil {
			return err
		}
		objects = append(objects, &unstructured.Unstructured{Object: m})
	}
	if err := b.patch(objects); err != nil {
		return err
	}
	if err := b.apply(ctx, objects); err != nil {
		return err
	}
	c := b.env.Kube.Client
	return waitFor(ctx, 3*time.Minute, "the broker DaemonSet Ready and registered with kubelet", func() error {
		ds, err := c.AppsV1().DaemonSets(systemNS).Get(ctx, "keyward-broker", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if ds.Status.NumberReady != 1 {
			return fmt.Errorf("DaemonSet: %d desired, %d ready", ds.Status.DesiredNumberScheduled, ds.Status.NumberReady)
		}
		cn, err := c.StorageV1().CSINodes().Get(ctx, b.node.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, d := range cn.Spec.Drivers {
			if d.Name == csi.DriverName {
				return nil
			}
		}
		return fmt.Errorf("CSINode lists no %s", csi.DriverName)
	})
}

// patch: Vault's address (the harness's, plain HTTP), the policy's grants, and the DaemonSet's host
// network and apiserver address (no kube-proxy here) and audit paths (the bench's directory, not the
// machine's /etc/keyward and /var/log/keyward). Everything else is as shipped.
func (b *bench) patch(objects []*unstructured.Unstructured) error {
	patched := 0
	for _, o := range objects {
		var err error
		switch o.GetKind() + "/" + o.GetName() {
		case "ConfigMap/keyward-broker":
			err = editData(o, "broker.yaml", func(s string) (string, error) {
				var cfg map[string]any
				if err := yaml.Unmarshal([]byte(s), &cfg); err != nil {
					return "", err
				}
				v, _ := cfg["vault"].(map[string]any)
				if v == nil {
					return "", fmt.Errorf("the shipped broker config has no vault section")
				}
				v["address"], v["allowInsecureHTTP"] = b.env.Vault.Addr, true
				delete(v, "caFile")
				out, err := yaml.Marshal(cfg)
				return string(out), err
			})
		case "ConfigMap/keyward-policy":
			err = editData(o, "policy.yaml", func(string) (string, error) { return benchPolicy, nil })
		case "DaemonSet/keyward-broker":
			err = b.patchDaemonSet(o)
		default:
			continue
		}
		if err != nil {
			return fmt.Errorf("%s/%s: %w", o.GetKind(), o.GetName(), err)
		}
		patched++
	}
	if patched != 3 {
		return fmt.Errorf("patched %d objects; the manifests no longer have the broker's ConfigMaps and DaemonSet", patched)
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

func (b *bench) patchDaemonSet(o *unstructured.Unstructured) error {
	var ds appsv1.DaemonSet
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &ds); err != nil {
		return err
	}
	spec := &ds.Spec.Template.Spec
	spec.HostNetwork = true
	u, err := url.Parse(b.env.Kube.URL)
	if err != nil {
		return err
	}
	spec.Containers[0].Env = append(spec.Containers[0].Env,
		corev1.EnvVar{Name: "KUBERNETES_SERVICE_HOST", Value: u.Hostname()},
		corev1.EnvVar{Name: "KUBERNETES_SERVICE_PORT", Value: u.Port()})
	keyDir := filepath.Join(b.dir, "audit-key")
	if err := os.MkdirAll(keyDir, 0o700); err != nil {
		return err
	}
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(keyDir, "audit.key"), []byte(hex.EncodeToString(key)), 0o400); err != nil {
		return err
	}
	for i, v := range spec.Volumes {
		switch {
		case v.HostPath == nil:
		case v.Name == "audit-key":
			spec.Volumes[i].HostPath.Path = keyDir
		case v.Name == "audit-log":
			spec.Volumes[i].HostPath.Path = filepath.Join(b.dir, "audit-log")
		case !strings.HasPrefix(v.HostPath.Path, "/var/lib/kubelet/"):
			return fmt.Errorf("unexpected host path %s", v.HostPath.Path)
		}
	}
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&ds)
	if err != nil {
		return err
	}
	o.Object = m
	return nil
}

// apply creates the objects, and after the namespace the keyward-vault-ca ConfigMap deploy/README.md
// asks users to create (any CA: the patched config names no caFile).
func (b *bench) apply(ctx context.Context, objects []*unstructured.Unstructured) error {
	kube := b.env.Kube
	dyn, err := dynamic.NewForConfig(kube.Config)
	if err != nil {
		return err
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(kube.Client.Discovery()))
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
		if gvk.Kind == "Namespace" && o.GetName() == systemNS {
			cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "keyward-vault-ca"}, Data: map[string]string{"ca.crt": string(kube.CAData)}}
			if _, err := kube.Client.CoreV1().ConfigMaps(systemNS).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
				return err
			}
		}
	}
	return nil
}

// brokerPid finds the broker container's process on the host: comm keyward-broker in the cgroup of the
// DaemonSet pod's container.
func (b *bench) brokerPid(ctx context.Context) (int, error) {
	pods, err := b.env.Kube.Client.CoreV1().Pods(systemNS).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=keyward-broker"})
	if err != nil {
		return 0, err
	}
	if len(pods.Items) != 1 || len(pods.Items[0].Status.ContainerStatuses) != 1 {
		return 0, fmt.Errorf("%d broker pods", len(pods.Items))
	}
	_, id, _ := strings.Cut(pods.Items[0].Status.ContainerStatuses[0].ContainerID, "://")
	if id == "" {
		return 0, fmt.Errorf("the broker container has no ID yet")
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	for _, e := range entries {
		comm, err := os.ReadFile(filepath.Join("/proc", e.Name(), "comm"))
		if err != nil || strings.TrimSpace(string(comm)) != "keyward-broker" {
			continue
		}
		cg, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cgroup"))
		if err == nil && strings.Contains(string(cg), id) {
			var pid int
			if _, err := fmt.Sscan(e.Name(), &pid); err == nil {
				return pid, nil
			}
		}
	}
	return 0, fmt.Errorf("no keyward-broker process in container %s", id)
}
