package broker_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/internal/fault"
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
		return broker.Resolved{}, fmt.Errorf("no grant: %w", fault.ErrDenied)
	}
	return broker.Resolved{SecretRef: ref, Environment: "prod", Mount: "kv", Path: "prod/" + ref.Ref, Reason: "grant 0"}, nil
}

type fakeSource struct {
	calls    int
	err      error
	size     int // each value's length, if set
	maxBytes int64
}

func (f *fakeSource) Fetch(_ context.Context, _ broker.Identity, _ broker.Token, refs []broker.Resolved, maxBytes int64) ([]broker.Secret, error) {
	f.calls++
	f.maxBytes = maxBytes
	if f.err != nil {
		return nil, f.err
	}
	out := make([]broker.Secret, len(refs))
	for i, r := range refs {
		v := []byte("CANARY-" + r.Ref)
		if f.size > 0 {
			v = []byte(strings.Repeat("C", f.size))
		}
		out[i] = broker.Secret{Ref: r.SecretRef, Version: 3, Value: v}
	}
	return out, nil
}

type fakeAudit struct {
	evs []audit.Event
	err error
}

func (f *fakeAudit) Record(_ context.Context, ev audit.Event) error {
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
	r := broker.Request{RequestID: "r1", Event: audit.EventMount, Token: "tok-CANARY", Claimed: pod}
	for _, ref := range refs {
		r.Refs = append(r.Refs, broker.SecretRef{Ref: ref, Key: "password"})
	}
	return r
}

func refNames(r broker.Request) []string {
	var out []string
	for _, ref := range r.Refs {
		out = append(out, ref.Ref)
	}
	return out
}

func TestServiceDecisionsAndOneAuditRecordEach(t *testing.T) {
	for _, tc := range []struct {
		name      string
		authn     fakeAuthn
		deny      map[string]bool
		srcErr    error
		req       broker.Request
		want      error
		event     audit.EventType
		decision  audit.Decision
		wantFetch bool
	}{
		{"allowed", fakeAuthn{id: pod}, nil, nil, req("payments/db", "payments/api"), nil, audit.EventMount, audit.Allowed, true},
		{"unauthenticated", fakeAuthn{err: fault.ErrUnauthenticated}, nil, nil, req("payments/db"), fault.ErrUnauthenticated, audit.EventAuthenticate, audit.Denied, false},
		{"one ref denied denies all", fakeAuthn{id: pod}, map[string]bool{"payments/api": true}, nil, req("payments/db", "payments/api"), fault.ErrDenied, audit.EventAuthorize, audit.Denied, false},
		{"claim mismatch", fakeAuthn{id: broker.Identity{Namespace: "payments", ServiceAccount: "api", PodName: "api-1", PodUID: "uid-2"}}, nil, nil, req("payments/db"), fault.ErrDenied, audit.EventAuthenticate, audit.Denied, false},
		{"no refs", fakeAuthn{id: pod}, nil, nil, req(), fault.ErrInvalid, audit.EventAuthorize, audit.Denied, false},
		{"no token", fakeAuthn{id: pod}, nil, nil, broker.Request{Refs: []broker.SecretRef{{Ref: "a"}}}, fault.ErrUnauthenticated, audit.EventAuthenticate, audit.Denied, false},
		{"vault down", fakeAuthn{id: pod}, nil, fmt.Errorf("dial: %w", fault.ErrUnavailable), req("payments/db"), fault.ErrUnavailable, audit.EventMount, audit.Failed, true},
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
			if ev.Type != tc.event || ev.Decision != tc.decision || ev.Code != fault.ClassOf(err).String() || ev.Reason == "" {
				t.Fatalf("audit %+v", ev)
			}
			if strings.Contains(fmt.Sprintf("%+v", ev), "CANARY") || (err != nil && strings.Contains(err.Error(), "CANARY")) {
				t.Fatal("a token or secret reached the audit record or the error")
			}
			// An allowed record says which Vault version of each ref the pod received (who-has).
			if wantV := map[bool]string{true: "[3 3]", false: "[]"}[tc.want == nil]; fmt.Sprint(ev.Object.Versions) != wantV || ev.Object.Ref != strings.Join(refNames(tc.req), ",") {
				t.Fatalf("audit object %+v, want versions %s", ev.Object, wantV)
			}
		})
	}
}

