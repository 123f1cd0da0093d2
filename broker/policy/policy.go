package policy

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"regexp"
	"strings"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"sigs.k8s.io/yaml"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/internal/fault"
)

// EnvironmentLabel is the namespace label that places a namespace in an environment. Cluster admins
// set it; a namespace without it gets nothing.
const EnvironmentLabel = "keyward.dev/environment"

// Environment maps an environment to its part of Vault.
type Environment struct {
	Name string `json:"name"`
	// VaultMount is the KV v2 mount; VaultPrefix the path every ref of this environment lives under.
	VaultMount  string `json:"vaultMount"`
	VaultPrefix string `json:"vaultPrefix"`
	// VaultRole is the role of Vault's kubernetes auth method pods of this environment log in with.
	VaultRole string `json:"vaultRole,omitempty"`
	// PKIMount and DatabaseMount are the environment's PKI and database secrets engines, which issue
	// its dynamic refs (broker.KindPKI, broker.KindDatabase); empty: the environment issues none of
	// that kind. No two environments share one (nor does either equal a vaultMount).
	PKIMount      string `json:"pkiMount,omitempty"`
	DatabaseMount string `json:"databaseMount,omitempty"`
}

// Mount returns the environment's mount for a dynamic kind ("" if it names none).
func (e Environment) Mount(k broker.Kind) string {
	switch k {
	case broker.KindPKI:
		return e.PKIMount
	case broker.KindDatabase:
		return e.DatabaseMount
	}
	return ""
}

// Grant lets pods of Namespace running as ServiceAccount ("*": any) read refs matching Paths and have
// credentials issued by the Vault roles matching PKIRoles and DatabaseRoles. A path is an exact ref,
// or a prefix ending in "/*" that covers every ref below it. A role is an exact Vault role name, or a
// prefix ending in "*" ("payments_*"); either starts with the namespace and RoleSeparator.
type Grant struct {
	Namespace      string   `json:"namespace"`
	ServiceAccount string   `json:"serviceAccount"`
	Paths          []string `json:"paths,omitempty"`
	PKIRoles       []string `json:"pkiRoles,omitempty"`
	DatabaseRoles  []string `json:"databaseRoles,omitempty"`
}

// Roles returns the grant's role patterns for a dynamic kind.
func (g Grant) Roles(k broker.Kind) []string {
	switch k {
	case broker.KindPKI:
		return g.PKIRoles
	case broker.KindDatabase:
		return g.DatabaseRoles
	}
	return nil
}

// Policy is the policy file.
type Policy struct {
	Environments []Environment `json:"environments"`
	Grants       []Grant       `json:"grants"`
	// IssueBudgets bound how fast dynamic credentials are issued (absent: DefaultBudgets).
	IssueBudgets *IssueBudgets `json:"issueBudgets,omitempty"`
	envs         map[string]Environment
	budgets      Budgets // in force: IssueBudgets, or the defaults
	hash         string
}

