package broker

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
)

// MaxRefs bounds how many secrets one request may ask for.
const MaxRefs = 64

// Options configure NewService. All fields but Now are required.
type Options struct {
	Authenticator Authenticator
	Authorizer    Authorizer
	Source        SecretSource
	Auditor       Auditor
	// Audiences the pod's token must be issued for (the broker's own audience, e.g. "keyward").
	Audiences []string
	Now       func() time.Time
}

// Service answers one secret request: authenticate -> authorize every ref -> fetch -> audit.
// It is all or nothing: one denied ref denies the whole request.
type Service struct {
	o Options
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
	return &Service{o: o}, nil
}

// Request is one ask for secrets.
type Request struct {
	RequestID string
	// Event is what the caller does with the answer (EventFetch, EventMount, ...), for the audit record.
	Event EventType
	Token Token
	// Claimed is who the caller says the pod is (from kubelet's pod info). Every non-empty field must
	// match the authenticated identity.
	Claimed Identity
	Refs    []SecretRef
}

// Fetch runs the request and records exactly one audit record for it. If the record cannot be
// written, the request fails (fail closed) and no secret is returned.
func (s *Service) Fetch(ctx context.Context, req Request) (secrets []Secret, err error) {
	start := s.o.Now()
	ev := Event{Time: start, RequestID: req.RequestID, Type: req.Event, Subject: subject(req.Claimed)}
	defer func() {
		ev.Latency = s.o.Now().Sub(start)
		ev.Code = CodeName(err)
		if err == nil {
			ev.Decision, ev.Reason = Allow, "ok: "+ev.Reason
		} else {
			ev.Decision = Error
			if errors.Is(err, ErrDenied) || errors.Is(err, ErrUnauthenticated) || errors.Is(err, ErrInvalid) {
				ev.Decision = Deny
			}
			ev.Reason = err.Error()
		}
		if aerr := s.o.Auditor.Record(ctx, ev); aerr != nil && err == nil {
			clear(secrets)
			secrets, err = nil, fmt.Errorf("audit record not written, refusing: %w", ErrUnavailable)
		}
	}()
	if len(req.Refs) == 0 || len(req.Refs) > MaxRefs {
		ev.Type = EventAuthorize
		return nil, fmt.Errorf("%d secrets requested (want 1..%d): %w", len(req.Refs), MaxRefs, ErrInvalid)
	}
	ev.Object = object(req.Refs, nil)
	if req.Token.Empty() {
		ev.Type = EventAuthenticate
		return nil, fmt.Errorf("no service-account token: %w", ErrUnauthenticated)
	}
	id, err := s.o.Authenticator.Authenticate(ctx, req.Token, s.o.Audiences)
	if err != nil {
		ev.Type = EventAuthenticate
		return nil, err
	}
	ev.Subject = subject(id)
	if err := matchClaim(id, req.Claimed); err != nil {
		ev.Type = EventAuthenticate
		return nil, err
	}
	resolved := make([]Resolved, 0, len(req.Refs))
	var reasons []string
	for _, ref := range req.Refs {
		r, err := s.o.Authorizer.Authorize(ctx, id, ref)
		if err != nil {
			ev.Type = EventAuthorize
			return nil, fmt.Errorf("%s: %w", ref, err)
		}
		resolved = append(resolved, r)
		reasons = append(reasons, r.Reason)
	}
	ev.Object = object(req.Refs, resolved)
	ev.Reason = strings.Join(dedupe(reasons), "; ")
	secrets, err = s.o.Source.Fetch(ctx, id, req.Token, resolved)
	if err != nil {
		return nil, err
	}
	if len(secrets) != len(resolved) {
		return nil, fmt.Errorf("source returned %d of %d secrets: %w", len(secrets), len(resolved), ErrUnavailable)
	}
	if len(secrets) == 1 {
		ev.Object.Version = secrets[0].Version
	}
	return secrets, nil
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
			return fmt.Errorf("token is for %s %q, request claims %q: %w", f.name, f.got, f.want, ErrDenied)
		}
	}
	return nil
}

func subject(id Identity) Subject {
	return Subject{Namespace: id.Namespace, ServiceAccount: id.ServiceAccount, Pod: id.PodName, PodUID: id.PodUID, Node: id.Node}
}

func object(refs []SecretRef, resolved []Resolved) Object {
	var names, keys []string
	for _, r := range refs {
		names = append(names, r.Ref)
		keys = append(keys, r.Key)
	}
	o := Object{Ref: strings.Join(names, ","), Key: strings.Join(keys, ",")}
	if len(refs) == 1 {
		o.Version = refs[0].Version
	}
	if len(resolved) > 0 {
		o.Environment = resolved[0].Environment
	}
	return o
}

func dedupe(ss []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, s := range ss {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	return out
}

// CodeName is the gRPC code name an adapter will return for err, for audit records. The domain
// does not import gRPC; the adapters' toStatus functions use the same mapping.
func CodeName(err error) string {
	switch {
	case err == nil:
		return "OK"
	case errors.Is(err, ErrUnauthenticated):
		return "Unauthenticated"
	case errors.Is(err, ErrDenied):
		return "PermissionDenied"
	case errors.Is(err, ErrInvalid):
		return "InvalidArgument"
	case errors.Is(err, ErrNotFound):
		return "NotFound"
	case errors.Is(err, ErrUnavailable):
		return "Unavailable"
	case errors.Is(err, context.DeadlineExceeded):
		return "DeadlineExceeded"
	case errors.Is(err, context.Canceled):
		return "Canceled"
	default:
		return "Internal"
	}
}
