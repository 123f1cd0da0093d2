package broker_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/keyward/keyward/broker"
)

// Fakes force the faults the real parts cannot produce on demand; the real parts are tested in
// test/e2e against kube-apiserver and Vault.
type fakeAuthn struct {
	id  broker.Identity
	err error
}

func (f fakeAuthn) Authenticate(context.Context, broker.Token, []string) (broker.Identity, error) {
	return f.id, f.err
}

type fakeAuthz struct{ deny map[string]bool }

func (f fakeAuthz) Authorize(_ context.Context, _ broker.Identity, ref broker.SecretRef) (broker.Resolved, error) {
	if f.deny[ref.Ref] {
		return broker.Resolved{}, fmt.Errorf("no grant: %w", broker.ErrDenied)
	}
	return broker.Resolved{SecretRef: ref, Environment: "prod", Mount: "kv", Path: "prod/" + ref.Ref, Reason: "grant 0"}, nil
}

type fakeSource struct {
	calls int
	err   error
}

func (f *fakeSource) Fetch(_ context.Context, _ broker.Identity, _ broker.Token, refs []broker.Resolved) ([]broker.Secret, error) {
	f.calls++
	if f.err != nil {
		return nil, f.err
	}
	out := make([]broker.Secret, len(refs))
	for i, r := range refs {
		out[i] = broker.Secret{Ref: r.SecretRef, Version: 3, Value: []byte("CANARY-" + r.Ref)}
	}
	return out, nil
}

type fakeAudit struct {
	evs []broker.Event
	err error
}

func (f *fakeAudit) Record(_ context.Context, ev broker.Event) error {
	f.evs = append(f.evs, ev)
	return f.err
}

var pod = broker.Identity{Namespace: "payments", ServiceAccount: "api", PodName: "api-0", PodUID: "uid-1", Node: "n1"}

func newSvc(t *testing.T, authn fakeAuthn, authz fakeAuthz, src *fakeSource, aud *fakeAudit) *broker.Service {
	t.Helper()
	s, err := broker.NewService(broker.Options{Authenticator: authn, Authorizer: authz, Source: src, Auditor: aud, Audiences: []string{"keyward"}})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func req(refs ...string) broker.Request {
	r := broker.Request{RequestID: "r1", Event: broker.EventMount, Token: "tok-CANARY", Claimed: pod}
	for _, ref := range refs {
		r.Refs = append(r.Refs, broker.SecretRef{Ref: ref, Key: "password"})
	}
	return r
}

func TestServiceDecisionsAndOneAuditRecordEach(t *testing.T) {
	for _, tc := range []struct {
		name      string
		authn     fakeAuthn
		deny      map[string]bool
		srcErr    error
		req       broker.Request
		want      error
		event     broker.EventType
		decision  broker.Decision
		wantFetch bool
	}{
		{"allowed", fakeAuthn{id: pod}, nil, nil, req("payments/db", "payments/api"), nil, broker.EventMount, broker.Allow, true},
		{"unauthenticated", fakeAuthn{err: broker.ErrUnauthenticated}, nil, nil, req("payments/db"), broker.ErrUnauthenticated, broker.EventAuthenticate, broker.Deny, false},
		{"one ref denied denies all", fakeAuthn{id: pod}, map[string]bool{"payments/api": true}, nil, req("payments/db", "payments/api"), broker.ErrDenied, broker.EventAuthorize, broker.Deny, false},
		{"claim mismatch", fakeAuthn{id: broker.Identity{Namespace: "payments", ServiceAccount: "api", PodName: "api-1", PodUID: "uid-2"}}, nil, nil, req("payments/db"), broker.ErrDenied, broker.EventAuthenticate, broker.Deny, false},
		{"no refs", fakeAuthn{id: pod}, nil, nil, req(), broker.ErrInvalid, broker.EventAuthorize, broker.Deny, false},
		{"no token", fakeAuthn{id: pod}, nil, nil, broker.Request{Refs: []broker.SecretRef{{Ref: "a"}}}, broker.ErrUnauthenticated, broker.EventAuthenticate, broker.Deny, false},
		{"vault down", fakeAuthn{id: pod}, nil, fmt.Errorf("dial: %w", broker.ErrUnavailable), req("payments/db"), broker.ErrUnavailable, broker.EventMount, broker.Error, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src, aud := &fakeSource{err: tc.srcErr}, &fakeAudit{}
			secs, err := newSvc(t, tc.authn, fakeAuthz{deny: tc.deny}, src, aud).Fetch(context.Background(), tc.req)
			if tc.want == nil && (err != nil || len(secs) != len(tc.req.Refs)) {
				t.Fatalf("got %d secrets, %v", len(secs), err)
			}
			if tc.want != nil && (!errors.Is(err, tc.want) || secs != nil) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if (src.calls > 0) != tc.wantFetch {
				t.Fatalf("source called %d times", src.calls)
			}
			if len(aud.evs) != 1 {
				t.Fatalf("%d audit records, want exactly 1", len(aud.evs))
			}
			ev := aud.evs[0]
			if ev.Type != tc.event || ev.Decision != tc.decision || ev.Code != broker.CodeName(err) || ev.Reason == "" {
				t.Fatalf("audit %+v", ev)
			}
			if strings.Contains(fmt.Sprintf("%+v", ev), "CANARY") || (err != nil && strings.Contains(err.Error(), "CANARY")) {
				t.Fatal("a token or secret reached the audit record or the error")
			}
		})
	}
}

