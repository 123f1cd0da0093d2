package policy

import (
	"cmp"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/internal/fault"
)

// Budget is a token bucket of credential issues: at most Burst at once, refilled at PerHour an hour
// (one token every hour/PerHour).
type Budget struct {
	Burst   int `json:"burst"`
	PerHour int `json:"perHour"`
}

func (b Budget) String() string { return fmt.Sprintf("burst %d, %d per hour", b.Burst, b.PerHour) }

// interval is the time one token takes to come back.
func (b Budget) interval() time.Duration { return time.Hour / time.Duration(b.PerHour) }

// IssueBudgets is the policy's issueBudgets: the budget of each pod and of each namespace. An absent
// one is the default (DefaultBudgets).
type IssueBudgets struct {
	Pod       *Budget `json:"pod,omitempty"`
	Namespace *Budget `json:"namespace,omitempty"`
}

// Budgets are the issue budgets in force.
type Budgets struct {
	Pod, Namespace Budget
}

// DefaultBudgets are the budgets of a policy that sets none: a pod may have 5 credentials issued at
// once and 12 an hour after that (one every 5 minutes), a namespace 50 at once and 600 an hour.
func DefaultBudgets() Budgets {
	return Budgets{Pod: Budget{Burst: 5, PerHour: 12}, Namespace: Budget{Burst: 50, PerHour: 600}}
}

// Bounds of a budget's burst and rate.
const (
	MaxBudgetBurst   = 100000
	MaxBudgetPerHour = 100000
)

// maxBuckets bounds the buckets kept in memory (of pods, and of namespaces). A full bucket is the same
// as none and is dropped; over the bound the fullest go first.
const maxBuckets = 65536

// Budgets returns the issue budgets in force under the policy (the defaults where it sets none).
func (p *Policy) Budgets() Budgets { return p.budgets }

func (p *Policy) validateBudgets() error {
	p.budgets = DefaultBudgets()
	if p.IssueBudgets == nil {
		return nil
	}
	for _, b := range []struct {
		name string
		set  *Budget
		to   *Budget
	}{{"pod", p.IssueBudgets.Pod, &p.budgets.Pod}, {"namespace", p.IssueBudgets.Namespace, &p.budgets.Namespace}} {
		if b.set == nil {
			continue
		}
		if b.set.Burst < 1 || b.set.Burst > MaxBudgetBurst {
			return fmt.Errorf("issueBudgets.%s.burst %d: want 1..%d", b.name, b.set.Burst, MaxBudgetBurst)
		}
		if b.set.PerHour < 1 || b.set.PerHour > MaxBudgetPerHour {
			return fmt.Errorf("issueBudgets.%s.perHour %d: want 1..%d", b.name, b.set.PerHour, MaxBudgetPerHour)
		}
		*b.to = *b.set
	}
	return nil
}

// bucket is a token bucket kept as the time it is full again (a GCRA's theoretical arrival time):
// at time now it holds Burst - (full-now)/interval tokens. Integer arithmetic: no drift.
type bucket struct {
	full time.Time
	// last is when a token was last taken (where a change of rate converts the bucket).
	last time.Time
}

// bucketSet is the buckets of one scope (pods or namespaces), bounded.
type bucketSet struct {
	m       map[string]*bucket
	max     int
	sweepAt int // sweep full buckets when the map grows to this
}

func (s *bucketSet) init(max int) {
	s.m, s.max, s.sweepAt = map[string]*bucket{}, max, min(max, 1024)
}

// after returns when key's bucket would be full again after taking n tokens at now, and whether that
// is within the budget (wait: how long until it would be).
func (s *bucketSet) after(key string, n int, now time.Time, b Budget) (full time.Time, wait time.Duration) {
	full = now
	if bk, ok := s.m[key]; ok && bk.full.After(now) {
		full = bk.full
	}
	full = full.Add(time.Duration(n) * b.interval())
	return full, full.Sub(now) - time.Duration(b.Burst)*b.interval()
}

func (s *bucketSet) put(key string, full, now time.Time) {
	if bk, ok := s.m[key]; ok {
		bk.full, bk.last = full, now
		return
	}
	s.m[key] = &bucket{full: full, last: now}
	if len(s.m) >= s.sweepAt {
		s.sweep(now)
	}
}

// sweep drops the buckets that are full at now; if max are still left, the fullest go until 7/8 of
// max are left (giving those pods or namespaces their full budget back is the price of bounded
// memory; a node's broker serves far fewer pods than max).
func (s *bucketSet) sweep(now time.Time) {
	maps.DeleteFunc(s.m, func(_ string, b *bucket) bool { return !b.full.After(now) })
	if len(s.m) >= s.max {
		keys := slices.SortedFunc(maps.Keys(s.m), func(a, b string) int { return s.m[a].full.Compare(s.m[b].full) })
		for _, k := range keys[:len(s.m)-s.max*7/8] {
			delete(s.m, k)
		}
	}
	// Sweep again when the map has doubled (amortized O(1) a put), or reaches the bound.
	s.sweepAt = min(s.max, max(1024, 2*len(s.m)))
}

