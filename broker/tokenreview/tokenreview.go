package tokenreview

import (
	"container/list"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/client-go/rest"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/internal/fault"
)

// Extra keys kube-apiserver sets in a TokenReview of a pod-bound service-account token.
const (
	ExtraPodName  = "authentication.kubernetes.io/pod-name"
	ExtraPodUID   = "authentication.kubernetes.io/pod-uid"
	ExtraNodeName = "authentication.kubernetes.io/node-name"
)

// Reviewer creates TokenReviews: the broker's one apiserver call per uncached request.
type Reviewer interface {
	Create(ctx context.Context, review *authenticationv1.TokenReview) (*authenticationv1.TokenReview, error)
}

// ReviewerFunc adapts a function, such as a clientset's TokenReviews().Create, to Reviewer.
type ReviewerFunc func(ctx context.Context, review *authenticationv1.TokenReview) (*authenticationv1.TokenReview, error)

// Create implements Reviewer.
func (f ReviewerFunc) Create(ctx context.Context, review *authenticationv1.TokenReview) (*authenticationv1.TokenReview, error) {
	return f(ctx, review)
}

// NewReviewer returns a Reviewer over a REST client that knows authentication.k8s.io/v1 only. The
// typed clientset would link and initialize client-go's scheme of every API group, about 10 MiB of
// resident memory on every node for one POST.
func NewReviewer(cfg *rest.Config) (Reviewer, error) {
	scheme := runtime.NewScheme()
	if err := authenticationv1.AddToScheme(scheme); err != nil {
		return nil, err
	}
	c := rest.CopyConfig(cfg)
	gv := authenticationv1.SchemeGroupVersion
	c.GroupVersion, c.APIPath = &gv, "/apis"
	c.NegotiatedSerializer = serializer.NewCodecFactory(scheme).WithoutConversion()
	// Protobuf, as kube's own components speak: cheaper than JSON to encode and decode, for the
	// broker and for the apiserver.
	c.ContentType = runtime.ContentTypeProtobuf
	c.AcceptContentTypes = runtime.ContentTypeProtobuf + "," + runtime.ContentTypeJSON
	if c.UserAgent == "" {
		c.UserAgent = rest.DefaultKubernetesUserAgent()
	}
	rc, err := rest.RESTClientFor(c)
	if err != nil {
		return nil, err
	}
	return restReviewer{rc}, nil
}

type restReviewer struct{ c *rest.RESTClient }

func (r restReviewer) Create(ctx context.Context, review *authenticationv1.TokenReview) (*authenticationv1.TokenReview, error) {
	out := &authenticationv1.TokenReview{}
	err := r.c.Post().Resource("tokenreviews").Body(review).Do(ctx).Into(out)
	return out, err
}

// Options configure New.
type Options struct {
	Client Reviewer
	// CacheTTL bounds how long a positive review is reused (default 5s): a deleted pod or a revoked
	// token loses access within about this long. Never past the token's own expiry.
	CacheTTL time.Duration
	// MaxEntries bounds the cache (default 10000).
	MaxEntries int
	Now        func() time.Time
}

// Authenticator is broker.Authenticator over the TokenReview API. Only pod-bound service-account
// tokens for one of the requested audiences are accepted.
type Authenticator struct {
	o     Options
	mu    sync.Mutex
	lru   *list.List // of *entry, most recent first
	byKey map[[32]byte]*list.Element
}

type entry struct {
	key     [32]byte
	id      broker.Identity
	expires time.Time
}

var _ broker.Authenticator = (*Authenticator)(nil)

