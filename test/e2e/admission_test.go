package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"

	"github.com/keyward/keyward/broker/policy"
	"github.com/keyward/keyward/test/harness"
)

// labelGuard is a real kube-apiserver with a namespace admin (alice: admin in team-a and team-b, and
// allowed to update and patch those namespaces and create namespaces) and an environment admin
// (erin, in group keyward:environment-admins, allowed the same cluster-wide).
type labelGuard struct {
	kube        *harness.KubeAPIServer
	alice, erin kubernetes.Interface
}

// Only environment admins and cluster admins may add, change or remove a namespace's
// keyward.dev/environment label: deploy/base's ValidatingAdmissionPolicy, applied as shipped (rendered
// from deploy/base), against the real kube-apiserver. RBAC alone lets a namespace admin who may
// update its namespace relabel it (the first step proves it), so the policy is what refuses.
func TestOnlyEnvironmentAdminsSetTheEnvironmentLabel(t *testing.T) {
	g := &labelGuard{kube: harness.KubeT(t, harness.KubeOptions{})}
	runSteps(t,
		step{"namespaces, a namespace admin and an environment admin", g.setup},
		step{"without the policy, RBAC lets the namespace admin relabel its namespace", g.withoutPolicy},
		step{"the shipped policy is applied and enforced", g.applyPolicy},
		step{"the namespace admin cannot add, change or remove the label", g.namespaceAdminRefused},
		step{"the namespace admin can still edit other labels and create unlabelled namespaces", g.namespaceAdminAllowed},
		step{"the environment admin and the cluster admin can", g.environmentAdminAllowed},
	)
}

const envLabel = policy.EnvironmentLabel

func (g *labelGuard) setup(t *testing.T) {
	ctx, k := context.Background(), g.kube.Client
	if _, err := g.kube.CreateNamespace(ctx, "team-a", map[string]string{envLabel: "prod"}); err != nil {
		t.Fatal(err)
	}
	if _, err := g.kube.CreateNamespace(ctx, "team-b", nil); err != nil {
		t.Fatal(err)
	}
	editor := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "namespace-editor"}, Rules: []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"namespaces", "namespaces/status"}, Verbs: []string{"get", "update", "patch"}}}}
	creator := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "namespace-creator"}, Rules: []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"namespaces"}, Verbs: []string{"create"}}}}
	for _, r := range []*rbacv1.ClusterRole{editor, creator} {
		if _, err := k.RbacV1().ClusterRoles().Create(ctx, r, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	alice := rbacv1.Subject{Kind: "User", APIGroup: "rbac.authorization.k8s.io", Name: "alice"}
	envAdmins := rbacv1.Subject{Kind: "Group", APIGroup: "rbac.authorization.k8s.io", Name: "keyward:environment-admins"}
	// alice is admin in her namespaces, and may update them: a RoleBinding in a namespace covers the
	// Namespace object of that name.
	for _, ns := range []string{"team-a", "team-b"} {
		for _, role := range []string{"admin", "namespace-editor"} {
			if _, err := k.RbacV1().RoleBindings(ns).Create(ctx, &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "alice-" + role},
				RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: role},
				Subjects: []rbacv1.Subject{alice}}, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
	}
	for name, b := range map[string]struct {
		role     string
		subjects []rbacv1.Subject
	}{"creators": {"namespace-creator", []rbacv1.Subject{alice, envAdmins}}, "environment-admins": {"namespace-editor", []rbacv1.Subject{envAdmins}}} {
		if _, err := k.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: name},
			RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: b.role},
			Subjects: b.subjects}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	g.alice, g.erin = g.as(t, "alice"), g.as(t, "erin", "keyward:environment-admins")
}

