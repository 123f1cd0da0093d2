package policy

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/internal/fault"
)

func budgetPolicy(t *testing.T, budgets string) *Policy {
	t.Helper()
	p, err := Parse([]byte(dynamicPolicy + budgets))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func pod(ns, name string) broker.Identity {
	return broker.Identity{Namespace: ns, ServiceAccount: "api", PodName: name, PodUID: "uid-" + ns + "-" + name}
}

// t0 is a fixed clock for the buckets: tests inject now.
var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func TestParseBudgets(t *testing.T) {
	if got := budgetPolicy(t, "").Budgets(); got != (Budgets{Pod: Budget{5, 12}, Namespace: Budget{50, 600}}) || got != DefaultBudgets() {
		t.Fatalf("defaults: %+v", got)
	}
	got := budgetPolicy(t, "issueBudgets:\n  pod: {burst: 2, perHour: 60}\n").Budgets()
	if got != (Budgets{Pod: Budget{2, 60}, Namespace: DefaultBudgets().Namespace}) {
		t.Fatalf("pod budget only: %+v", got)
	}
	got = budgetPolicy(t, "issueBudgets:\n  pod: {burst: 1, perHour: 1}\n  namespace: {burst: 100000, perHour: 100000}\n").Budgets()
	if got != (Budgets{Pod: Budget{1, 1}, Namespace: Budget{100000, 100000}}) {
		t.Fatalf("bounds: %+v", got)
	}
	for name, tc := range map[string]struct{ yaml, want string }{
		"zero burst":        {"issueBudgets: {pod: {burst: 0, perHour: 12}}", "issueBudgets.pod.burst 0: want 1..100000"},
		"no rate":           {"issueBudgets: {pod: {burst: 5}}", "issueBudgets.pod.perHour 0"},
		"negative rate":     {"issueBudgets: {namespace: {burst: 5, perHour: -1}}", "issueBudgets.namespace.perHour -1"},
		"burst too large":   {"issueBudgets: {namespace: {burst: 100001, perHour: 1}}", "issueBudgets.namespace.burst 100001"},
		"rate too large":    {"issueBudgets: {pod: {burst: 1, perHour: 100001}}", "perHour 100001"},
		"unknown budget":    {"issueBudgets: {node: {burst: 1, perHour: 1}}", "unknown field"},
		"unknown field":     {"issueBudgets: {pod: {burst: 1, perMinute: 1}}", "unknown field"},
		"a fraction":        {"issueBudgets: {pod: {burst: 1.5, perHour: 1}}", "policy"},
		"a string for rate": {"issueBudgets: {pod: {burst: 1, perHour: ten}}", "policy"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := Parse([]byte(dynamicPolicy + tc.yaml + "\n"))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Parse: %v, want an error mentioning %q", err, tc.want)
			}
		})
	}
}

func TestBudgetBurstThenRefill(t *testing.T) {
	a := NewAuthorizer(budgetPolicy(t, ""), StaticNamespaces{})
	id := pod("payments", "web-1")
	for i := range 5 {
		if err := a.TakeIssue(id, t0); err != nil {
			t.Fatalf("issue %d of the burst: %v", i+1, err)
		}
	}
	err := a.TakeIssue(id, t0)
	if !errors.Is(err, fault.ErrTooLarge) || fault.ClassOf(err).String() != "ResourceExhausted" {
		t.Fatalf("over the burst: %v, want ResourceExhausted", err)
	}
	const want = "issue budget of pod payments/web-1 (burst 5, 12 per hour) spent: the next credential can be issued in 300s: resource exhausted"
	if err.Error() != want {
		t.Fatalf("error %q\nwant      %q", err, want)
	}
	// One token every 5 minutes: not a moment before.
	if err := a.TakeIssue(id, t0.Add(299*time.Second+time.Millisecond)); err == nil || !strings.Contains(err.Error(), "in 1s") {
		t.Fatalf("just before the refill: %v", err)
	}
	if err := a.TakeIssue(id, t0.Add(300*time.Second)); err != nil {
		t.Fatalf("after the refill: %v", err)
	}
	if err := a.TakeIssue(id, t0.Add(300*time.Second)); err == nil {
		t.Fatal("a second issue after one token came back")
	}
	// An hour later the bucket is full again: a burst of 5, not more.
	later := t0.Add(2 * time.Hour)
	for i := range 5 {
		if err := a.TakeIssue(id, later); err != nil {
			t.Fatalf("issue %d after an idle hour: %v", i+1, err)
		}
	}
	if err := a.TakeIssue(id, later); err == nil {
		t.Fatal("the bucket refilled past its burst")
	}
	if pods, ns := a.BudgetRefusals(); pods != 4 || ns != 0 {
		t.Fatalf("refusals: pod %d, namespace %d; want 4, 0", pods, ns)
	}
}

