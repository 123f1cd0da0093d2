package restsink

import (
	"context"
	"encoding/json"
	"time"

	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"

	"github.com/keyward/keyward/csi/podevents"
)

// Sink posts core/v1 Events (POST /api/v1/namespaces/NS/events, and merge patches of their count):
// RBAC `events: create, patch` in the core group.
type Sink struct {
	c         *rest.RESTClient
	component string
	host      string
}

var _ podevents.Sink = (*Sink)(nil)

// New returns a Sink over a REST client of cfg; component and host fill each event's source
// (keyward-broker and the node's name).
func New(cfg *rest.Config, component, host string) (*Sink, error) {
	c := rest.CopyConfig(cfg)
	gv := schema.GroupVersion{Version: "v1"}
	c.GroupVersion, c.APIPath = &gv, "/api"
	c.NegotiatedSerializer = serializer.NewCodecFactory(runtime.NewScheme()).WithoutConversion()
	c.ContentType = runtime.ContentTypeJSON
	if c.UserAgent == "" {
		c.UserAgent = rest.DefaultKubernetesUserAgent()
	}
	rc, err := rest.RESTClientFor(c)
	if err != nil {
		return nil, err
	}
	return &Sink{c: rc, component: component, host: host}, nil
}

// The JSON of a core/v1 Event, the fields the broker sets.
type objectMeta struct {
	Name      string `json:"name"`
	Namespace string `json:"namespace"`
}

type objectRef struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Namespace  string `json:"namespace"`
	Name       string `json:"name"`
	UID        string `json:"uid,omitempty"`
}

type source struct {
	Component string `json:"component"`
	Host      string `json:"host,omitempty"`
}

type event struct {
	APIVersion         string     `json:"apiVersion"`
	Kind               string     `json:"kind"`
	Metadata           objectMeta `json:"metadata"`
	InvolvedObject     objectRef  `json:"involvedObject"`
	Reason             string     `json:"reason"`
	Message            string     `json:"message"`
	Type               string     `json:"type"`
	Source             source     `json:"source"`
	FirstTimestamp     time.Time  `json:"firstTimestamp"`
	LastTimestamp      time.Time  `json:"lastTimestamp"`
	Count              int        `json:"count"`
	ReportingComponent string     `json:"reportingComponent"`
	ReportingInstance  string     `json:"reportingInstance,omitempty"`
}

// Create posts a new Event named name on ev.Pod.
func (s *Sink) Create(ctx context.Context, name string, ev podevents.Event) error {
	t := ev.Time.UTC().Truncate(time.Second)
	body, err := json.Marshal(event{
		APIVersion: "v1", Kind: "Event",
		Metadata:       objectMeta{Name: name, Namespace: ev.Pod.Namespace},
		InvolvedObject: objectRef{APIVersion: "v1", Kind: "Pod", Namespace: ev.Pod.Namespace, Name: ev.Pod.Name, UID: ev.Pod.UID},
		Reason:         ev.Reason, Message: ev.Message, Type: ev.Type,
		Source:         source{Component: s.component, Host: s.host},
		FirstTimestamp: t, LastTimestamp: t, Count: 1,
		ReportingComponent: s.component, ReportingInstance: s.host,
	})
	if err != nil {
		return err
	}
	return s.c.Post().Namespace(ev.Pod.Namespace).Resource("events").Body(body).Do(ctx).Error()
}

// Patch sets an Event's count and last time (a merge patch).
func (s *Sink) Patch(ctx context.Context, namespace, name string, count int, last time.Time) error {
	body, err := json.Marshal(map[string]any{"count": count, "lastTimestamp": last.UTC().Truncate(time.Second)})
	if err != nil {
		return err
	}
	return s.c.Patch(types.MergePatchType).Namespace(namespace).Resource("events").Name(name).Body(body).Do(ctx).Error()
}
