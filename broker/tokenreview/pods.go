package tokenreview

import (
	"context"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/metadata"

	"github.com/keyward/keyward/broker"
)

var podsResource = schema.GroupVersionResource{Version: "v1", Resource: "pods"}

// PodLookup is broker.PodChecker over the apiserver: one GET of the pod's metadata, asked only when
// a republished pod's token is rejected, to tell a deleted pod (its files go) from a token the
// apiserver rejects for another reason (its files stay).
type PodLookup struct {
	Client metadata.Interface
}

var _ broker.PodChecker = PodLookup{}

// Gone reports whether the pod namespace/name with uid is gone: not found, or found with another
// UID (deleted and replaced by a pod of the same name). Any error is "not known to be gone".
func (p PodLookup) Gone(ctx context.Context, namespace, name, uid string) (bool, error) {
	m, err := p.Client.Resource(podsResource).Namespace(namespace).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	return string(m.UID) != uid, nil
}
