package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/broker/policy"
	"github.com/keyward/keyward/broker/tokenreview"
	"github.com/keyward/keyward/broker/vault"
	"github.com/keyward/keyward/csi/podevents"
	"github.com/keyward/keyward/csi/podevents/restsink"
	"github.com/keyward/keyward/csi/podwatch"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/internal/fault"
	"github.com/keyward/keyward/test/harness"
)

func render(t *testing.T, dir string) []*unstructured.Unstructured {
	t.Helper()
	rm, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize %s: %v", dir, err)
	}
	var out []*unstructured.Unstructured
	for _, r := range rm.Resources() {
		m, err := r.Map()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, &unstructured.Unstructured{Object: m})
	}
	return out
}

func readObject(t *testing.T, path string) *unstructured.Unstructured {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := yaml.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return &unstructured.Unstructured{Object: m}
}

// Every manifest of both overlays and the control-plane static pod passes a server-side dry run
// (schema, defaulting, validation, admission) on a real kube-apiserver.
func TestDeployManifestsServerSideDryRun(t *testing.T) {
	kube := harness.KubeT(t, harness.KubeOptions{})
	// Namespaced objects need their namespace to exist: keyward-system is created for real from its
	// manifest, and kube-system gets the default service account a controller-manager would make.
	if _, err := kube.CreateServiceAccount(context.Background(), "kube-system", "default"); err != nil {
		t.Fatal(err)
	}
	objects := map[string][]*unstructured.Unstructured{
		"overlays/dev":  render(t, "../../deploy/overlays/dev"),
		"overlays/prod": render(t, "../../deploy/overlays/prod"),
		"overlays/api":  render(t, "../../deploy/overlays/api"),
		"control-plane": {readObject(t, "../../deploy/control-plane/keyward-kms.yaml")},
	}
	kinds := dryRun(t, kube, objects)
	for _, k := range []string{"Namespace", "CSIDriver", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "NetworkPolicy", "Pod",
		"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "Service", "Role", "RoleBinding"} {
		if !kinds[k] {
			t.Errorf("no %s among the manifests", k)
		}
	}
	// The policy shipped in the ConfigMaps is valid for the binary.
	for _, o := range objects["overlays/prod"] {
		if o.GetKind() != "ConfigMap" {
			continue
		}
		data, _, _ := unstructured.NestedStringMap(o.Object, "data")
		if p, ok := data["policy.yaml"]; ok {
			if _, err := policy.Parse([]byte(p)); err != nil {
				t.Errorf("shipped policy: %v", err)
			}
		}
	}
}

// dryRun creates every object with a server-side dry run (the first Namespace for real) and returns
// the kinds it saw.
func dryRun(t *testing.T, kube *harness.KubeAPIServer, objects map[string][]*unstructured.Unstructured) map[string]bool {
	dyn, err := dynamic.NewForConfig(kube.Config)
	if err != nil {
		t.Fatal(err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(kube.Client.Discovery()))
	nsCreated := false
	kinds := map[string]bool{}
	for where, objs := range objects {
		for _, o := range objs {
			gvk := o.GroupVersionKind()
			m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
			if err != nil {
				t.Fatalf("%s: %s: %v", where, gvk, err)
			}
			var ri dynamic.ResourceInterface = dyn.Resource(m.Resource)
			if m.Scope.Name() == "namespace" {
				ri = dyn.Resource(m.Resource).Namespace(o.GetNamespace())
			}
			opts := metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}, FieldValidation: "Strict"}
			if gvk.Kind == "Namespace" {
				if nsCreated {
					continue
				}
				opts.DryRun, nsCreated = nil, true
			}
			if _, err := ri.Create(context.Background(), o, opts); err != nil {
				t.Errorf("%s: %s %s/%s: %v", where, gvk.Kind, o.GetNamespace(), o.GetName(), err)
			}
			kinds[gvk.Kind] = true
		}
	}
	return kinds
}

