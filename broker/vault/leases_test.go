package vault

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/internal/fault"
)

// leaseVault answers the endpoints of dynamic credentials, to force what a real Vault does only in
// faults or after long waits (a refused renewal, an answer without a password, a max TTL reached, a
// refused revocation). The real Vault and PostgreSQL run in test/e2e TestDynamicCredentialsLiveAsLongAsTheirVolume.
type leaseVault struct {
	mu      sync.Mutex
	logins  int
	issued  int
	renewed int
	revoked []string
	// renew answers a renewal (nil: granted for the increment); creds a creds read (nil: a fresh one).
	renew      func(w http.ResponseWriter)
	creds      func(w http.ResponseWriter)
	revokeCode int
	// refused are tokens Vault no longer accepts (revoked behind the broker's back).
	refused map[string]bool
	// dropRevokes: the connection of a revocation is cut (a transport error).
	dropRevokes bool
	// renewSelfTTL is what a token renewal gives (0: 600 s, what the login gave).
	renewSelfTTL int
}

func (f *leaseVault) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	switch p := r.URL.Path; {
	case p == "/v1/auth/kubernetes/login":
		f.logins++
		json.NewEncoder(w).Encode(map[string]any{"auth": map[string]any{"client_token": fmt.Sprintf("s.tok-%d", f.logins), "accessor": "acc", "lease_duration": 600, "renewable": true}})
	case strings.HasPrefix(p, "/v1/database-prod/creds/"):
		if f.refused[r.Header.Get("X-Vault-Token")] {
			http.Error(w, `{"errors":["permission denied"]}`, http.StatusForbidden)
			return
		}
		if f.creds != nil {
			f.creds(w)
			return
		}
		f.issued++
		json.NewEncoder(w).Encode(map[string]any{"lease_id": fmt.Sprintf("database-prod/creds/payments-ro/LEASEID-%d", f.issued), "lease_duration": 60, "renewable": true,
			"data": map[string]any{"username": fmt.Sprintf("v-user-%d", f.issued), "password": fmt.Sprintf("CANARY-pw-%d", f.issued)}})
	case strings.HasPrefix(p, "/v1/sys/leases/renew/"):
		if f.renew != nil {
			f.renew(w)
			return
		}
		var body struct {
			Increment int64 `json:"increment"`
		}
		json.NewDecoder(r.Body).Decode(&body)
		f.renewed++
		json.NewEncoder(w).Encode(map[string]any{"lease_duration": body.Increment, "renewable": true})
	case p == "/v1/auth/token/renew-self":
		ttl := f.renewSelfTTL
		if ttl == 0 {
			ttl = 600
		}
		json.NewEncoder(w).Encode(map[string]any{"auth": map[string]any{"client_token": r.Header.Get("X-Vault-Token"), "lease_duration": ttl, "renewable": true}})
	case strings.TrimSuffix(p, "/") == "/v1/sys/leases/lookup/database-prod/creds/payments-ro" && r.URL.Query().Get("list") == "true":
		var keys []string
		for i := 1; i <= f.issued; i++ {
			keys = append(keys, fmt.Sprintf("LEASEID-%d", i))
		}
		json.NewEncoder(w).Encode(map[string]any{"data": map[string]any{"keys": keys}})
	case p == "/v1/sys/leases/lookup":
		json.NewEncoder(w).Encode(map[string]any{"data": map[string]any{"ttl": 45}})
	case p == "/v1/auth/token/revoke-self":
		f.revoked = append(f.revoked, "token:"+r.Header.Get("X-Vault-Token"))
		w.WriteHeader(http.StatusNoContent)
	case strings.HasPrefix(p, "/v1/sys/leases/revoke/"):
		if f.dropRevokes {
			if c, _, err := w.(http.Hijacker).Hijack(); err == nil {
				c.Close()
			}
			return
		}
		if f.revokeCode != 0 {
			http.Error(w, `{"errors":["permission denied"]}`, f.revokeCode)
			return
		}
		f.revoked = append(f.revoked, strings.TrimPrefix(p, "/v1/sys/leases/revoke/"))
		w.WriteHeader(http.StatusNoContent)
	default:
		http.NotFound(w, r)
	}
}

// leaseClock is a settable clock.
type leaseClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *leaseClock) Now() time.Time          { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *leaseClock) advance(d time.Duration) { c.mu.Lock(); c.now = c.now.Add(d); c.mu.Unlock() }