// A second pod of the namespace draws on the namespace's bucket; a pod refused by its own budget does
// not drain the namespace's, nor a refusal by the namespace's the pod's.
func TestBudgetPodAndNamespace(t *testing.T) {
	a := NewAuthorizer(budgetPolicy(t, "issueBudgets: {pod: {burst: 2, perHour: 60}, namespace: {burst: 3, perHour: 60}}\n"), StaticNamespaces{})
	web1, web2, web3 := pod("payments", "web-1"), pod("payments", "web-2"), pod("payments", "web-3")
	take := func(id broker.Identity, wantErr string) {
		t.Helper()
		err := a.TakeIssue(id, t0)
		if (err == nil) != (wantErr == "") || (err != nil && (!strings.Contains(err.Error(), wantErr) || !errors.Is(err, fault.ErrTooLarge))) {
			t.Fatalf("TakeIssue(%s): %v, want %q", id, err, wantErr)
		}
	}
	take(web1, "")
	take(web1, "")
	for range 10 { // a crash-looping pod, refused by its own budget, leaves its namespace's alone
		take(web1, "pod payments/web-1 (burst 2, 60 per hour)")
	}
	take(web2, "")
	take(web2, "namespace payments (burst 3, 60 per hour) spent: the next credential can be issued in 60s")
	// web3 was refused by the namespace: its own bucket is untouched (full), as its first take shows
	// once the namespace has a token again.
	take(web3, "namespace payments")
	if pods, _ := a.budgetBuckets(); pods != 2 {
		t.Fatalf("%d pod buckets, want 2 (a refused pod's bucket is not created)", pods)
	}
	take(pod("billing", "web-1"), "") // another namespace: its own bucket
	if pods, ns := a.BudgetRefusals(); pods != 10 || ns != 2 {
		t.Fatalf("refusals: pod %d, namespace %d; want 10, 2", pods, ns)
	}

	// All or none: two at once with room in the pod's bucket but one left in the namespace's.
	b := NewAuthorizer(budgetPolicy(t, "issueBudgets: {pod: {burst: 2, perHour: 60}, namespace: {burst: 3, perHour: 60}}\n"), StaticNamespaces{})
	if err := b.TakeIssues(web1, 2, t0); err != nil {
		t.Fatal(err)
	}
	if err := b.TakeIssues(web2, 2, t0); err == nil || !strings.Contains(err.Error(), "namespace payments (burst 3, 60 per hour) spent: 2 credentials can be issued in 60s") {
		t.Fatalf("two at once over the namespace's budget: %v", err)
	}
	if err := b.TakeIssues(web2, 1, t0); err != nil {
		t.Fatalf("the refused pair took from a bucket: %v", err)
	}
	if err := b.TakeIssues(web3, 3, t0.Add(time.Hour)); err == nil || !strings.Contains(err.Error(), "3 credentials at once are more than its burst") {
		t.Fatalf("more than the burst at once: %v", err)
	}
	// Without a UID, the pod's namespace and name key its bucket.
	noUID := broker.Identity{Namespace: "web", PodName: "x"}
	c := NewAuthorizer(budgetPolicy(t, "issueBudgets: {pod: {burst: 1, perHour: 60}}\n"), StaticNamespaces{})
	if err := c.TakeIssue(noUID, t0); err != nil {
		t.Fatal(err)
	}
	if err := c.TakeIssue(noUID, t0); err == nil || !strings.Contains(err.Error(), "pod web/x") {
		t.Fatalf("second issue of a pod without a UID: %v", err)
	}
	if err := c.TakeIssue(broker.Identity{Namespace: "web", PodName: "y"}, t0); err != nil {
		t.Fatalf("another pod without a UID: %v", err)
	}
}