func TestAuditFailureFailsClosed(t *testing.T) {
	src, aud := &fakeSource{}, &fakeAudit{err: fmt.Errorf("disk: %w", fault.ErrUnavailable)}
	secs, err := newSvc(t, fakeAuthn{id: pod}, fakeAuthz{}, src, aud).Fetch(context.Background(), req("payments/db"))
	if !errors.Is(err, fault.ErrUnavailable) || secs != nil {
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

type fakePods struct {
	gone  bool
	err   error
	calls int
}

func (f *fakePods) Gone(context.Context, string, string, string) (bool, error) {
	f.calls++
	return f.gone, f.err
}

// Only a certain withdrawal (the broker's own policy denies, or the pod is confirmed gone) is marked
// ErrWithdrawn, the mark that lets the CSI driver clear a running pod's files. Everything ambiguous
// is not: a rejected token for a pod that still exists (or cannot be checked), a backend down, Vault
// refusing.
func TestOnlyCertainRefusalsWithdrawAccess(t *testing.T) {
	published := func(r broker.Request) broker.Request { r.Published = true; return r }
	for _, tc := range []struct {
		name      string
		authn     fakeAuthn
		deny      map[string]bool
		srcErr    error
		pods      *fakePods
		req       broker.Request
		withdrawn bool
		podCalls  int
	}{
		{"policy denies", fakeAuthn{id: pod}, map[string]bool{"payments/db": true}, nil, &fakePods{}, published(req("payments/db")), true, 0},
		{"token rejected, pod gone", fakeAuthn{err: fault.ErrUnauthenticated}, nil, nil, &fakePods{gone: true}, published(req("payments/db")), true, 1},
		{"token rejected, pod exists", fakeAuthn{err: fault.ErrUnauthenticated}, nil, nil, &fakePods{}, published(req("payments/db")), false, 1},
		{"token rejected, pod lookup fails", fakeAuthn{err: fault.ErrUnauthenticated}, nil, nil, &fakePods{gone: true, err: errors.New("etcd blip")}, published(req("payments/db")), false, 1},
		{"token rejected, first publish", fakeAuthn{err: fault.ErrUnauthenticated}, nil, nil, &fakePods{gone: true}, req("payments/db"), false, 0},
		{"token review down", fakeAuthn{err: fmt.Errorf("token review: %w", fault.ErrUnavailable)}, nil, nil, &fakePods{gone: true}, published(req("payments/db")), false, 0},
		{"vault denies", fakeAuthn{id: pod}, nil, fmt.Errorf("vault read: 403: %w", fault.ErrDenied), &fakePods{}, published(req("payments/db")), false, 0},
		{"vault down", fakeAuthn{id: pod}, nil, fmt.Errorf("vault read: 503: %w", fault.ErrUnavailable), &fakePods{}, published(req("payments/db")), false, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := broker.NewService(broker.Options{Authenticator: tc.authn, Authorizer: fakeAuthz{deny: tc.deny}, Source: &fakeSource{err: tc.srcErr},
				Auditor: &fakeAudit{}, Audiences: []string{"keyward"}, Pods: tc.pods})
			if err != nil {
				t.Fatal(err)
			}
			_, err = s.Fetch(context.Background(), tc.req)
			if err == nil || errors.Is(err, fault.ErrWithdrawn) != tc.withdrawn {
				t.Fatalf("err = %v, withdrawn %v, want withdrawn %v", err, errors.Is(err, fault.ErrWithdrawn), tc.withdrawn)
			}
			if tc.pods.calls != tc.podCalls {
				t.Fatalf("pod lookups %d, want %d", tc.pods.calls, tc.podCalls)
			}
		})
	}
}

// A token bound to a pod on another node (or to no node) is refused by a broker that knows its node.
func TestTokenOfAnotherNodeIsRefused(t *testing.T) {
	for _, tc := range []struct {
		tokenNode string
		want      error
	}{{"n1", nil}, {"n2", fault.ErrDenied}, {"", fault.ErrDenied}} {
		id := pod
		id.Node = tc.tokenNode
		src, aud := &fakeSource{}, &fakeAudit{}
		s, err := broker.NewService(broker.Options{Authenticator: fakeAuthn{id: id}, Authorizer: fakeAuthz{}, Source: src,
			Auditor: aud, Audiences: []string{"keyward"}, Node: "n1"})
		if err != nil {
			t.Fatal(err)
		}
		_, err = s.Fetch(context.Background(), req("payments/db"))
		if !errors.Is(err, tc.want) || (tc.want != nil && (src.calls != 0 || fault.ClassOf(err).String() != "PermissionDenied")) {
			t.Fatalf("token of node %q: %v (source called %d times)", tc.tokenNode, err, src.calls)
		}
		if tc.want != nil && (len(aud.evs) != 1 || aud.evs[0].Decision != audit.Denied || !strings.Contains(aud.evs[0].Reason, "node")) {
			t.Fatalf("token of node %q: audit %+v", tc.tokenNode, aud.evs)
		}
	}
}

// Values larger than the request's bound are refused (ResourceExhausted, audited) and zeroed; the
// bound reaches the source, so it can stop reading early.
func TestValuesLargerThanTheVolumeAreRefused(t *testing.T) {
	src, aud := &fakeSource{size: 600}, &fakeAudit{}
	s := newSvc(t, fakeAuthn{id: pod}, fakeAuthz{}, src, aud)
	r := req("payments/db", "payments/api")
	r.MaxBytes = 1000
	secs, err := s.Fetch(context.Background(), r)
	if !errors.Is(err, fault.ErrTooLarge) || secs != nil || fault.ClassOf(err).String() != "ResourceExhausted" {
		t.Fatalf("got %d secrets, %v", len(secs), err)
	}
	if src.maxBytes != 1000 {
		t.Fatalf("the source was given a bound of %d", src.maxBytes)
	}
	if len(aud.evs) != 1 || aud.evs[0].Decision != audit.Denied || aud.evs[0].Code != "ResourceExhausted" {
		t.Fatalf("audit %+v", aud.evs)
	}
	r.MaxBytes = 1200
	if secs, err := s.Fetch(context.Background(), r); err != nil || len(secs) != 2 {
		t.Fatalf("within the bound: %d, %v", len(secs), err)
	}
}

type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

// Refusals are audited whatever stage refused them, rate-limited per pod and code: a burst, then one
// per interval, each record counting those suppressed before it. Allowed requests are never
// suppressed, one pod's flood does not silence another, and a flood of one kind does not hide
// another kind of refusal of the same pod.
func TestRefusalsAreAuditedAndRateLimitedPerPod(t *testing.T) {
	c := &clock{t: time.Unix(1_700_000_000, 0)}
	aud := &fakeAudit{}
	s, err := broker.NewService(broker.Options{Authenticator: fakeAuthn{id: pod}, Authorizer: fakeAuthz{deny: map[string]bool{"payments/no": true}},
		Source: &fakeSource{}, Auditor: aud, Audiences: []string{"keyward"}, RefusalBurst: 2, RefusalInterval: time.Minute, Now: c.now})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	other := broker.Identity{Namespace: "payments", PodName: "api-9", PodUID: "uid-9"}
	refuse := func(claimed broker.Identity) {
		s.Refuse(ctx, broker.Request{RequestID: "x", Event: audit.EventMount, Claimed: claimed}, fmt.Errorf("writable volume: %w", fault.ErrInvalid))
	}
	for range 5 {
		refuse(pod)
	}
	if len(aud.evs) != 2 {
		t.Fatalf("%d records for 5 refusals with a burst of 2", len(aud.evs))
	}
	ev := aud.evs[0]
	if ev.Decision != audit.Denied || ev.Code != "InvalidArgument" || ev.Subject.PodUID != pod.PodUID || ev.Subject.Pod != pod.PodName ||
		!strings.Contains(ev.Reason, "writable volume") || ev.Type != audit.EventMount {
		t.Fatalf("refusal record %+v", ev)
	}
	refuse(other)
	if len(aud.evs) != 3 || aud.evs[2].Subject.PodUID != "uid-9" {
		t.Fatal("another pod's refusal was suppressed by the first pod's flood")
	}
	if _, err := s.Fetch(ctx, req("payments/db")); err != nil || len(aud.evs) != 4 || aud.evs[3].Decision != audit.Allowed {
		t.Fatalf("an allowed request was not recorded: %v, %d records", err, len(aud.evs))
	}
	// A flood of one kind does not hide another: the pod's denied requests have their own bucket.
	for i := range 3 {
		if _, err := s.Fetch(ctx, req("payments/no")); err == nil {
			t.Fatal("a denied ref was allowed")
		}
		if want := min(5+i, 6); len(aud.evs) != want {
			t.Fatalf("after %d denied requests: %d records, want %d", i+1, len(aud.evs), want)
		}
	}
	if aud.evs[4].Code != "PermissionDenied" {
		t.Fatalf("record %+v", aud.evs[4])
	}
	if s.SuppressedRefusals() != 4 {
		t.Fatalf("suppressed %d, want 4", s.SuppressedRefusals())
	}
	c.t = c.t.Add(time.Minute)
	refuse(pod)
	if len(aud.evs) != 7 || aud.evs[6].Suppressed != 3 || aud.evs[6].Code != "InvalidArgument" {
		t.Fatalf("the record after the pause: %+v, want suppressed 3", aud.evs[len(aud.evs)-1])
	}
}

// A refusal's reason is bounded: an error may quote a huge malformed attribute.
func TestRefusalReasonIsBounded(t *testing.T) {
	aud := &fakeAudit{}
	s := newSvc(t, fakeAuthn{id: pod}, fakeAuthz{}, &fakeSource{}, aud)
	s.Refuse(context.Background(), broker.Request{Claimed: pod}, fmt.Errorf("%s: %w", strings.Repeat("x", 100_000), fault.ErrInvalid))
	if len(aud.evs) != 1 || len(aud.evs[0].Reason) > 1100 {
		t.Fatalf("reason of %d bytes", len(aud.evs[0].Reason))
	}
}

// A republish whose files were read from another environment than the namespace's now (it was
// relabelled) is refused as a certain withdrawal, before anything is read, and audited as a denial;
// the secrets an allowed request returns say which environment they were read from.
func TestRepublishAfterTheNamespaceMovedIsWithdrawn(t *testing.T) {
	from := func(env string, published bool) broker.Request {
		r := req("payments/db")
		r.Environment, r.Published = env, published
		return r
	}
	for _, tc := range []struct {
		name  string
		req   broker.Request
		moved bool
	}{
		{"republish of files from another environment", from("dev", true), true},
		{"republish of files from the same environment", from("prod", true), false},
		{"republish, environment unknown (after a restart)", from("", true), false},
		{"first publish", from("dev", false), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src, aud := &fakeSource{}, &fakeAudit{}
			secs, err := newSvc(t, fakeAuthn{id: pod}, fakeAuthz{}, src, aud).Fetch(context.Background(), tc.req)
			if len(aud.evs) != 1 {
				t.Fatalf("%d audit records", len(aud.evs))
			}
			ev := aud.evs[0]
			if tc.moved {
				if !errors.Is(err, fault.ErrWithdrawn) || !errors.Is(err, fault.ErrDenied) || secs != nil || src.calls != 0 {
					t.Fatalf("err %v, %d secrets, %d source calls; want a withdrawal before any read", err, len(secs), src.calls)
				}
				if ev.Decision != audit.Denied || ev.Type != audit.EventAuthorize || !strings.Contains(ev.Reason, `moved from environment "dev" to "prod"`) {
					t.Fatalf("audit record %+v", ev)
				}
				return
			}
			if err != nil || len(secs) != 1 || secs[0].Environment != "prod" {
				t.Fatalf("err %v, secrets %v; want one, read from prod", err, secs)
			}
		})
	}
}

