package broker

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/internal/fault"
)

// MaxRefs bounds how many secrets one request may ask for.
const MaxRefs = 64

// Options configure NewService. Authenticator, Authorizer, Source, Auditor and Audiences are
// required.
type Options struct {
	Authenticator Authenticator
	Authorizer    Authorizer
	Source        SecretSource
	// Leases issues the dynamic refs (pki, database); nil: dynamic refs are refused.
	Leases  LeaseSource
	Auditor audit.Auditor
	// Audiences the pod's token must be issued for (the broker's own audience, e.g. "keyward").
	Audiences []string
	// Node is the node this broker serves. When set, a token bound to a pod on another node (or to
	// no node) is refused, so a token stolen from one node cannot be replayed through another's broker.
	Node string
	// Pods confirms a pod's deletion when its token is rejected on a republish (Request.Published):
	// only then is the refusal a withdrawal (fault.ErrWithdrawn). Nil: a rejected token never withdraws.
	Pods PodChecker
	// RefusalBurst and RefusalInterval rate-limit the audit records of refused requests per pod: a
	// burst of RefusalBurst records, then one per RefusalInterval; each record that is written counts
	// the ones suppressed before it. Defaults: 10 and 30s.
	RefusalBurst    int
	RefusalInterval time.Duration
	Now             func() time.Time
}

// Service answers one secret request: authenticate -> authorize every ref -> fetch -> audit.
// It is all or nothing: one denied ref denies the whole request.
type Service struct {
	o        Options
	refusals *refusalLimiter
}

