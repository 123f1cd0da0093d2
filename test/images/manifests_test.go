package images

import (
	"os"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// The shipped manifests run each image as the image's own user: keyward-kms as 65532 (its static
// pod says so, and refuses root), the broker as root (privileged, no other user set).
func TestManifestsRunTheImagesAsTheirUsers(t *testing.T) {
	var pod corev1.Pod
	readYAML(t, "../../deploy/control-plane/keyward-kms.yaml", &pod)
	uid, gid := ids(t, users["keyward-kms"])
	sc := pod.Spec.SecurityContext
	if sc == nil || sc.RunAsUser == nil || *sc.RunAsUser != int64(uid) || sc.RunAsGroup == nil ||
		*sc.RunAsGroup != int64(gid) || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot {
		t.Errorf("keyward-kms static pod securityContext %+v, want runAsUser %d, runAsGroup %d, runAsNonRoot", sc, uid, gid)
	}
	for _, c := range pod.Spec.Containers {
		if !strings.HasPrefix(c.Image, "keyward/keyward-kms:") {
			t.Errorf("static pod container %s runs %s", c.Name, c.Image)
		}
		if c.SecurityContext != nil && c.SecurityContext.RunAsUser != nil && *c.SecurityContext.RunAsUser != int64(uid) {
			t.Errorf("static pod container %s overrides the user: %d", c.Name, *c.SecurityContext.RunAsUser)
		}
	}

	var ds appsv1.DaemonSet
	readYAML(t, "../../deploy/base/daemonset.yaml", &ds)
	if users["keyward-broker"] != "0:0" {
		t.Fatalf("the broker image runs as %s: the DaemonSet must say so", users["keyward-broker"])
	}
	found := false
	for _, c := range ds.Spec.Template.Spec.Containers {
		if !strings.HasPrefix(c.Image, "keyward/keyward-broker:") {
			continue
		}
		found = true
		for _, s := range []struct {
			user    *int64
			nonRoot *bool
		}{
			{ptrUser(ds.Spec.Template.Spec.SecurityContext), ptrNonRoot(ds.Spec.Template.Spec.SecurityContext)},
			{ptrUserC(c.SecurityContext), ptrNonRootC(c.SecurityContext)},
		} {
			if s.user != nil && *s.user != 0 || s.nonRoot != nil && *s.nonRoot {
				t.Errorf("the broker container would not run as root (runAsUser %v, runAsNonRoot %v)", deref(s.user), s.nonRoot)
			}
		}
	}
	if !found {
		t.Error("no container of the DaemonSet runs keyward/keyward-broker")
	}
}

func readYAML(t *testing.T, path string, into any) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, into); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

func ptrUser(sc *corev1.PodSecurityContext) *int64 {
	if sc == nil {
		return nil
	}
	return sc.RunAsUser
}

func ptrNonRoot(sc *corev1.PodSecurityContext) *bool {
	if sc == nil {
		return nil
	}
	return sc.RunAsNonRoot
}

func ptrUserC(sc *corev1.SecurityContext) *int64 {
	if sc == nil {
		return nil
	}
	return sc.RunAsUser
}

func ptrNonRootC(sc *corev1.SecurityContext) *bool {
	if sc == nil {
		return nil
	}
	return sc.RunAsNonRoot
}

func deref(p *int64) string {
	if p == nil {
		return "unset"
	}
	return strconv.FormatInt(*p, 10)
}