// fakeLeases answers dynamic refs; it records what it was asked.
type fakeLeases struct {
	got      broker.LeaseRequest
	err      error
	released []string
}

func (f *fakeLeases) Lease(_ context.Context, _ broker.Identity, _ broker.Token, r broker.LeaseRequest) ([]broker.Secret, []broker.Lease, error) {
	f.got = r
	recs := []broker.Lease{{Name: "database:payments-ro", Hash: "00aa", TTL: time.Hour, Action: broker.LeaseIssued}}
	if f.err != nil {
		return nil, recs, f.err
	}
	out := make([]broker.Secret, len(r.Refs))
	for i, ref := range r.Refs {
		out[i] = broker.Secret{Ref: ref.SecretRef, Value: []byte("CANARY-lease-" + ref.Key), Lease: "00aa"}
	}
	return out, recs, nil
}

func (f *fakeLeases) ReleaseVolume(v string) func(context.Context) error {
	f.released = append(f.released, v)
	return nil
}

// Dynamic refs go to the lease source with the volume (and the restart adoption hashes), stored refs
// to the source, and the answer keeps the request's order; the record says what was done with each
// lease (its hash, never an ID). Without a volume (the provider API, keywardctl) or a lease source,
// a dynamic ref is refused before anything is issued; a lease source's failure keeps its records.
func TestDynamicRefsGoToTheLeaseSource(t *testing.T) {
	db := func(key string) broker.SecretRef {
		return broker.SecretRef{Kind: broker.KindDatabase, Ref: "payments-ro", Key: key}
	}
	mixed := req("payments/db")
	mixed.Refs = []broker.SecretRef{db("username"), mixed.Refs[0], db("password")}
	mixed.Volume, mixed.Adopt = "vol-1", map[string]string{"database:payments-ro": "00aa"}
	newDyn := func(leases *fakeLeases, aud *fakeAudit, src *fakeSource) *broker.Service {
		o := broker.Options{Authenticator: fakeAuthn{id: pod}, Authorizer: fakeAuthz{}, Source: src, Auditor: aud, Audiences: []string{"keyward"}}
		if leases != nil {
			o.Leases = leases
		}
		s, err := broker.NewService(o)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	leases, aud, src := &fakeLeases{}, &fakeAudit{}, &fakeSource{}
	secs, err := newDyn(leases, aud, src).Fetch(context.Background(), mixed)
	if err != nil {
		t.Fatal(err)
	}
	if got := []string{string(secs[0].Value), string(secs[1].Value), string(secs[2].Value)}; fmt.Sprint(got) != "[CANARY-lease-username CANARY-payments/db CANARY-lease-password]" {
		t.Fatalf("values in order: %v", got)
	}
	if leases.got.Volume != "vol-1" || len(leases.got.Refs) != 2 || leases.got.Adopt["database:payments-ro"] != "00aa" || src.calls != 1 {
		t.Fatalf("lease request %+v, source calls %d", leases.got, src.calls)
	}
	ls := aud.evs[0].Object.Leases
	if len(ls) != 1 || ls[0].Name != "database:payments-ro" || ls[0].Action != "issued" || ls[0].LeaseSHA256 != "00aa" || ls[0].TTLSeconds != 3600 {
		t.Fatalf("audited leases %+v", ls)
	}

	noVolume := mixed
	noVolume.Volume = ""
	for name, s := range map[string]*broker.Service{"no volume": newDyn(&fakeLeases{}, &fakeAudit{}, &fakeSource{}), "no lease source": newDyn(nil, &fakeAudit{}, &fakeSource{})} {
		r := mixed
		if name == "no volume" {
			r = noVolume
		}
		if _, err := s.Fetch(context.Background(), r); !errors.Is(err, fault.ErrInvalid) || !strings.Contains(err.Error(), "CSI volume") {
			t.Errorf("%s: %v, want InvalidArgument", name, err)
		}
	}

	failing, aud := &fakeLeases{err: fmt.Errorf("budget: %w", fault.ErrTooLarge)}, &fakeAudit{}
	if _, err := newDyn(failing, aud, &fakeSource{}).Fetch(context.Background(), mixed); !errors.Is(err, fault.ErrTooLarge) {
		t.Fatalf("over budget: %v", err)
	}
	if ev := aud.evs[0]; ev.Code != "ResourceExhausted" || len(ev.Object.Leases) != 1 || strings.Contains(fmt.Sprintf("%+v", ev), "CANARY") {
		t.Fatalf("refusal record %+v", ev)
	}
	if s := newDyn(leases, &fakeAudit{}, &fakeSource{}); s.ReleaseVolume("vol-1") != nil || fmt.Sprint(leases.released) != "[vol-1]" {
		t.Fatalf("ReleaseVolume went to %v", leases.released)
	}
}