// New returns an Authenticator.
func New(o Options) *Authenticator {
	if o.CacheTTL == 0 {
		o.CacheTTL = 5 * time.Second
	}
	if o.MaxEntries == 0 {
		o.MaxEntries = 10000
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &Authenticator{o: o, lru: list.New(), byKey: map[[32]byte]*list.Element{}}
}

// Authenticate reviews token. Errors never contain the token.
func (a *Authenticator) Authenticate(ctx context.Context, token broker.Token, audiences []string) (broker.Identity, error) {
	key := cacheKey(token, audiences)
	now := a.o.Now()
	if id, ok := a.get(key, now); ok {
		return id, nil
	}
	tr, err := a.o.Client.Create(ctx, &authenticationv1.TokenReview{
		Spec: authenticationv1.TokenReviewSpec{Token: token.Reveal(), Audiences: audiences},
	})
	if err != nil {
		return broker.Identity{}, fmt.Errorf("token review: %v: %w", err, fault.ErrUnavailable)
	}
	st := tr.Status
	if !st.Authenticated {
		reason := st.Error
		if reason == "" {
			reason = "not authenticated"
		}
		return broker.Identity{}, fmt.Errorf("token rejected by the apiserver (%s): %w", reason, fault.ErrUnauthenticated)
	}
	if !intersects(st.Audiences, audiences) {
		return broker.Identity{}, fmt.Errorf("token audiences %v do not include %v: %w", st.Audiences, audiences, fault.ErrUnauthenticated)
	}
	id, err := identity(st.User)
	if err != nil {
		return broker.Identity{}, err
	}
	exp := now.Add(a.o.CacheTTL)
	if tokenExp, ok := expiry(token); ok && tokenExp.Before(exp) {
		exp = tokenExp
	}
	a.put(key, id, exp)
	return id, nil
}

// identity accepts only service-account users with pod binding in extra.
func identity(u authenticationv1.UserInfo) (broker.Identity, error) {
	rest, ok := strings.CutPrefix(u.Username, "system:serviceaccount:")
	ns, sa, ok2 := strings.Cut(rest, ":")
	if !ok || !ok2 || ns == "" || sa == "" {
		return broker.Identity{}, fmt.Errorf("user %q is not a service account: %w", u.Username, fault.ErrUnauthenticated)
	}
	one := func(k string) string {
		if v := u.Extra[k]; len(v) == 1 {
			return v[0]
		}
		return ""
	}
	id := broker.Identity{Namespace: ns, ServiceAccount: sa, PodName: one(ExtraPodName), PodUID: one(ExtraPodUID), Node: one(ExtraNodeName)}
	if id.PodName == "" || id.PodUID == "" {
		return broker.Identity{}, fmt.Errorf("token of %s/%s is not bound to a pod (legacy or unbound tokens are refused): %w", ns, sa, fault.ErrUnauthenticated)
	}
	return id, nil
}

func intersects(a, b []string) bool {
	for _, x := range a {
		for _, y := range b {
			if x == y {
				return true
			}
		}
	}
	return false
}

func cacheKey(token broker.Token, audiences []string) [32]byte {
	h := sha256.New()
	h.Write([]byte(token.Reveal()))
	for _, a := range audiences {
		h.Write([]byte{0})
		h.Write([]byte(a))
	}
	var k [32]byte
	copy(k[:], h.Sum(nil))
	return k
}

// expiry reads the exp claim of a JWT without verifying it: the apiserver already did, and it only
// ever shortens how long a review is cached.
func expiry(token broker.Token) (time.Time, bool) {
	parts := strings.Split(token.Reveal(), ".")
	if len(parts) != 3 {
		return time.Time{}, false
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return time.Time{}, false
	}
	var c struct {
		Exp int64 `json:"exp"`
	}
	if json.Unmarshal(b, &c) != nil || c.Exp == 0 {
		return time.Time{}, false
	}
	return time.Unix(c.Exp, 0), true
}

func (a *Authenticator) get(key [32]byte, now time.Time) (broker.Identity, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	el, ok := a.byKey[key]
	if !ok {
		return broker.Identity{}, false
	}
	e := el.Value.(*entry)
	if !now.Before(e.expires) {
		a.lru.Remove(el)
		delete(a.byKey, key)
		return broker.Identity{}, false
	}
	a.lru.MoveToFront(el)
	return e.id, true
}

func (a *Authenticator) put(key [32]byte, id broker.Identity, exp time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if el, ok := a.byKey[key]; ok {
		el.Value = &entry{key: key, id: id, expires: exp}
		a.lru.MoveToFront(el)
		return
	}
	a.byKey[key] = a.lru.PushFront(&entry{key: key, id: id, expires: exp})
	for a.lru.Len() > a.o.MaxEntries {
		last := a.lru.Back()
		a.lru.Remove(last)
		delete(a.byKey, last.Value.(*entry).key)
	}
}

// Len is the number of cached reviews.
func (a *Authenticator) Len() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.lru.Len()
}
