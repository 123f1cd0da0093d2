package tokenreview

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/internal/fault"
)

// The real TokenReview path (NewReviewer) is covered in test/e2e against kube-apiserver; a fake here
// counts calls and returns statuses the cache logic must handle.
func fakeClient(calls *atomic.Int32, status func(token string) authenticationv1.TokenReviewStatus) Reviewer {
	return ReviewerFunc(func(_ context.Context, tr *authenticationv1.TokenReview) (*authenticationv1.TokenReview, error) {
		calls.Add(1)
		out := tr.DeepCopy()
		out.Status = status(tr.Spec.Token)
		return out, nil
	})
}

func podUser(ns, sa, pod, uid string) authenticationv1.UserInfo {
	return authenticationv1.UserInfo{Username: "system:serviceaccount:" + ns + ":" + sa,
		Extra: map[string]authenticationv1.ExtraValue{ExtraPodName: {pod}, ExtraPodUID: {uid}, ExtraNodeName: {"n1"}}}
}

func jwt(exp time.Time) string {
	p := base64.RawURLEncoding.EncodeToString([]byte(fmt.Sprintf(`{"exp":%d}`, exp.Unix())))
	return "h." + p + ".s"
}

func TestCacheTTLAndTokenExpiry(t *testing.T) {
	var calls atomic.Int32
	now := time.Unix(1_000_000, 0)
	a := New(Options{Client: fakeClient(&calls, func(string) authenticationv1.TokenReviewStatus {
		return authenticationv1.TokenReviewStatus{Authenticated: true, Audiences: []string{"keyward"}, User: podUser("ns", "sa", "p", "u")}
	}), CacheTTL: 5 * time.Second, Now: func() time.Time { return now }})
	ctx := context.Background()
	long := broker.Token(jwt(now.Add(time.Hour)))
	for range 3 {
		id, err := a.Authenticate(ctx, long, []string{"keyward"})
		if err != nil || id.PodUID != "u" || id.Node != "n1" {
			t.Fatalf("%+v %v", id, err)
		}
	}
	if calls.Load() != 1 {
		t.Fatalf("%d reviews for 3 calls within the TTL", calls.Load())
	}
	now = now.Add(5 * time.Second)
	a.Authenticate(ctx, long, []string{"keyward"})
	if calls.Load() != 2 {
		t.Fatal("cache outlived its TTL")
	}
	short := broker.Token(jwt(now.Add(2 * time.Second)))
	a.Authenticate(ctx, short, []string{"keyward"})
	now = now.Add(2 * time.Second)
	a.Authenticate(ctx, short, []string{"keyward"})
	if calls.Load() != 4 {
		t.Fatalf("cache outlived the token's exp (%d reviews)", calls.Load())
	}
	// Another audience is another cache entry.
	a.Authenticate(ctx, long, []string{"other", "keyward"})
	if calls.Load() != 5 {
		t.Fatal("cache shared across audiences")
	}
}

func TestRejections(t *testing.T) {
	for name, st := range map[string]authenticationv1.TokenReviewStatus{
		"not authenticated":   {Authenticated: false, Error: "token has been invalidated"},
		"wrong audience":      {Authenticated: true, Audiences: []string{"api"}, User: podUser("ns", "sa", "p", "u")},
		"not a pod token":     {Authenticated: true, Audiences: []string{"keyward"}, User: authenticationv1.UserInfo{Username: "system:serviceaccount:ns:sa"}},
		"not service account": {Authenticated: true, Audiences: []string{"keyward"}, User: authenticationv1.UserInfo{Username: "alice"}},
	} {
		t.Run(name, func(t *testing.T) {
			var calls atomic.Int32
			a := New(Options{Client: fakeClient(&calls, func(string) authenticationv1.TokenReviewStatus { return st })})
			for range 2 {
				_, err := a.Authenticate(context.Background(), "CANARY-token", []string{"keyward"})
				if !errors.Is(err, fault.ErrUnauthenticated) || strings.Contains(err.Error(), "CANARY") {
					t.Fatalf("err = %v", err)
				}
			}
			if calls.Load() != 2 || a.Len() != 0 {
				t.Fatal("a rejection was cached")
			}
		})
	}
}

func TestCacheIsBounded(t *testing.T) {
	var calls atomic.Int32
	a := New(Options{MaxEntries: 3, Client: fakeClient(&calls, func(string) authenticationv1.TokenReviewStatus {
		return authenticationv1.TokenReviewStatus{Authenticated: true, Audiences: []string{"k"}, User: podUser("ns", "sa", "p", "u")}
	})})
	for i := range 10 {
		a.Authenticate(context.Background(), broker.Token(fmt.Sprint(i)), []string{"k"})
	}
	if a.Len() != 3 {
		t.Fatalf("cache holds %d entries, bound 3", a.Len())
	}
}

func TestApiserverDownIsUnavailable(t *testing.T) {
	c := ReviewerFunc(func(context.Context, *authenticationv1.TokenReview) (*authenticationv1.TokenReview, error) {
		return nil, errors.New("connection refused")
	})
	if _, err := New(Options{Client: c}).Authenticate(context.Background(), "t", []string{"k"}); !errors.Is(err, fault.ErrUnavailable) {
		t.Fatalf("err = %v", err)
	}
}