var (
	segmentRE = regexp.MustCompile(`^[A-Za-z0-9_.-]+$`)
	dnsLabel  = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$`)
	saName    = regexp.MustCompile(`^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$`)
)

// Parse decodes a policy strictly (unknown keys are an error) and validates it, including the
// invariants that hold whatever the policy says.
func Parse(b []byte) (*Policy, error) {
	var p Policy
	if err := yaml.UnmarshalStrict(b, &p); err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	if err := p.validate(); err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	sum := sha256.Sum256(b)
	p.hash = fmt.Sprintf("%x", sum[:6])
	return &p, nil
}

// Load reads and parses a policy file.
func Load(path string) (*Policy, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	return Parse(b)
}

// Hash identifies the policy's content (for logs and audit).
func (p *Policy) Hash() string { return p.hash }

func (p *Policy) validate() error {
	if len(p.Environments) == 0 {
		return fmt.Errorf("no environments")
	}
	p.envs = map[string]Environment{}
	for i, e := range p.Environments {
		where := fmt.Sprintf("environments[%d]", i)
		if !dnsLabel.MatchString(e.Name) {
			return fmt.Errorf("%s: name %q is not a DNS label", where, e.Name)
		}
		if _, dup := p.envs[e.Name]; dup {
			return fmt.Errorf("%s: environment %q defined twice", where, e.Name)
		}
		if !oneSegment(e.VaultMount) {
			return fmt.Errorf("%s: vaultMount %q must be one path segment", where, e.VaultMount)
		}
		if err := broker.ValidateRef(e.VaultPrefix); err != nil {
			return fmt.Errorf("%s: vaultPrefix: %v", where, err)
		}
		for _, o := range p.Environments[:i] {
			if o.VaultMount == e.VaultMount && (under(e.VaultPrefix, o.VaultPrefix) || under(o.VaultPrefix, e.VaultPrefix)) {
				return fmt.Errorf("%s: vault path %s/%s overlaps environment %q (%s/%s): environments must not share secrets",
					where, e.VaultMount, e.VaultPrefix, o.Name, o.VaultMount, o.VaultPrefix)
			}
		}
		p.envs[e.Name] = e
	}
	// Issuers: a PKI or database mount belongs to one environment, and is neither a KV mount nor the
	// other kind's mount (a mount is one secrets engine).
	mounts := map[string]string{} // every mount named so far -> what names it
	for _, e := range p.Environments {
		mounts[e.VaultMount] = fmt.Sprintf("environment %q's vaultMount", e.Name)
	}
	for i, e := range p.Environments {
		for _, m := range []struct{ field, mount string }{{"pkiMount", e.PKIMount}, {"databaseMount", e.DatabaseMount}} {
			if m.mount == "" {
				continue
			}
			if !oneSegment(m.mount) {
				return fmt.Errorf("environments[%d]: %s %q must be one path segment", i, m.field, m.mount)
			}
			if other, taken := mounts[m.mount]; taken {
				return fmt.Errorf("environments[%d]: %s %q is also %s: environments must not share issuers, and an issuer is not a KV mount",
					i, m.field, m.mount, other)
			}
			mounts[m.mount] = fmt.Sprintf("environment %q's %s", e.Name, m.field)
		}
	}
	if err := p.validateBudgets(); err != nil {
		return err
	}
	for i, g := range p.Grants {
		where := fmt.Sprintf("grants[%d]", i)
		if !dnsLabel.MatchString(g.Namespace) {
			return fmt.Errorf("%s: namespace %q is not a namespace name", where, g.Namespace)
		}
		if g.ServiceAccount != "*" && !saName.MatchString(g.ServiceAccount) {
			return fmt.Errorf("%s: serviceAccount %q: want a service account name or \"*\"", where, g.ServiceAccount)
		}
		if len(g.Paths) == 0 && len(g.PKIRoles) == 0 && len(g.DatabaseRoles) == 0 {
			return fmt.Errorf("%s: no paths, pkiRoles or databaseRoles: a grant grants something", where)
		}
		for _, path := range g.Paths {
			base := strings.TrimSuffix(path, "/*")
			if err := broker.ValidateRef(base); err != nil {
				return fmt.Errorf("%s: path %q: %v", where, path, err)
			}
			first, _, _ := strings.Cut(base, "/")
			if first != g.Namespace && first != "shared" {
				return fmt.Errorf("%s: path %q reaches outside namespace %q: a grant may cover only refs under %s/ and shared/",
					where, path, g.Namespace, g.Namespace)
			}
		}
		for _, f := range []struct {
			field string
			roles []string
		}{{"pkiRoles", g.PKIRoles}, {"databaseRoles", g.DatabaseRoles}} {
			for _, role := range f.roles {
				if err := validateRolePattern(g.Namespace, role); err != nil {
					return fmt.Errorf("%s: %s: %v", where, f.field, err)
				}
			}
		}
	}
	return nil
}

// RoleSeparator ends the namespace at the start of a Vault role name ("payments_web"): an underscore,
// which a namespace name (a DNS label) cannot hold, so the roles of namespace "payments" ("payments_*")
// never include those of "payments-eu" ("payments-eu_web"), in this policy and in Vault's
// (deploy/vault/namespace-dynamic.hcl globs the same prefix).
const RoleSeparator = "_"

// validateRolePattern checks a role a grant of namespace ns names: a Vault role name (or a prefix
// ending in "*") that starts with ns and RoleSeparator, the names of ns's roles in Vault (the Vault policy
// deploy/vault/namespace-dynamic.hcl lets a namespace's token use only those).
func validateRolePattern(ns, role string) error {
	base, prefix := strings.CutSuffix(role, "*")
	name := base
	if prefix {
		// A prefix may end where a name may not ("payments-"): check it as the start of a name.
		name = base + "0"
		if len(name) > broker.MaxRoleLen {
			return fmt.Errorf("role %.140q: longer than a role name (%d)", role, broker.MaxRoleLen)
		}
	}
	if err := broker.ValidateRole(name); err != nil {
		return fmt.Errorf("role %.140q: want a Vault role name (1..%d of [A-Za-z0-9_.-], starting and ending with a letter or digit), or a prefix of one ending in \"*\"",
			role, broker.MaxRoleLen)
	}
	if !strings.HasPrefix(base, ns+RoleSeparator) {
		return fmt.Errorf("role %q reaches outside namespace %q: a grant may name only roles starting with %q", role, ns, ns+RoleSeparator)
	}
	return nil
}

// matchesRole reports whether a role pattern (exact, or a prefix ending in "*") matches role.
func matchesRole(pattern, role string) bool {
	if base, ok := strings.CutSuffix(pattern, "*"); ok {
		return strings.HasPrefix(role, base)
	}
	return pattern == role
}

// oneSegment reports whether a mount is one path segment (not "." or "..").
func oneSegment(m string) bool { return segmentRE.MatchString(m) && m != "." && m != ".." }

// under reports whether path is prefix or below it, segment-wise.
func under(path, prefix string) bool {
	return path == prefix || strings.HasPrefix(path, prefix+"/")
}

func matches(pattern, ref string) bool {
	if base, ok := strings.CutSuffix(pattern, "/*"); ok {
		return strings.HasPrefix(ref, base+"/")
	}
	return pattern == ref
}

// Namespaces tells the environment label of a namespace (from an informer's cache, not per request).
type Namespaces interface {
	// EnvironmentOf returns the namespace's environment label; ok is false without the label. An
	// error wraps fault.ErrUnavailable (cache not synced) or fault.ErrDenied (no such namespace).
	EnvironmentOf(namespace string) (env string, ok bool, err error)
}

// Authorizer is broker.Authorizer over a policy that can be swapped at run time.
type Authorizer struct {
	pol     atomic.Pointer[Policy]
	gen     atomic.Uint64 // policies in force since start: 1, then one more per Set
	ns      Namespaces
	budgets budgets
}

var _ broker.Authorizer = (*Authorizer)(nil)

// NewAuthorizer starts with policy p.
func NewAuthorizer(p *Policy, ns Namespaces) *Authorizer {
	a := &Authorizer{ns: ns}
	a.pol.Store(p)
	a.gen.Store(1)
	a.budgets.init(p.budgets)
	return a
}

// Policy returns the policy in force.
func (a *Authorizer) Policy() *Policy { return a.pol.Load() }

// Set swaps in a new, already validated policy. Its issue budgets apply to the buckets in use at
// once: each keeps its tokens (at most the new burst) and refills at the new rate.
func (a *Authorizer) Set(p *Policy) {
	a.budgets.setRates(p.budgets)
	a.pol.Store(p)
	a.gen.Add(1)
}

// Generation counts the policies put in force since start: 1 for the first, one more per reload.
func (a *Authorizer) Generation() uint64 { return a.gen.Load() }

// Authorize allows ref for id only if a grant of id's namespace and service account covers it, and
// places it under id's namespace's environment: a pod never reaches another environment's secrets.
// ref has been validated (broker.Service validates every ref once, before authorizing).
func (a *Authorizer) Authorize(_ context.Context, id broker.Identity, ref broker.SecretRef) (broker.Resolved, error) {
	return a.pol.Load().decide(a.ns, id, ref)
}

func (p *Policy) decide(ns Namespaces, id broker.Identity, ref broker.SecretRef) (broker.Resolved, error) {
	envName, ok, err := ns.EnvironmentOf(id.Namespace)
	if err != nil {
		return broker.Resolved{}, err
	}
	if !ok {
		return broker.Resolved{}, fmt.Errorf("namespace %q has no %s label: %w", id.Namespace, EnvironmentLabel, fault.ErrDenied)
	}
	env, known := p.envs[envName]
	if !known {
		return broker.Resolved{}, fmt.Errorf("namespace %q is in environment %q, which the policy does not define: %w", id.Namespace, envName, fault.ErrDenied)
	}
	if ref.Dynamic() {
		return p.decideDynamic(env, id, ref)
	}
	for i, g := range p.Grants {
		if g.Namespace != id.Namespace || (g.ServiceAccount != "*" && g.ServiceAccount != id.ServiceAccount) {
			continue
		}
		for _, pat := range g.Paths {
			if matches(pat, ref.Ref) {
				return broker.Resolved{
					SecretRef: ref, Environment: env.Name, Mount: env.VaultMount, Path: env.VaultPrefix + "/" + ref.Ref, Role: env.VaultRole,
					Reason: fmt.Sprintf("grant %d (%s/%s) path %s in environment %s", i, g.Namespace, g.ServiceAccount, pat, env.Name),
				}, nil
			}
		}
	}
	return broker.Resolved{}, fmt.Errorf("no grant lets %s/%s read %s: %w", id.Namespace, id.ServiceAccount, ref.Ref, fault.ErrDenied)
}

// decideDynamic allows a dynamic ref (ref.Ref is a Vault role) only if env names the kind's mount and
// a grant of the pod's namespace and service account names the role for that kind; it resolves to the
// role of env's mount. Grant paths never allow a dynamic ref, nor roles a KV ref.
func (p *Policy) decideDynamic(env Environment, id broker.Identity, ref broker.SecretRef) (broker.Resolved, error) {
	field := map[broker.Kind]string{broker.KindPKI: "pkiMount", broker.KindDatabase: "databaseMount"}[ref.Kind]
	mount := env.Mount(ref.Kind)
	if field == "" || mount == "" {
		return broker.Resolved{}, fmt.Errorf("environment %q has no %s: it issues no %s credentials: %w", env.Name, cmp.Or(field, "mount for "+string(ref.Kind)), ref.Kind, fault.ErrDenied)
	}
	// The role is the namespace's: it starts with its name and the separator, which no namespace name
	// holds (payments-eu_web is payments-eu's, never payments').
	if !strings.HasPrefix(ref.Ref, id.Namespace+RoleSeparator) {
		return broker.Resolved{}, fmt.Errorf("%s role %q is not one of namespace %q's roles (%s%s*): %w", ref.Kind, ref.Ref, id.Namespace, id.Namespace, RoleSeparator, fault.ErrDenied)
	}
	for i, g := range p.Grants {
		if g.Namespace != id.Namespace || (g.ServiceAccount != "*" && g.ServiceAccount != id.ServiceAccount) {
			continue
		}
		for _, pat := range g.Roles(ref.Kind) {
			if matchesRole(pat, ref.Ref) {
				return broker.Resolved{
					SecretRef: ref, Environment: env.Name, Mount: mount, Path: ref.Ref, Role: env.VaultRole,
					Reason: fmt.Sprintf("grant %d (%s/%s) %sRoles %s in environment %s", i, g.Namespace, g.ServiceAccount, ref.Kind, pat, env.Name),
				}, nil
			}
		}
	}
	return broker.Resolved{}, fmt.Errorf("no grant lets %s/%s use %s role %s: %w", id.Namespace, id.ServiceAccount, ref.Kind, ref.Ref, fault.ErrDenied)
}

// Environment returns an environment of the policy in force.
func (a *Authorizer) Environment(name string) (Environment, bool) {
	e, ok := a.pol.Load().envs[name]
	return e, ok
}

// Watch reloads the policy file when its content changes (checked every interval). A changed file is
// read again until two reads a moment apart agree, so a file caught mid-write (an editor or a script
// that truncates and rewrites it) is never taken for a bad policy; ConfigMap updates swap the whole
// file at once. A new policy is validated first; a bad one keeps the last good policy, logs an error
// and leaves an audit record.
func Watch(ctx context.Context, path string, interval time.Duration, a *Authorizer, log *zap.Logger, auditor audit.Auditor) {
	watchFile(ctx, path, interval, a, log, auditor, os.ReadFile)
}

// maxSettleReads bounds how often a changing file is re-read before the next tick tries again.
const maxSettleReads = 5

// readStable reads path again, settle apart, until two reads agree (starting from b, the first); ok
// is false if the file kept changing (or could not be read, or ctx ended).
func readStable(ctx context.Context, path string, b []byte, settle time.Duration, readFile func(string) ([]byte, error)) ([]byte, bool) {
	for range maxSettleReads {
		select {
		case <-ctx.Done():
			return nil, false
		case <-time.After(settle):
		}
		again, err := readFile(path)
		if err != nil {
			return nil, false
		}
		if bytes.Equal(again, b) {
			return b, true
		}
		b = again
	}
	return nil, false
}

func watchFile(ctx context.Context, path string, interval time.Duration, a *Authorizer, log *zap.Logger, auditor audit.Auditor,
	readFile func(string) ([]byte, error)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	settle := min(interval/2, time.Second)
	last := a.Policy().Hash()
	lastBad := ""
	hash := func(b []byte) string { sum := sha256.Sum256(b); return fmt.Sprintf("%x", sum[:6]) }
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		b, err := readFile(path)
		if err != nil {
			continue // being replaced (ConfigMap symlink swap); try again next tick
		}
		h := hash(b)
		if h == last || h == lastBad {
			continue
		}
		b, ok := readStable(ctx, path, b, settle, readFile)
		if !ok {
			continue // still being written (or ctx ended): the next tick looks again
		}
		h = hash(b)
		if h == last || h == lastBad {
			continue
		}
		p, err := Parse(b)
		ev := audit.Event{Type: audit.EventPolicyReload, RequestID: "policy-" + h}
		if err != nil {
			lastBad = h
			log.Error("policy reload refused; keeping the last good policy", zap.String("path", path),
				zap.String("kept", last), zap.Error(err))
			ev.Outcome(fmt.Errorf("refused, kept %s: %v: %w", last, err, fault.ErrInvalid))
		} else {
			a.Set(p)
			log.Info("policy reloaded", zap.String("path", path), zap.String("hash", h), zap.String("previous", last))
			last, lastBad = h, ""
			ev.Outcome(nil)
			ev.Reason = "loaded " + h
		}
		if err := auditor.Record(ctx, ev); err != nil {
			log.Error("audit record for the policy reload not written", zap.Error(err))
		}
	}
}