// as is a client of user in groups (the admin impersonating them).
func (g *labelGuard) as(t *testing.T, user string, groups ...string) kubernetes.Interface {
	cfg := rest.CopyConfig(g.kube.Config)
	cfg.Impersonate = rest.ImpersonationConfig{UserName: user, Groups: append(groups, "system:authenticated")}
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// setLabel merge-patches the namespace's environment label (nil value: remove it) as c.
func setLabel(c kubernetes.Interface, ns string, value *string, subresources ...string) error {
	v := "null"
	if value != nil {
		v = fmt.Sprintf("%q", *value)
	}
	_, err := c.CoreV1().Namespaces().Patch(context.Background(), ns, types.MergePatchType,
		[]byte(fmt.Sprintf(`{"metadata":{"labels":{%q:%s}}}`, envLabel, v)), metav1.PatchOptions{}, subresources...)
	return err
}

func ptr(s string) *string { return &s }

// label is the namespace's environment label as the apiserver holds it ("" and false: none).
func (g *labelGuard) label(t *testing.T, ns string) (string, bool) {
	t.Helper()
	n, err := g.kube.Client.CoreV1().Namespaces().Get(context.Background(), ns, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	v, ok := n.Labels[envLabel]
	return v, ok
}

func (g *labelGuard) withoutPolicy(t *testing.T) {
	eventually(t, 10*time.Second, "RBAC lets alice patch team-a", func() error { return setLabel(g.alice, "team-a", ptr("dev")) })
	if v, _ := g.label(t, "team-a"); v != "dev" {
		t.Fatalf("team-a's label is %q after alice's patch", v)
	}
	if err := setLabel(g.kube.Client, "team-a", ptr("prod")); err != nil {
		t.Fatal(err)
	}
}

// The policy and its binding, rendered from deploy/base as kustomize applies them.
func (g *labelGuard) applyPolicy(t *testing.T) {
	var created []string
	for _, o := range render(t, "../../deploy/base") {
		if o.GetAPIVersion() != "admissionregistration.k8s.io/v1" {
			continue
		}
		if o.GetNamespace() != "" {
			t.Errorf("%s %s rendered with namespace %q: it is cluster-scoped", o.GetKind(), o.GetName(), o.GetNamespace())
		}
		dryRun(t, g.kube, map[string][]*unstructured.Unstructured{"base": {o}}) // schema and strict field validation
		if err := createObject(t, g.kube, o); err != nil {
			t.Fatalf("%s %s: %v", o.GetKind(), o.GetName(), err)
		}
		created = append(created, o.GetKind())
	}
	if strings.Join(created, ",") != "ValidatingAdmissionPolicy,ValidatingAdmissionPolicyBinding" &&
		strings.Join(created, ",") != "ValidatingAdmissionPolicyBinding,ValidatingAdmissionPolicy" {
		t.Fatalf("deploy/base renders %v, want the policy and its binding", created)
	}
	start := time.Now()
	eventually(t, 60*time.Second, "the policy refuses alice's relabel", func() error {
		err := setLabel(g.alice, "team-a", ptr("dev"))
		if err == nil {
			setLabel(g.kube.Client, "team-a", ptr("prod"))
			return fmt.Errorf("alice relabelled team-a")
		}
		return refusedByPolicy(err)
	})
	t.Logf("the policy was enforced %s after it was created", time.Since(start).Round(100*time.Millisecond))
}

// refusedByPolicy is nil if err is the shipped policy's refusal.
func refusedByPolicy(err error) error {
	if err == nil {
		return fmt.Errorf("allowed")
	}
	if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), "keyward-environment-label") || !strings.Contains(err.Error(), "keyward:environment-admins") {
		return fmt.Errorf("not the policy's refusal: %v", err)
	}
	return nil
}