// The broker works with a token of exactly the shipped ServiceAccount and RBAC, and fails without
// any of its rules (without pods get, a deleted pod's files would never be cleared). (Within the namespaces rule, client-go 0.37's informer gets by with list alone,
// by relisting, or with watch alone, by streaming lists; both verbs stay so that it neither polls nor
// depends on streaming-list support.)
func TestBrokerRBACIsExactlyEnough(t *testing.T) {
	e := newBrokerEnv(t)
	ctx := context.Background()
	var role rbacv1.ClusterRole
	for _, o := range render(t, "../../deploy/overlays/prod") {
		if o.GetKind() == "ClusterRole" {
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &role); err != nil {
				t.Fatal(err)
			}
		}
	}
	if len(role.Rules) == 0 {
		t.Fatal("no ClusterRole rules in the manifests")
	}
	type variant struct {
		name  string
		rules []rbacv1.PolicyRule
	}
	variants := []variant{{"as shipped", role.Rules}}
	for i, r := range role.Rules {
		rules := append(append([]rbacv1.PolicyRule{}, role.Rules[:i]...), role.Rules[i+1:]...)
		variants = append(variants, variant{"without the " + r.Resources[0] + " rule", rules})
		if r.Resources[0] == "pods" {
			if fmt.Sprint(r.APIGroups, r.Resources, r.Verbs) != "[] [pods] [get list watch]" {
				t.Fatalf("the pods rule is more than get (a rejected token's pod) and list, watch (the node's pod informer): %+v", r)
			}
			for _, verb := range r.Verbs { // each verb is needed on its own
				only := r.DeepCopy()
				only.Verbs = slices.DeleteFunc(slices.Clone(r.Verbs), func(v string) bool { return v == verb })
				variants = append(variants, variant{"pods without " + verb, append(slices.Clone(rules), *only)})
			}
		}
		if r.Resources[0] == "events" {
			if fmt.Sprint(r.APIGroups, r.Resources, r.Verbs) != "[] [events] [create patch]" {
				t.Fatalf("the events rule grows the role by more than events create, patch: %+v", r)
			}
			for _, verb := range r.Verbs { // each verb is needed on its own
				only := r.DeepCopy()
				only.Verbs = slices.DeleteFunc(slices.Clone(r.Verbs), func(v string) bool { return v == verb })
				variants = append(variants, variant{"events without " + verb, append(slices.Clone(rules), *only)})
			}
		}
	}
	if len(variants) != 10 {
		t.Fatalf("expected the shipped rules to be tokenreviews, namespaces, pods and events; got %+v", role.Rules)
	}
	for i, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			sa := fmt.Sprintf("broker-rbac-%d", i)
			if _, err := e.kube.CreateServiceAccount(ctx, "kube-system", sa); err != nil {
				t.Fatal(err)
			}
			if _, err := e.kube.Client.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: sa}, Rules: v.rules}, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			if err := e.kube.BindClusterRole(ctx, sa, sa, "kube-system", sa); err != nil {
				t.Fatal(err)
			}
			tok, err := e.kube.ServiceAccountToken(ctx, "kube-system", sa, nil, time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			err = brokerWith(t, e, e.kube.ConfigForToken(tok), i)
			if i == 0 && err != nil {
				t.Fatalf("with the shipped RBAC: %v", err)
			}
			if i > 0 && err == nil {
				t.Fatalf("%s: the broker still worked; the rule is not needed", v.name)
			}
			t.Logf("%s: %v", v.name, err)
		})
	}
}

