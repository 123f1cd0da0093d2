package policy

import (
	"context"
	"fmt"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/keyward/keyward/broker"
)

// NamespaceWatcher keeps namespaces' environment labels in an informer cache (list+watch), so
// requests never call the apiserver for them.
type NamespaceWatcher struct {
	factory informers.SharedInformerFactory
	synced  cache.InformerSynced
	lister  corelisters.NamespaceLister
}

var _ Namespaces = (*NamespaceWatcher)(nil)

// NewNamespaceWatcher builds the informer; Start runs it.
func NewNamespaceWatcher(client kubernetes.Interface, resync time.Duration) *NamespaceWatcher {
	f := informers.NewSharedInformerFactory(client, resync)
	inf := f.Core().V1().Namespaces()
	w := &NamespaceWatcher{factory: f, lister: inf.Lister()}
	w.synced = inf.Informer().HasSynced
	return w
}

// Start runs the informer until ctx ends.
func (w *NamespaceWatcher) Start(ctx context.Context) { w.factory.Start(ctx.Done()) }

// HasSynced reports whether the first list has completed.
func (w *NamespaceWatcher) HasSynced() bool { return w.synced() }

// WaitForSync blocks until synced or ctx ends.
func (w *NamespaceWatcher) WaitForSync(ctx context.Context) bool {
	return cache.WaitForCacheSync(ctx.Done(), w.synced)
}

// EnvironmentOf returns the namespace's keyward.dev/environment label.
func (w *NamespaceWatcher) EnvironmentOf(namespace string) (string, bool, error) {
	if !w.synced() {
		return "", false, fmt.Errorf("namespace cache not synced yet: %w", broker.ErrUnavailable)
	}
	ns, err := w.lister.Get(namespace)
	if apierrors.IsNotFound(err) {
		return "", false, fmt.Errorf("namespace %q not found: %w", namespace, broker.ErrDenied)
	}
	if err != nil {
		return "", false, fmt.Errorf("namespace %q: %v: %w", namespace, err, broker.ErrUnavailable)
	}
	env, ok := ns.Labels[EnvironmentLabel]
	return env, ok && env != "", nil
}

// StaticNamespaces is a fixed namespace -> environment map, for `keywardctl policy check` and tests.
type StaticNamespaces map[string]string

// EnvironmentOf implements Namespaces.
func (s StaticNamespaces) EnvironmentOf(namespace string) (string, bool, error) {
	env, ok := s[namespace]
	return env, ok && env != "", nil
}