func (g *labelGuard) namespaceAdminRefused(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct {
		name string
		try  func() error
	}{
		{"change it", func() error { return setLabel(g.alice, "team-a", ptr("dev")) }},
		{"empty it", func() error { return setLabel(g.alice, "team-a", ptr("")) }},
		{"remove it", func() error { return setLabel(g.alice, "team-a", nil) }},
		{"add it", func() error { return setLabel(g.alice, "team-b", ptr("prod")) }},
		{"change it with an update", func() error {
			n, err := g.alice.CoreV1().Namespaces().Get(ctx, "team-a", metav1.GetOptions{})
			if err != nil {
				return err
			}
			n.Labels[envLabel] = "dev"
			_, err = g.alice.CoreV1().Namespaces().Update(ctx, n, metav1.UpdateOptions{})
			return err
		}},
		{"create a namespace with it", func() error {
			_, err := g.alice.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "alice-prod",
				Labels: map[string]string{envLabel: "prod"}}}, metav1.CreateOptions{})
			return err
		}},
	} {
		if err := refusedByPolicy(c.try()); err != nil {
			t.Errorf("%s: %v", c.name, err)
		}
	}
	// Through the status subresource: refused, or the label does not change.
	if err := setLabel(g.alice, "team-a", ptr("dev"), "status"); err != nil && refusedByPolicy(err) != nil {
		t.Errorf("status: %v", err)
	} else {
		t.Logf("a relabel through namespaces/status: %v", err)
	}
	if v, ok := g.label(t, "team-a"); v != "prod" || !ok {
		t.Errorf("team-a's label is %q (%v), want prod", v, ok)
	}
	if _, ok := g.label(t, "team-b"); ok {
		t.Error("team-b got a label")
	}
	if _, err := g.kube.Client.CoreV1().Namespaces().Get(ctx, "alice-prod", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("alice-prod exists: %v", err)
	}
}

func (g *labelGuard) namespaceAdminAllowed(t *testing.T) {
	ctx := context.Background()
	if _, err := g.alice.CoreV1().Namespaces().Patch(ctx, "team-a", types.MergePatchType, []byte(`{"metadata":{"labels":{"team":"payments"}}}`), metav1.PatchOptions{}); err != nil {
		t.Errorf("another label: %v", err)
	}
	if _, err := g.alice.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "alice-plain",
		Labels: map[string]string{"team": "payments"}}}, metav1.CreateOptions{}); err != nil {
		t.Errorf("an unlabelled namespace: %v", err)
	}
	if v, _ := g.label(t, "team-a"); v != "prod" {
		t.Errorf("team-a's environment is %q", v)
	}
}

func (g *labelGuard) environmentAdminAllowed(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct {
		name string
		try  func() error
		ns   string
		want string // "": no label
	}{
		{"erin changes it", func() error { return setLabel(g.erin, "team-a", ptr("dev")) }, "team-a", "dev"},
		{"erin removes it", func() error { return setLabel(g.erin, "team-a", nil) }, "team-a", ""},
		{"erin adds it", func() error { return setLabel(g.erin, "team-b", ptr("prod")) }, "team-b", "prod"},
		{"erin creates a labelled namespace", func() error {
			_, err := g.erin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "erin-prod",
				Labels: map[string]string{envLabel: "prod"}}}, metav1.CreateOptions{})
			return err
		}, "erin-prod", "prod"},
		{"the cluster admin changes it", func() error { return setLabel(g.kube.Client, "team-b", ptr("dev")) }, "team-b", "dev"},
		{"the cluster admin removes it", func() error { return setLabel(g.kube.Client, "team-b", nil) }, "team-b", ""},
	} {
		if err := c.try(); err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		if v, _ := g.label(t, c.ns); v != c.want {
			t.Errorf("%s: %s's label is %q, want %q", c.name, c.ns, v, c.want)
		}
	}
}

// createObject creates o for real (cluster-scoped or in its namespace).
func createObject(t *testing.T, kube *harness.KubeAPIServer, o *unstructured.Unstructured) error {
	t.Helper()
	dyn, err := dynamic.NewForConfig(kube.Config)
	if err != nil {
		t.Fatal(err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(kube.Client.Discovery()))
	gvk := o.GroupVersionKind()
	m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		return err
	}
	var ri dynamic.ResourceInterface = dyn.Resource(m.Resource)
	if m.Scope.Name() == "namespace" {
		ri = dyn.Resource(m.Resource).Namespace(o.GetNamespace())
	}
	_, err = ri.Create(context.Background(), o, metav1.CreateOptions{FieldValidation: "Strict"})
	return err
}