// brokerWith starts a broker with the clients keyward-broker builds from cfg and has a pod of a namespace created after the broker started
// read its secret: it needs TokenReview (create), the namespace list and the watch that shows it. Then
// the pod is deleted and its republish must be recognized as a withdrawal: that needs pods get.
func brokerWith(t *testing.T, e *brokerEnv, cfg *rest.Config, i int) error {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	meta, err := metadata.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	nsw := policy.NewNamespaceWatcher(meta, 0)
	nsw.Start(ctx)
	syncCtx, syncCancel := context.WithTimeout(ctx, 5*time.Second)
	synced := nsw.WaitForSync(syncCtx)
	syncCancel()
	if !synced {
		return errors.New("namespace informer never synced (cannot list namespaces)")
	}
	// The node's pod informer (the provider API's): list to sync, watch to see deletions as they happen.
	pw := podwatch.New(meta, "node-1")
	deleted := make(chan string, 64)
	pw.OnDelete(func(uid string) { deleted <- uid })
	pw.Start(ctx)
	syncCtx, syncCancel = context.WithTimeout(ctx, 5*time.Second)
	synced = pw.WaitForSync(syncCtx)
	syncCancel()
	if !synced {
		return errors.New("pod informer never synced (cannot list pods)")
	}
	ns := fmt.Sprintf("late-%d", i)
	pod, req := lateNamespace(t, e, ns)
	svc := rbacService(t, e, cfg, meta, nsw, ns)
	var last error
	for ctx.Err() == nil {
		if _, last = svc.Fetch(ctx, req); last == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if last != nil {
		return last
	}
	if err := podEvents(ctx, e, cfg, pod); err != nil {
		return err
	}
	zero := int64(0)
	if err := e.kube.Client.CoreV1().Pods(ns).Delete(context.Background(), pod.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	req.Published = true
	for ctx.Err() == nil {
		_, last = svc.Fetch(ctx, req)
		if errors.Is(last, fault.ErrWithdrawn) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !errors.Is(last, fault.ErrWithdrawn) {
		return fmt.Errorf("a deleted pod's republish was not recognized as a withdrawal: %v", last)
	}
	// The deletion reaches the pod informer, and through its watch: without watch a relist finds it
	// too, but the failed watch is on record (Err), and provider mounts then release as before.
	for {
		select {
		case uid := <-deleted:
			if uid != string(pod.UID) {
				continue
			}
			if err := pw.Err(); err != nil {
				return fmt.Errorf("pod informer cannot watch: %w", err)
			}
			return nil
		case <-ctx.Done():
			return fmt.Errorf("the pod informer never saw the pod's deletion (watch: %v)", pw.Err())
		}
	}
}

// podEvents posts a SecretsDenied event on pod twice through the broker's event recorder and
// client built from cfg: the first is created, the repeat patches its count. Both must succeed
// (the recorder never fails a publish, so its counts tell) and the pod must show the event, count 2.
func podEvents(ctx context.Context, e *brokerEnv, cfg *rest.Config, pod *corev1.Pod) error {
	sink, err := restsink.New(cfg, "keyward-broker", "node-1")
	if err != nil {
		return err
	}
	rec, err := podevents.New(podevents.Options{Sink: sink})
	if err != nil {
		return err
	}
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go rec.Run(rctx)
	p := podevents.Pod{Namespace: pod.Namespace, Name: pod.Name, UID: string(pod.UID)}
	rec.Denied(p, "rbac probe")
	rec.Denied(p, "rbac probe")
	for rec.Pending() > 0 && ctx.Err() == nil {
		time.Sleep(10 * time.Millisecond)
	}
	if s := rec.Stats(); s.Created != 1 || s.Patched != 1 || s.Failed != 0 {
		return fmt.Errorf("pod events: %+v", s)
	}
	evs, err := e.kube.Client.CoreV1().Events(pod.Namespace).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.uid=" + string(pod.UID)})
	if err != nil {
		return err
	}
	if len(evs.Items) != 1 || evs.Items[0].Reason != podevents.ReasonDenied || evs.Items[0].Count != 2 {
		return fmt.Errorf("the pod's events: %+v", evs.Items)
	}
	return nil
}

// lateNamespace creates a namespace with a pod, its secret in Vault and a Vault role covering it,
// and returns the pod and its request.
func lateNamespace(t *testing.T, e *brokerEnv, ns string) (*corev1.Pod, broker.Request) {
	if _, err := e.kube.CreateNamespace(context.Background(), ns, map[string]string{policy.EnvironmentLabel: "prod"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.kube.CreateServiceAccount(context.Background(), ns, "api"); err != nil {
		t.Fatal(err)
	}
	pod := e.newPod(t, ns, "api-0")
	if _, err := e.vault.PutKV(context.Background(), "kv", "prod/"+ns+"/db", map[string]any{"password": "p"}); err != nil {
		t.Fatal(err)
	}
	if err := e.vault.KubernetesRole(context.Background(), "kubernetes", "prod", []string{"payments-prod", "other-prod", ns}, []string{"*"}, []string{"prod-read"}, audience); err != nil {
		t.Fatal(err)
	}
	tok, err := e.kube.PodToken(context.Background(), pod, []string{audience}, 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	return pod, broker.Request{RequestID: "rbac", Event: audit.EventFetch, Token: broker.Token(tok),
		Claimed: claimOf(pod), Refs: []broker.SecretRef{{Ref: ns + "/db", Key: "password"}}}
}

// rbacService is the broker core built from cfg's clients, with a grant for ns.
func rbacService(t *testing.T, e *brokerEnv, cfg *rest.Config, meta metadata.Interface, nsw *policy.NamespaceWatcher, ns string) *broker.Service {
	reviewer, err := tokenreview.NewReviewer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	p, err := policy.Parse([]byte(strings.Replace(brokerPolicy, "grants:\n", fmt.Sprintf("grants:\n  - {namespace: %s, serviceAccount: api, paths: [\"%s/*\"]}\n", ns, ns), 1)))
	if err != nil {
		t.Fatal(err)
	}
	vc, err := vault.NewClient(vault.ClientOptions{Address: e.vault.Addr, AllowHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	src, err := vault.New(vault.Options{Client: vc, Mode: vault.ModePod, Log: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	dir := harness.Dir(t)
	os.WriteFile(dir+"/k", []byte(strings.Repeat("k", 32)), 0o600)
	aud, err := audit.Open(audit.Options{Dir: dir + "/audit", KeyFile: dir + "/k", Node: "node-1", Stream: "broker"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { aud.Close() })
	svc, err := broker.NewService(broker.Options{Authenticator: tokenreview.New(tokenreview.Options{Client: reviewer, CacheTTL: 100 * time.Millisecond}),
		Authorizer: policy.NewAuthorizer(p, nsw), Source: src, Auditor: aud, Audiences: []string{audience}, Pods: tokenreview.PodLookup{Client: meta}})
	if err != nil {
		t.Fatal(err)
	}
	return svc
}