func newLeaseSource(t *testing.T, f *leaseVault, o Options) (*Source, *leaseClock, *observer.ObservedLogs) {
	t.Helper()
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	c, err := NewClient(ClientOptions{Address: srv.URL, AllowHTTP: true, Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	clock := &leaseClock{now: time.Unix(1_800_000_000, 0)}
	core, logs := observer.New(zap.DebugLevel)
	o.Client, o.Mode, o.Log, o.Now = c, ModePod, zap.New(core), clock.Now
	s, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	return s, clock, logs
}

func dbRefs() []broker.Resolved {
	r := func(key string) broker.Resolved {
		return broker.Resolved{SecretRef: broker.SecretRef{Kind: broker.KindDatabase, Ref: "payments-ro", Key: key}, Environment: "prod",
			Mount: "database-prod", Path: "payments-ro", Role: "prod"}
	}
	return []broker.Resolved{r("username"), r("password")}
}

func leaseOf(t *testing.T, s *Source, volume string) ([]broker.Secret, broker.Lease, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	secs, recs, err := s.Lease(ctx, pod, "jwt-CANARY", broker.LeaseRequest{Volume: volume, Refs: dbRefs()})
	if err != nil {
		return nil, broker.Lease{}, err
	}
	if len(recs) != 1 || len(secs) != 2 {
		t.Fatalf("%d records, %d secrets for one credential's two parts", len(recs), len(secs))
	}
	return secs, recs[0], nil
}

// The lease's life on one volume: issued, reused outside the window, renewed inside it, reissued when
// a renewal is refused or no longer carries it out of the window (the old one retired, not revoked),
// and every lease still live revoked with the volume; a refused revocation is logged, not an error.
func TestLeaseReuseRenewReissueRelease(t *testing.T) {
	f := &leaseVault{}
	s, clock, logs := newLeaseSource(t, f, Options{})
	secs, rec, err := leaseOf(t, s, "vol-1")
	if err != nil || rec.Action != broker.LeaseIssued || string(secs[0].Value) != "v-user-1" || secs[0].Lease != rec.Hash || rec.Hash != leaseHash("database-prod/creds/payments-ro/LEASEID-1") {
		t.Fatalf("first: %v %+v", err, rec)
	}
	clock.advance(39 * time.Second) // 60s TTL: the window is the last 20
	if _, rec, err = leaseOf(t, s, "vol-1"); err != nil || rec.Action != broker.LeaseReused || f.issued != 1 {
		t.Fatalf("outside the window: %v %+v, %d issued", err, rec, f.issued)
	}
	clock.advance(2 * time.Second)
	if secs, rec, err = leaseOf(t, s, "vol-1"); err != nil || rec.Action != broker.LeaseRenewed || f.renewed != 1 || string(secs[0].Value) != "v-user-1" {
		t.Fatalf("inside the window: %v %+v, %d renewed", err, rec, f.renewed)
	}
	clock.advance(41 * time.Second)
	f.renew = func(w http.ResponseWriter) { http.Error(w, `{"errors":["lease not found"]}`, http.StatusBadRequest) }
	if secs, rec, err = leaseOf(t, s, "vol-1"); err != nil || rec.Action != broker.LeaseReissued || string(secs[0].Value) != "v-user-2" {
		t.Fatalf("renewal refused: %v %+v", err, rec)
	}
	clock.advance(41 * time.Second)
	f.renew = func(w http.ResponseWriter) { // its max TTL is near: 5s more
		json.NewEncoder(w).Encode(map[string]any{"lease_duration": 5, "renewable": true})
	}
	if _, rec, err = leaseOf(t, s, "vol-1"); err != nil || rec.Action != broker.LeaseReissued || f.issued != 3 {
		t.Fatalf("renewal short of the window: %v %+v", err, rec)
	}
	// The first lease (renewed to end at 101s) ended before the third was issued (at 123s): dropped.
	if s.Leases() != 2 || len(f.revoked) != 0 {
		t.Fatalf("%d leases held (want 2: one in use, one retired; the first ended), %d revoked before the volume went", s.Leases(), len(f.revoked))
	}
	// Live leases, retired ones included, are revoked with the volume.
	revoke := s.ReleaseVolume("vol-1")
	if revoke == nil || s.Leases() != 0 || s.ReleaseVolume("vol-1") != nil {
		t.Fatal("ReleaseVolume did not forget the volume's leases at once")
	}
	if err := revoke(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(f.revoked, " "); got != "database-prod/creds/payments-ro/LEASEID-3 database-prod/creds/payments-ro/LEASEID-2" {
		t.Fatalf("revoked %q: want the two live leases (the first ended at its TTL)", got)
	}
	// A refused revocation (the token, and its leases, gone) is logged, not an error.
	if _, _, err := leaseOf(t, s, "vol-2"); err != nil {
		t.Fatal(err)
	}
	f.revokeCode = http.StatusForbidden
	if err := s.ReleaseVolume("vol-2")(context.Background()); err != nil {
		t.Fatalf("a refused revocation: %v", err)
	}
	for _, e := range logs.All() {
		if strings.Contains(fmt.Sprint(e.Message, e.ContextMap()), "LEASEID") || strings.Contains(fmt.Sprint(e.ContextMap()), "CANARY") {
			t.Fatalf("a lease ID or a credential reached the log: %v %v", e.Message, e.ContextMap())
		}
	}
}

// A lease issued with a Vault token that is no longer the one in use is reissued (Vault revokes a
// token's leases with it); an answer without the credential is refused and its lease revoked; the
// issue budget is asked before each issue and not on reuse; the source holds at most MaxLeases.
func TestLeaseFaults(t *testing.T) {
	f := &leaseVault{}
	var asked int
	budget := func(_ broker.Identity, n int, _ time.Time) error {
		asked += n
		if asked > 2 {
			return fmt.Errorf("issue budget of pod uid-1 spent: %w", fault.ErrTooLarge)
		}
		return nil
	}
	s, _, _ := newLeaseSource(t, f, Options{Budget: budget, MaxLeases: 2})
	if _, _, err := leaseOf(t, s, "vol-1"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := leaseOf(t, s, "vol-1"); err != nil || asked != 1 {
		t.Fatalf("a reuse asked the budget: %v, %d", err, asked)
	}
	// The token is replaced behind the lease (a fresh login after a refusal).
	s.mu.Lock()
	for k := range s.tokens {
		delete(s.tokens, k)
	}
	s.mu.Unlock()
	if _, rec, err := leaseOf(t, s, "vol-1"); err != nil || rec.Action != broker.LeaseReissued || f.logins != 2 || asked != 1 {
		t.Fatalf("after a new login: %v %+v, %d logins, %d charged (the driver's reissue is not the pod's)", err, rec, f.logins, asked)
	}
	// Bounded: a second volume would hold a third lease.
	if _, _, err := leaseOf(t, s, "vol-2"); !errors.Is(err, fault.ErrUnavailable) {
		t.Fatalf("over MaxLeases: %v", err)
	}
	if f.revoked[len(f.revoked)-1] != "database-prod/creds/payments-ro/LEASEID-3" {
		t.Fatalf("the lease issued over the bound was not revoked: %v", f.revoked)
	}
	if _, _, err := leaseOf(t, s, "vol-3"); !errors.Is(err, fault.ErrTooLarge) || !strings.Contains(err.Error(), "budget") {
		t.Fatalf("over budget: %v", err)
	}
	f.creds = func(w http.ResponseWriter) {
		json.NewEncoder(w).Encode(map[string]any{"lease_id": "database-prod/creds/payments-ro/LEASEID-bad", "lease_duration": 60, "data": map[string]any{"username": "u"}})
	}
	s.ReleaseVolume("vol-1")(context.Background())
	asked = 0
	if _, _, err := leaseOf(t, s, "vol-4"); !errors.Is(err, fault.ErrUnavailable) || strings.Contains(err.Error(), "LEASEID") {
		t.Fatalf("an answer without a password: %v", err)
	}
	if f.revoked[len(f.revoked)-1] != "database-prod/creds/payments-ro/LEASEID-bad" || s.Leases() != 0 {
		t.Fatalf("the unusable lease was not revoked: %v, %d held", f.revoked, s.Leases())
	}
}

// A clean shutdown (ReleaseAll) leaves the Vault tokens that hold published volumes' leases: revoking
// them would revoke the pods' credentials with them across a driver upgrade. Tokens holding none are
// revoked.
func TestShutdownKeepsTokensHoldingLeases(t *testing.T) {
	f := &leaseVault{}
	s, _, _ := newLeaseSource(t, f, Options{})
	if _, _, err := leaseOf(t, s, "vol-1"); err != nil {
		t.Fatal(err)
	}
	other := pod
	other.ServiceAccount, other.PodUID = "worker", "uid-2" // a second service account: its own token, no lease
	if _, err := s.token(context.Background(), other, "jwt-CANARY", dbRefs()[0]); err != nil {
		t.Fatal(err)
	}
	n, err := s.ReleaseAll(context.Background())
	if err != nil || n != 1 || fmt.Sprint(f.revoked) != "[token:s.tok-2]" {
		t.Fatalf("ReleaseAll revoked %d (%v): %v; want only the token without leases", n, err, f.revoked)
	}
}

// A cached token Vault refuses (revoked behind the broker's back, or Vault restarted) is forgotten and
// the issue tried once more with a fresh login, as a KV read is.
func TestLeaseRetriesOnceWithAFreshLogin(t *testing.T) {
	f := &leaseVault{refused: map[string]bool{}}
	s, _, _ := newLeaseSource(t, f, Options{})
	if _, _, err := leaseOf(t, s, "vol-1"); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	f.refused["s.tok-1"] = true
	f.mu.Unlock()
	s.ReleaseVolume("vol-1") // a new volume of the same pod: an issue with the cached token
	if _, rec, err := leaseOf(t, s, "vol-2"); err != nil || rec.Action != broker.LeaseIssued || f.logins != 2 || s.Tokens() != 1 {
		t.Fatalf("after the token was refused: %v %+v, %d logins, %d tokens", err, rec, f.logins, s.Tokens())
	}
	f.mu.Lock()
	f.refused["s.tok-2"], f.refused["s.tok-3"] = true, true
	f.mu.Unlock()
	s.ReleaseVolume("vol-2")
	if _, _, err := leaseOf(t, s, "vol-3"); !errors.Is(err, fault.ErrDenied) || f.logins != 3 {
		t.Fatalf("refused after a fresh login too: %v, %d logins (want one retry)", err, f.logins)
	}
}

// A volume's credentials are its pod's: a request naming the volume for another pod is refused (kubelet
// derives volume IDs from pods, so this is a bug or an attack, never a reuse), and a released volume's
// values are zeroed in memory.
func TestVolumeLeasesAreTheirPodsOnly(t *testing.T) {
	f := &leaseVault{}
	s, _, _ := newLeaseSource(t, f, Options{})
	if _, _, err := leaseOf(t, s, "vol-1"); err != nil {
		t.Fatal(err)
	}
	s.lmu.Lock()
	var held *lease
	for _, l := range s.volumes["vol-1"].cur {
		held = l
	}
	s.lmu.Unlock()
	// The Admin API's view: the name and hash, never the lease ID.
	vls := s.VolumeLeases()["vol-1"]
	if len(vls) != 1 || vls[0].Name != "database:payments-ro" || vls[0].Hash != leaseHash("database-prod/creds/payments-ro/LEASEID-1") ||
		strings.Contains(fmt.Sprintf("%+v", vls), "LEASEID") {
		t.Fatalf("VolumeLeases: %+v", vls)
	}
	other := pod
	other.PodName, other.PodUID = "api-1", "uid-other"
	_, _, err := s.Lease(context.Background(), other, "jwt-CANARY", broker.LeaseRequest{Volume: "vol-1", Refs: dbRefs()})
	if !errors.Is(err, fault.ErrInvalid) || f.issued != 1 {
		t.Fatalf("another pod's request for the volume: %v, %d issued", err, f.issued)
	}
	s.ReleaseVolume("vol-1")
	if v := string(held.values["password"]); strings.Contains(v, "CANARY") {
		t.Fatalf("a released lease's password is still in memory: %q", v)
	}
}

// A transport failure's error names the request's URL, and a revocation's URL holds the lease ID:
// mapErr keeps only the cause, so the ID reaches neither the error nor the log.
func TestTransportErrorsDoNotCarryTheLeaseID(t *testing.T) {
	f := &leaseVault{}
	s, _, logs := newLeaseSource(t, f, Options{})
	if _, _, err := leaseOf(t, s, "vol-1"); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	f.dropRevokes = true
	f.mu.Unlock()
	err := s.ReleaseVolume("vol-1")(context.Background()) // the connection is cut: a *url.Error
	if err == nil || strings.Contains(err.Error(), "LEASEID") || !errors.Is(err, fault.ErrUnavailable) {
		t.Fatalf("revocation cut off: %v", err)
	}
	u := mapErr("revoke", &url.Error{Op: "Put", URL: "http://vault/v1/sys/leases/revoke/database-prod/creds/payments-ro/LEASEID-9", Err: errors.New("connection refused")})
	if strings.Contains(u.Error(), "LEASEID") || !errors.Is(u, fault.ErrUnavailable) {
		t.Fatalf("mapErr kept the URL: %v", u)
	}
	for _, e := range logs.All() {
		if strings.Contains(fmt.Sprint(e.Message, e.ContextMap()), "LEASEID") {
			t.Fatalf("a lease ID reached the log: %v %v", e.Message, e.ContextMap())
		}
	}
}

// After a restart the volume's lease is found by the hash its ..version names, replaced (not charged
// to the pod: the driver caused it) and retired, not revoked: the app keeps working with it until it
// has the new one; the volume's release revokes both.
func TestRestartAdoptionRetiresTheOldLease(t *testing.T) {
	f := &leaseVault{}
	var charged int
	s, _, _ := newLeaseSource(t, f, Options{Budget: func(_ broker.Identity, n int, _ time.Time) error { charged += n; return nil }})
	if _, _, err := leaseOf(t, s, "vol-1"); err != nil {
		t.Fatal(err)
	}
	old := leaseHash("database-prod/creds/payments-ro/LEASEID-1")
	s.ReleaseVolume("vol-1") // the restart: the memory is gone (nothing revoked: the closure is dropped)
	ctx := context.Background()
	secs, recs, err := s.Lease(ctx, pod, "jwt-CANARY", broker.LeaseRequest{Volume: "vol-1", Refs: dbRefs(), Adopt: map[string]string{"database:payments-ro": old}})
	if err != nil || len(recs) != 1 || recs[0].Action != broker.LeaseReissued || string(secs[0].Value) != "v-user-2" || charged != 1 {
		t.Fatalf("adoption: %v %+v, %d charged (want only the first issue)", err, recs, charged)
	}
	if len(f.revoked) != 0 || s.Leases() != 2 {
		t.Fatalf("the found lease was revoked at once (%v) or not kept (%d held)", f.revoked, s.Leases())
	}
	if err := s.ReleaseVolume("vol-1")(ctx); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(f.revoked); got != "[database-prod/creds/payments-ro/LEASEID-2 database-prod/creds/payments-ro/LEASEID-1]" {
		t.Fatalf("revoked %s: want the new lease and the one found", got)
	}
}

// A token whose renewal comes back capped (its max TTL) ends for good within the hour, and Vault
// revokes its leases with it: dynamic credentials are then issued under a fresh login, and the
// reissue is not charged to the pod.
func TestCappedTokenGetsAFreshLoginForLeases(t *testing.T) {
	f := &leaseVault{renewSelfTTL: 100}
	var charged int
	s, clock, _ := newLeaseSource(t, f, Options{Budget: func(_ broker.Identity, n int, _ time.Time) error { charged += n; return nil }})
	if _, _, err := leaseOf(t, s, "vol-1"); err != nil {
		t.Fatal(err)
	}
	clock.advance(30 * time.Second) // the 60 s lease still outside its window; the token (600 s) too
	if _, rec, err := leaseOf(t, s, "vol-1"); err != nil || rec.Action != broker.LeaseReused || f.logins != 1 {
		t.Fatalf("before the token's renewal: %v %+v, %d logins", err, rec, f.logins)
	}
	s.mu.Lock()
	for _, tk := range s.tokens { // the token's last third: the next request renews it, capped
		tk.issued = tk.issued.Add(-450 * time.Second)
	}
	s.mu.Unlock()
	if _, rec, err := leaseOf(t, s, "vol-1"); err != nil || rec.Action != broker.LeaseReissued || f.logins != 2 || charged != 1 {
		t.Fatalf("after a capped renewal: %v %+v, %d logins, %d charged", err, rec, f.logins, charged)
	}
}
