package policy

import (
	"context"
	"fmt"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/tools/cache"

	"github.com/keyward/keyward/internal/fault"
)

// NamespaceWatcher keeps namespaces' environment labels in an informer cache (list+watch), so
// requests never call the apiserver for them. It lists and watches object metadata only (labels are
// all it needs), through client-go's metadata client, so the broker neither receives namespace specs
// nor links client-go's typed clients and scheme of every API group.
type NamespaceWatcher struct {
	informer cache.SharedIndexInformer
}

var _ Namespaces = (*NamespaceWatcher)(nil)

var namespacesResource = schema.GroupVersionResource{Version: "v1", Resource: "namespaces"}

// NewNamespaceWatcher builds the informer; Start runs it.
func NewNamespaceWatcher(client metadata.Interface, resync time.Duration) *NamespaceWatcher {
	ns := client.Resource(namespacesResource)
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			return ns.List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			return ns.Watch(ctx, o)
		},
	}
	return &NamespaceWatcher{informer: cache.NewSharedIndexInformer(lw, &metav1.PartialObjectMetadata{}, resync, cache.Indexers{})}
}

// Start runs the informer until ctx ends.
func (w *NamespaceWatcher) Start(ctx context.Context) { go w.informer.RunWithContext(ctx) }

// HasSynced reports whether the first list has completed.
func (w *NamespaceWatcher) HasSynced() bool { return w.informer.HasSynced() }

// WaitForSync blocks until synced or ctx ends.
func (w *NamespaceWatcher) WaitForSync(ctx context.Context) bool {
	return cache.WaitForCacheSync(ctx.Done(), w.informer.HasSynced)
}

// EnvironmentOf returns the namespace's keyward.dev/environment label.
func (w *NamespaceWatcher) EnvironmentOf(namespace string) (string, bool, error) {
	if !w.informer.HasSynced() {
		return "", false, fmt.Errorf("namespace cache not synced yet: %w", fault.ErrUnavailable)
	}
	obj, exists, err := w.informer.GetStore().GetByKey(namespace)
	if err != nil {
		return "", false, fmt.Errorf("namespace %q: %v: %w", namespace, err, fault.ErrUnavailable)
	}
	if !exists {
		return "", false, fmt.Errorf("namespace %q not found: %w", namespace, fault.ErrDenied)
	}
	m, ok := obj.(*metav1.PartialObjectMetadata)
	if !ok {
		return "", false, fmt.Errorf("namespace %q: unexpected cache object %T: %w", namespace, obj, fault.ErrUnavailable)
	}
	env, ok := m.Labels[EnvironmentLabel]
	return env, ok && env != "", nil
}

// StaticNamespaces is a fixed namespace -> environment map, for `keywardctl policy check` and tests.
type StaticNamespaces map[string]string

// EnvironmentOf implements Namespaces.
func (s StaticNamespaces) EnvironmentOf(namespace string) (string, bool, error) {
	env, ok := s[namespace]
	return env, ok && env != "", nil
}