// A reload applies the new rates to the buckets in use: they keep their tokens, at most the new
// burst, and refill at the new rate.
func TestBudgetReload(t *testing.T) {
	a := NewAuthorizer(budgetPolicy(t, ""), StaticNamespaces{})
	id := pod("payments", "web-1")
	if err := a.TakeIssue(id, t0); err != nil { // 4 of 5 left
		t.Fatal(err)
	}
	a.Set(budgetPolicy(t, "issueBudgets: {pod: {burst: 2, perHour: 3600}}\n"))
	if got := a.Budgets(); got.Pod != (Budget{2, 3600}) || got.Namespace != DefaultBudgets().Namespace {
		t.Fatalf("budgets after reload: %+v", got)
	}
	for i := range 2 { // clamped to the new burst
		if err := a.TakeIssue(id, t0); err != nil {
			t.Fatalf("issue %d after the reload: %v", i+1, err)
		}
	}
	if err := a.TakeIssue(id, t0); err == nil || !strings.Contains(err.Error(), "(burst 2, 3600 per hour) spent: the next credential can be issued in 1s") {
		t.Fatalf("over the new burst: %v", err)
	}
	if err := a.TakeIssue(id, t0.Add(time.Second)); err != nil { // the new rate: one a second
		t.Fatalf("after a second at the new rate: %v", err)
	}
	// Raising the burst keeps the (empty) bucket's tokens: no free refill by reload.
	a.Set(budgetPolicy(t, "issueBudgets: {pod: {burst: 10, perHour: 3600}}\n"))
	if err := a.TakeIssue(id, t0.Add(time.Second)); err == nil {
		t.Fatal("a reload refilled the bucket")
	}
	if err := a.TakeIssue(id, t0.Add(2*time.Second)); err != nil {
		t.Fatalf("a second later: %v", err)
	}
	// A pod with tokens left keeps them across a slower rate.
	b := NewAuthorizer(budgetPolicy(t, "issueBudgets: {pod: {burst: 4, perHour: 3600}}\n"), StaticNamespaces{})
	b.TakeIssue(id, t0)
	b.Set(budgetPolicy(t, "issueBudgets: {pod: {burst: 4, perHour: 1}}\n"))
	for i := range 3 {
		if err := b.TakeIssue(id, t0); err != nil {
			t.Fatalf("token %d kept across the reload: %v", i+1, err)
		}
	}
	if err := b.TakeIssue(id, t0.Add(time.Minute)); err == nil || !strings.Contains(err.Error(), "(burst 4, 1 per hour)") {
		t.Fatalf("after the slower rate: %v", err)
	}
}

// The buckets kept are bounded: full ones are dropped, and over the bound the fullest go.
func TestBudgetBucketsBounded(t *testing.T) {
	a := NewAuthorizer(budgetPolicy(t, "issueBudgets: {namespace: {burst: 100000, perHour: 100000}}\n"), StaticNamespaces{})
	a.budgets.pods.init(64)
	for i := range 1000 {
		if err := a.TakeIssue(pod("payments", fmt.Sprint("web-", i)), t0); err != nil {
			t.Fatal(err)
		}
		if pods, _ := a.budgetBuckets(); pods > 64 {
			t.Fatalf("%d pod buckets after %d pods (bound 64)", pods, i+1)
		}
	}
	// Hours later every bucket is full: the next sweep drops them all.
	later := t0.Add(3 * time.Hour)
	for i := range 64 {
		a.TakeIssue(pod("payments", fmt.Sprint("db-", i)), later)
	}
	a.budgets.mu.Lock()
	for k := range a.budgets.pods.m {
		if strings.Contains(k, "-web-") {
			t.Errorf("full bucket %s kept", k)
		}
	}
	a.budgets.mu.Unlock()

	// The default bound: full buckets go long before it.
	b := NewAuthorizer(budgetPolicy(t, "issueBudgets: {namespace: {burst: 100000, perHour: 100000}}\n"), StaticNamespaces{})
	for i := range 5000 {
		b.TakeIssue(pod("payments", fmt.Sprint("web-", i)), t0.Add(time.Duration(i)*time.Hour))
	}
	if pods, ns := b.budgetBuckets(); pods > 1024 || ns != 1 {
		t.Fatalf("%d pod and %d namespace buckets kept, want at most 1024 and 1", pods, ns)
	}
}

// Concurrent issues never take more than a budget holds (run with -race), beside reloads.
func TestBudgetConcurrent(t *testing.T) {
	a := NewAuthorizer(budgetPolicy(t, ""), StaticNamespaces{})
	p := budgetPolicy(t, "")
	var wg sync.WaitGroup
	var mu sync.Mutex
	ok := 0
	for i := range 200 {
		wg.Go(func() {
			if a.TakeIssue(pod("payments", fmt.Sprint("web-", i)), t0) == nil {
				mu.Lock()
				ok++
				mu.Unlock()
			}
		})
		if i%50 == 0 {
			wg.Go(func() { a.Set(p); a.BudgetRefusals() })
		}
	}
	wg.Wait()
	if pods, ns := a.BudgetRefusals(); ok != 50 || pods != 0 || ns != 150 {
		t.Fatalf("%d issued, refusals pod %d namespace %d; want 50, 0, 150", ok, pods, ns)
	}
}