func TestAuditFailureFailsClosed(t *testing.T) {
	src, aud := &fakeSource{}, &fakeAudit{err: fmt.Errorf("disk: %w", broker.ErrUnavailable)}
	secs, err := newSvc(t, fakeAuthn{id: pod}, fakeAuthz{}, src, aud).Fetch(context.Background(), req("payments/db"))
	if !errors.Is(err, broker.ErrUnavailable) || secs != nil {
		t.Fatalf("got %v, %v; want no secrets and ErrUnavailable", secs, err)
	}
}

func TestSecretsAndTokensDoNotPrint(t *testing.T) {
	s := broker.Secret{Ref: broker.SecretRef{Ref: "a", Key: "k"}, Value: []byte("CANARY")}
	tok := broker.Token("CANARY")
	for _, out := range []string{fmt.Sprint(s), fmt.Sprintf("%+v %#v %s %q", s, s, s, s), fmt.Sprint(tok),
		fmt.Sprintf("%v %+v %#v %s %q %x", tok, tok, tok, tok, tok, tok), fmt.Sprintf("%v", []broker.Secret{s}),
		fmt.Sprintf("%+v", broker.Request{Token: tok})} {
		if strings.Contains(out, "CANARY") || strings.Contains(out, "43414e415259") {
			t.Fatalf("printed a secret: %s", out)
		}
	}
	if b, _ := tok.MarshalJSON(); strings.Contains(string(b), "CANARY") {
		t.Fatal("token marshals")
	}
}

type releasingSource struct {
	fakeSource
	released []string
}

func (r *releasingSource) Release(podUID string) func(context.Context) error {
	r.released = append(r.released, podUID)
	return func(context.Context) error { return nil }
}

// Release reaches a source that holds per-pod credentials, and is a no-op for one that does not.
func TestReleaseReachesPodReleasers(t *testing.T) {
	rs := &releasingSource{}
	s, err := broker.NewService(broker.Options{Authenticator: fakeAuthn{}, Authorizer: fakeAuthz{}, Source: rs, Auditor: &fakeAudit{}, Audiences: []string{"keyward"}})
	if err != nil {
		t.Fatal(err)
	}
	if revoke := s.Release("uid-1"); revoke == nil || len(rs.released) != 1 || rs.released[0] != "uid-1" {
		t.Fatalf("Release: source saw %v", rs.released)
	}
	if revoke := s.Release(""); revoke != nil || len(rs.released) != 1 {
		t.Fatalf("an empty pod UID reached the source: %v", rs.released)
	}
	if revoke := newSvc(t, fakeAuthn{}, fakeAuthz{}, &fakeSource{}, &fakeAudit{}).Release("uid-1"); revoke != nil {
		t.Fatal("a source without per-pod credentials returned a revoke function")
	}
}
