package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// kmsStaticPod runs deploy/control-plane/keyward-kms.yaml as a static pod of the node, with the image
// built from this tree under the manifest's own name (realnode.DeployKMS), then gives the apiserver
// deploy/control-plane/encryption-config.yaml: Secrets written afterwards are KMS v2 envelopes of
// keyward-kms in etcd, and read back through it.
func (r *realNode) kmsStaticPod(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	start := time.Now()
	k, err := r.DeployKMS(ctx, nil)
	check(t, err)
	t.Logf("the keyward-kms static pod %s was Ready %s after its manifest was written", k.Pod.Name, time.Since(start).Round(100*time.Millisecond))
	// Before: Secrets are stored as they are (the identity provider).
	secrets := r.Kube.Client.CoreV1().Secrets("payments-prod")
	mk := func(name string) error {
		_, err := secrets.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name},
			StringData: map[string]string{"password": secretCanary}}, metav1.CreateOptions{})
		return err
	}
	check(t, mk("before-kms"))
	raw, err := r.RawSecret(ctx, "payments-prod", "before-kms")
	check(t, err)
	if !strings.Contains(raw, secretCanary) {
		t.Fatal("with the identity provider the Secret is not in etcd as written: the check below would prove nothing")
	}
	start = time.Now()
	name, err := r.UseKMS(ctx, k.Socket, "payments-prod", mk)
	check(t, err)
	t.Logf("the apiserver stored Secrets through keyward-kms %s after the encryption config was written", time.Since(start).Round(100*time.Millisecond))
	rawKeyID(t, r.Etcd, "payments-prod", name) // a keyward envelope, no plaintext
	got, err := secrets.Get(ctx, name, metav1.GetOptions{})
	check(t, err)
	if string(got.Data["password"]) != secretCanary {
		t.Fatal("the Secret stored through keyward-kms does not read back as written")
	}
}