// NewService checks the options.
func NewService(o Options) (*Service, error) {
	if o.Authenticator == nil || o.Authorizer == nil || o.Source == nil || o.Auditor == nil {
		return nil, errors.New("broker: Authenticator, Authorizer, Source and Auditor are required")
	}
	if len(o.Audiences) == 0 {
		return nil, errors.New("broker: at least one audience is required")
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.RefusalBurst <= 0 {
		o.RefusalBurst = 10
	}
	if o.RefusalInterval <= 0 {
		o.RefusalInterval = 30 * time.Second
	}
	return &Service{o: o, refusals: newRefusalLimiter(o.RefusalBurst, o.RefusalInterval)}, nil
}

// Request is one ask for secrets.
type Request struct {
	RequestID string
	// Event is what the caller does with the answer (audit.EventFetch, audit.EventMount, ...), for the
	// audit record.
	Event audit.EventType
	Token Token
	// Claimed is who the caller says the pod is (from kubelet's pod info). Every non-empty field must
	// match the authenticated identity.
	Claimed Identity
	Refs    []SecretRef
	// MaxBytes bounds the values fetched, together (the volume's size); 0 means DefaultMaxBytes.
	MaxBytes int64
	// Published says the caller already delivered this pod's files (a republish): a refusal then
	// decides whether they stay, so a rejected token is checked against the pod's existence.
	Published bool
	// Environment is, on a republish, the environment the delivered files were read from
	// (Secret.Environment), if the caller knows it. If the pod's namespace is in another environment
	// now (it was relabelled), the request is refused as a withdrawal: the files came from an
	// environment the namespace has left.
	Environment string
	// Volume owns the dynamic credentials the request gets (LeaseRequest.Volume): required for a
	// dynamic ref. Adopt is LeaseRequest.Adopt.
	Volume string
	Adopt  map[string]string
}

// DefaultMaxBytes bounds a request's values when the request does not say.
const DefaultMaxBytes = 1 << 20

// AnswerBudget is the most a source may read from its backend for a request of refs refs whose values
// may take maxBytes together: the values, plus room for each answer's envelope and metadata and for
// the secrets' other, unrequested keys. Adapters bound their concurrency with the same figure.
func AnswerBudget(maxBytes int64, refs int) int64 {
	return maxBytes + 64<<10 + int64(refs)*4<<10
}

// Fetch runs the request and records exactly one audit record for it (refusals are rate-limited
// per pod; see Options.RefusalBurst). If the record of an allowed request cannot be written, the
// request fails (fail closed) and no secret is returned.
func (s *Service) Fetch(ctx context.Context, req Request) (secrets []Secret, err error) {
	start := s.o.Now()
	ev := audit.Event{Time: start, RequestID: req.RequestID, Type: req.Event, Subject: subject(req.Claimed)}
	defer func() {
		ev.LatencyMS = audit.Millis(s.o.Now().Sub(start))
		if aerr := s.record(ctx, ev, req.Claimed, err); aerr != nil && err == nil {
			clearSecrets(secrets)
			secrets, err = nil, fmt.Errorf("audit record not written, refusing: %w", fault.ErrUnavailable)
		}
	}()
	if len(req.Refs) == 0 || len(req.Refs) > MaxRefs {
		ev.Type = audit.EventAuthorize
		return nil, fmt.Errorf("%d secrets requested (want 1..%d): %w", len(req.Refs), MaxRefs, fault.ErrInvalid)
	}
	ev.Object = object(req.Refs, nil)
	id, err := s.authenticate(ctx, req)
	if err != nil {
		ev.Type = audit.EventAuthenticate
		return nil, err
	}
	ev.Subject = subject(id)
	resolved, err := s.authorize(ctx, id, req.Refs)
	if err == nil {
		err = moved(id, req, resolved)
	}
	if err != nil {
		ev.Type = audit.EventAuthorize
		return nil, err
	}
	ev.Object = object(req.Refs, resolved)
	ev.Reason = reasons(resolved)
	secrets, leases, err := s.fetch(ctx, id, req, resolved)
	for _, l := range leases {
		ev.Object.Leases = append(ev.Object.Leases, audit.Lease{Name: l.Name, Action: string(l.Action), LeaseSHA256: l.Hash,
			TTLSeconds: int64(l.TTL / time.Second), Serial: l.Serial})
	}
	if len(secrets) == 1 {
		ev.Object.Version = secrets[0].Version
	}
	for _, sec := range secrets { // what the pod received: keywardctl who-has reads it
		ev.Object.Versions = append(ev.Object.Versions, sec.Version)
	}
	return secrets, err
}

// authenticate establishes who the pod is and checks it against the claim and this node.
func (s *Service) authenticate(ctx context.Context, req Request) (Identity, error) {
	if req.Token.Empty() {
		return Identity{}, fmt.Errorf("no service-account token: %w", fault.ErrUnauthenticated)
	}
	id, err := s.o.Authenticator.Authenticate(ctx, req.Token, s.o.Audiences)
	if err != nil {
		return Identity{}, s.podGone(ctx, req, err)
	}
	if err := matchClaim(id, req.Claimed); err != nil {
		return id, err
	}
	if s.o.Node != "" && id.Node != s.o.Node {
		return id, fmt.Errorf("token is bound to a pod on node %q, this broker serves node %q: %w", id.Node, s.o.Node, fault.ErrDenied)
	}
	return id, nil
}

// authorize validates and resolves every ref, all or nothing: the one place refs are validated before
// the Authorizer sees them. A denial is the broker's own policy: certain, so it withdraws access
// (fault.Withdrawn).
func (s *Service) authorize(ctx context.Context, id Identity, refs []SecretRef) ([]Resolved, error) {
	resolved := make([]Resolved, 0, len(refs))
	for _, ref := range refs {
		if err := ref.Validate(); err != nil {
			return nil, err
		}
		r, err := s.o.Authorizer.Authorize(ctx, id, ref)
		if err != nil {
			err = fmt.Errorf("%s: %w", ref, err)
			if errors.Is(err, fault.ErrDenied) {
				err = fault.Withdrawn(err)
			}
			return nil, err
		}
		resolved = append(resolved, r)
	}
	return resolved, nil
}

// moved refuses a republish whose files were read from another environment than the one the pod's
// namespace is in now: the namespace was relabelled, and what it had under its old environment is
// withdrawn for certain, whatever the new one would give (a grant still matches under the new
// environment's prefix, but its Vault role may refuse the login or its secrets may be missing:
// failures that would otherwise keep the old files). The next republish, with nothing delivered,
// reads under the new environment.
func moved(id Identity, req Request, resolved []Resolved) error {
	if !req.Published || req.Environment == "" {
		return nil
	}
	for _, r := range resolved {
		if r.Environment != req.Environment {
			return fault.Withdrawn(fmt.Errorf("namespace %q moved from environment %q to %q: the files read from %q are withdrawn: %w",
				id.Namespace, req.Environment, r.Environment, req.Environment, fault.ErrDenied))
		}
	}
	return nil
}

// fetch reads the resolved refs from the sources (stored values from Source, dynamic credentials from
// Leases), within the request's size bound; it also returns what it did with the leases.
func (s *Service) fetch(ctx context.Context, id Identity, req Request, resolved []Resolved) ([]Secret, []Lease, error) {
	maxBytes := req.MaxBytes
	if maxBytes <= 0 {
		maxBytes = DefaultMaxBytes
	}
	var stored, dynamic []Resolved
	var storedAt, dynamicAt []int
	for i, r := range resolved {
		if r.Dynamic() {
			dynamic, dynamicAt = append(dynamic, r), append(dynamicAt, i)
		} else {
			stored, storedAt = append(stored, r), append(storedAt, i)
		}
	}
	if len(dynamic) > 0 && (s.o.Leases == nil || req.Volume == "") {
		return nil, nil, fmt.Errorf("%s: dynamic credentials are issued for a CSI volume only (they are revoked when it is unpublished): %w", dynamic[0].SecretRef, fault.ErrInvalid)
	}
	secrets := make([]Secret, len(resolved))
	var leases []Lease
	if len(dynamic) > 0 {
		got, ls, err := s.o.Leases.Lease(ctx, id, req.Token, LeaseRequest{Volume: req.Volume, Refs: dynamic, Adopt: req.Adopt})
		if err == nil && len(got) != len(dynamic) {
			clearSecrets(got)
			err = fmt.Errorf("lease source returned %d of %d secrets: %w", len(got), len(dynamic), fault.ErrUnavailable)
		}
		if err != nil {
			return nil, ls, err
		}
		leases = ls
		for j, i := range dynamicAt {
			secrets[i] = got[j]
		}
	}
	if len(stored) > 0 {
		got, err := s.o.Source.Fetch(ctx, id, req.Token, stored, maxBytes)
		if err == nil && len(got) != len(stored) {
			clearSecrets(got)
			err = fmt.Errorf("source returned %d of %d secrets: %w", len(got), len(stored), fault.ErrUnavailable)
		}
		if err != nil {
			clearSecrets(secrets)
			return nil, leases, err
		}
		for j, i := range storedAt {
			secrets[i] = got[j]
		}
	}
	var total int64
	for i, sec := range secrets {
		total += int64(len(sec.Value))
		secrets[i].Environment = resolved[i].Environment
	}
	if total > maxBytes {
		clearSecrets(secrets)
		return nil, leases, fmt.Errorf("the secrets hold %d bytes, more than the volume's %d: %w", total, maxBytes, fault.ErrTooLarge)
	}
	return secrets, leases, nil
}

// podGone turns a rejected token on a republish into a withdrawal when the pod is confirmed gone.
// Anything short of confirmation leaves err as it is: the pod's files stay.
func (s *Service) podGone(ctx context.Context, req Request, err error) error {
	if !req.Published || s.o.Pods == nil || !errors.Is(err, fault.ErrUnauthenticated) || req.Claimed.PodUID == "" {
		return err
	}
	gone, cerr := s.o.Pods.Gone(ctx, req.Claimed.Namespace, req.Claimed.PodName, req.Claimed.PodUID)
	if cerr != nil || !gone {
		return err
	}
	return fault.Withdrawn(fmt.Errorf("%w; pod %s/%s (uid %s) is gone", err, req.Claimed.Namespace, req.Claimed.PodName, req.Claimed.PodUID))
}

// Refuse records a request an adapter refused before it could reach Fetch (a malformed request, a
// missing token, a writable volume, too many requests at once): one audit record with the claimed
// pod and the reason, rate-limited per pod like every refusal. The record's error, if any, is
// returned for logging; the request is refused either way.
func (s *Service) Refuse(ctx context.Context, req Request, err error) error {
	ev := audit.Event{Time: s.o.Now(), RequestID: req.RequestID, Type: req.Event, Subject: subject(req.Claimed)}
	if len(req.Refs) > 0 && len(req.Refs) <= MaxRefs {
		ev.Object = object(req.Refs, nil)
	}
	return s.record(ctx, ev, req.Claimed, err)
}

// SuppressedRefusals is how many refusal records the per-pod rate limit has suppressed in all.
func (s *Service) SuppressedRefusals() uint64 { return s.refusals.suppressed.Load() }

// record completes ev from err and writes it; refusals pass the per-pod rate limit first.
func (s *Service) record(ctx context.Context, ev audit.Event, claimed Identity, err error) error {
	ev.Outcome(err)
	if err == nil {
		ev.Reason = "ok: " + ev.Reason
		return s.o.Auditor.Record(ctx, ev)
	}
	// Per pod and code: a flood of one kind (a malformed volume kubelet keeps retrying) does not hide
	// another (the same pod probing refs it is denied).
	key := claimed.PodUID
	if key == "" {
		key = claimed.Namespace + "/" + claimed.PodName
	}
	ok, suppressed := s.refusals.allow(key+"|"+ev.Code, s.o.Now())
	if !ok {
		return nil
	}
	ev.Suppressed = suppressed
	return s.o.Auditor.Record(ctx, ev)
}

func clearSecrets(secrets []Secret) {
	for _, sec := range secrets {
		clear(sec.Value)
	}
}

// ReleaseVolume forgets the dynamic credentials a volume holds and returns the function that revokes
// their leases (see LeaseSource); nil when there are none.
func (s *Service) ReleaseVolume(volume string) func(context.Context) error {
	if s.o.Leases == nil || volume == "" {
		return nil
	}
	return s.o.Leases.ReleaseVolume(volume)
}

// Release forgets what the source holds for a pod whose volumes are gone and returns the function
// that revokes it (see PodReleaser); nil when the source holds nothing per pod.
func (s *Service) Release(podUID string) func(context.Context) error {
	if r, ok := s.o.Source.(PodReleaser); ok && podUID != "" {
		return r.Release(podUID)
	}
	return nil
}

// matchClaim denies any difference between who the token proves and who the caller claims.
func matchClaim(id, claimed Identity) error {
	for _, f := range []struct{ name, got, want string }{
		{"namespace", id.Namespace, claimed.Namespace},
		{"service account", id.ServiceAccount, claimed.ServiceAccount},
		{"pod name", id.PodName, claimed.PodName},
		{"pod UID", id.PodUID, claimed.PodUID},
	} {
		if f.want != "" && f.got != f.want {
			return fmt.Errorf("token is for %s %q, request claims %q: %w", f.name, f.got, f.want, fault.ErrDenied)
		}
	}
	return nil
}

func subject(id Identity) audit.Subject {
	return audit.Subject{Namespace: id.Namespace, ServiceAccount: id.ServiceAccount, Pod: id.PodName, PodUID: id.PodUID, Node: id.Node}
}

func object(refs []SecretRef, resolved []Resolved) audit.Object {
	var names, keys []string
	for _, r := range refs {
		names = append(names, r.Ref)
		keys = append(keys, r.Key)
	}
	o := audit.Object{Ref: strings.Join(names, ","), Key: strings.Join(keys, ",")}
	if len(refs) == 1 {
		o.Version = refs[0].Version
	}
	if len(resolved) > 0 {
		o.Environment = resolved[0].Environment
	}
	return o
}

// reasons says why the refs were allowed: each grant once.
func reasons(resolved []Resolved) string {
	seen := map[string]bool{}
	var out []string
	for _, r := range resolved {
		if !seen[r.Reason] {
			seen[r.Reason] = true
			out = append(out, r.Reason)
		}
	}
	return strings.Join(out, "; ")
}