// rerate converts every bucket from rate from to rate to: each keeps the tokens it held when a
// token was last taken, at most the new burst, and refills at the new rate from then on.
func (s *bucketSet) rerate(from, to Budget) {
	if from == to {
		return
	}
	for _, b := range s.m {
		held := float64(from.Burst) - float64(b.full.Sub(b.last))/float64(from.interval())
		held = min(max(held, 0), float64(to.Burst))
		b.full = b.last.Add(time.Duration((float64(to.Burst) - held) * float64(to.interval())))
	}
}

// budgets are the token buckets of the policy's issue budgets.
type budgets struct {
	mu                    sync.Mutex
	rates                 Budgets
	pods, namespaces      bucketSet
	podRefused, nsRefused uint64
}

// orDefault fills a zero budget (of a Policy that Parse did not make) with the default.
func (r Budgets) orDefault() Budgets {
	d := DefaultBudgets()
	if r.Pod.Burst < 1 || r.Pod.PerHour < 1 {
		r.Pod = d.Pod
	}
	if r.Namespace.Burst < 1 || r.Namespace.PerHour < 1 {
		r.Namespace = d.Namespace
	}
	return r
}

func (b *budgets) init(r Budgets) {
	b.rates = r.orDefault()
	b.pods.init(maxBuckets)
	b.namespaces.init(maxBuckets)
}

func (b *budgets) setRates(r Budgets) {
	r = r.orDefault()
	b.mu.Lock()
	defer b.mu.Unlock()
	b.pods.rerate(b.rates.Pod, r.Pod)
	b.namespaces.rerate(b.rates.Namespace, r.Namespace)
	b.rates = r
}

// podKey keys a pod's bucket: its UID, or (without one) its namespace and name.
func podKey(id broker.Identity) string {
	if id.PodUID != "" {
		return "uid:" + id.PodUID
	}
	return "name:" + id.Namespace + "/" + id.PodName
}

// TakeIssue takes one token from the issue budget of id's pod and of its namespace, for one
// credential about to be issued (a certificate, database credentials): see TakeIssues.
func (a *Authorizer) TakeIssue(id broker.Identity, now time.Time) error {
	return a.TakeIssues(id, 1, now)
}

// TakeIssues takes n tokens (n credentials about to be issued for one request) from the issue budget
// of id's pod (keyed by its UID, or its namespace and name without one) and of its namespace, all or
// none: both budgets must hold n, and a refusal takes nothing from either. Over budget it returns an
// error wrapping fault.ErrTooLarge (ResourceExhausted) that names the budget (pod or namespace), its
// burst and rate, and when enough tokens will be back; BudgetRefusals counts the refusals. now is
// the caller's clock (time.Now(), whose monotonic reading is what Sub compares).
//
// The buckets live in this process's memory: a broker restart refills them, and each broker (node)
// keeps its own, so a namespace budget bounds a namespace's issues per node.
func (a *Authorizer) TakeIssues(id broker.Identity, n int, now time.Time) error {
	if n <= 0 {
		return nil
	}
	b := &a.budgets
	b.mu.Lock()
	defer b.mu.Unlock()
	pk := podKey(id)
	podFull, podWait := b.pods.after(pk, n, now, b.rates.Pod)
	if podWait > 0 {
		b.podRefused++
		return overBudget(fmt.Sprintf("pod %s/%s", id.Namespace, id.PodName), b.rates.Pod, n, podWait)
	}
	nsFull, nsWait := b.namespaces.after(id.Namespace, n, now, b.rates.Namespace)
	if nsWait > 0 {
		b.nsRefused++
		return overBudget(fmt.Sprintf("namespace %s", id.Namespace), b.rates.Namespace, n, nsWait)
	}
	b.pods.put(pk, podFull, now)
	b.namespaces.put(id.Namespace, nsFull, now)
	return nil
}

func overBudget(who string, b Budget, n int, wait time.Duration) error {
	if n > b.Burst {
		return fmt.Errorf("issue budget of %s (%s) exceeded: %d credentials at once are more than its burst: %w", who, b, n, fault.ErrTooLarge)
	}
	secs := cmp.Or(int64((wait+time.Second-1)/time.Second), 1)
	what := "the next credential"
	if n > 1 {
		what = fmt.Sprintf("%d credentials", n)
	}
	return fmt.Errorf("issue budget of %s (%s) spent: %s can be issued in %ds: %w", who, b, what, secs, fault.ErrTooLarge)
}

// BudgetRefusals counts the issues refused since start for the pod budget and the namespace budget
// (for metrics).
func (a *Authorizer) BudgetRefusals() (pod, namespace uint64) {
	a.budgets.mu.Lock()
	defer a.budgets.mu.Unlock()
	return a.budgets.podRefused, a.budgets.nsRefused
}

// Budgets returns the issue budgets in force.
func (a *Authorizer) Budgets() Budgets {
	a.budgets.mu.Lock()
	defer a.budgets.mu.Unlock()
	return a.budgets.rates
}

// budgetBuckets returns how many pod and namespace buckets are kept (for tests).
func (a *Authorizer) budgetBuckets() (pods, namespaces int) {
	a.budgets.mu.Lock()
	defer a.budgets.mu.Unlock()
	return len(a.budgets.pods.m), len(a.budgets.namespaces.m)
}
