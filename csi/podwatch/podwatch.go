package podwatch

import (
	"context"
	"sync"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/tools/cache"
)

var podsResource = schema.GroupVersionResource{Version: "v1", Resource: "pods"}

const byUID = "uid"

// Watcher is the node's pods, metadata only.
type Watcher struct {
	informer cache.SharedIndexInformer

	mu       sync.Mutex
	watchErr error // the last watch's error, until a watch starts again
	onDelete []func(uid string)
}

// New builds the informer for the pods bound to node; Start runs it.
func New(client metadata.Interface, node string) *Watcher {
	w := &Watcher{}
	pods := client.Resource(podsResource)
	sel := fields.OneTermEqualSelector("spec.nodeName", node).String()
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			o.FieldSelector = sel
			return pods.List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			o.FieldSelector = sel
			wi, err := pods.Watch(ctx, o)
			w.mu.Lock()
			w.watchErr = err
			w.mu.Unlock()
			return wi, err
		},
	}
	w.informer = cache.NewSharedIndexInformer(listThenWatch{lw}, &metav1.PartialObjectMetadata{}, 0, cache.Indexers{byUID: func(obj any) ([]string, error) {
		if m, ok := obj.(*metav1.PartialObjectMetadata); ok {
			return []string{string(m.UID)}, nil
		}
		return nil, nil
	}})
	w.informer.AddEventHandler(cache.ResourceEventHandlerFuncs{DeleteFunc: w.deleted})
	return w
}

// Start runs the informer until ctx ends.
func (w *Watcher) Start(ctx context.Context) { go w.informer.RunWithContext(ctx) }

// WaitForSync blocks until the first list is in, or ctx ends.
func (w *Watcher) WaitForSync(ctx context.Context) bool {
	return cache.WaitForCacheSync(ctx.Done(), w.informer.HasSynced)
}

// Err is why the watcher cannot be trusted to see deletions now: the last watch failed (nil once
// one runs again).
func (w *Watcher) Err() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.watchErr
}

// Live reports whether the pod with the UID is on the node as far as the informer knows; trusted
// is false while the informer has not synced or its watch is failing (then a pod's deletion may not
// be seen, and callers must not hold anything for the pod on live's word).
func (w *Watcher) Live(uid string) (live, trusted bool) {
	if !w.informer.HasSynced() || w.Err() != nil {
		return false, false
	}
	objs, err := w.informer.GetIndexer().ByIndex(byUID, uid)
	if err != nil {
		return false, false
	}
	return len(objs) > 0, true
}

// OnDelete registers f to be called with the UID of each pod deleted from the node (after it left
// the informer's store: Live already says false). Register before Start.
func (w *Watcher) OnDelete(f func(uid string)) {
	w.mu.Lock()
	w.onDelete = append(w.onDelete, f)
	w.mu.Unlock()
}

func (w *Watcher) deleted(obj any) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	m, ok := obj.(*metav1.PartialObjectMetadata)
	if !ok {
		return
	}
	w.mu.Lock()
	fs := append([]func(string){}, w.onDelete...)
	w.mu.Unlock()
	for _, f := range fs {
		f(string(m.UID))
	}
}

// listThenWatch keeps the informer on list + watch (no streaming watch-list), so its verbs are the
// same on every apiserver: list is needed, as TestBrokerRBACIsExactlyEnough proves.
type listThenWatch struct{ *cache.ListWatch }

func (listThenWatch) IsWatchListSemanticsUnSupported() bool { return true }
