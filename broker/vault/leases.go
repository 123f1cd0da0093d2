package vault

// Dynamic credentials and their leases (broker.LeaseSource). A volume that names a PKI certificate or
// database credentials gets its own, issued with the Vault token its refs are read with (the pod's
// service account's in pod mode, so Vault's policy is a second check and Vault's audit log names the
// service account), and holds them for as long as it lives:
//
//   - a republish reuses them while they are outside their renewal window (the last third of the
//     lease's TTL, Options.RenewWindow);
//   - inside it, database credentials are renewed (sys/leases/renew) and certificates reissued; a
//     lease that can no longer be renewed far enough (its max TTL), or whose Vault token is no longer
//     the one in use (Vault revokes a token's leases with it), is reissued;
//   - a replaced lease is retired, not revoked: the pod may still hold connections or a TLS session
//     made with it, and it ends at its own TTL, in the last third of which it already is;
//   - ReleaseVolume (the volume unpublished, its files withdrawn, a first publish that failed) forgets
//     them at once and revokes them, retired ones included.
//
// Lease IDs live in this memory only: never in a log, an error, an audit record or a file (those
// name a hash of the ID, leaseHash). After a driver restart the memory is gone; the volume's metadata
// (the ..version file) still names each lease's hash, and adopt finds the lease again by listing the
// lease IDs under the role (sys/leases/lookup, granted per namespace's roles) and matching the hash.
// A lease found again is revoked and reissued rather than reused: it hangs off the Vault token that
// issued it, which died with the old process's memory (tokens are never written anywhere either), so
// Vault will revoke it when that token expires, at a time no one here can know. Revoking it now and
// issuing a fresh one under the current token costs one reissue per volume per restart and leaves no
// lease behind; a lease not found (the listing refused, or it already ended) lapses with its token.

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	vaultapi "github.com/hashicorp/vault/api"
	"go.uber.org/zap"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/internal/fault"
)

// DefaultRenewWindow is the part of a lease's TTL, at its end, in which a republish renews or
// reissues it.
const DefaultRenewWindow = 1.0 / 3

// DefaultMaxLeases bounds the leases the source holds at once (Options.MaxLeases).
const DefaultMaxLeases = 4096

// leaseKey names one credential of a volume: the refs with the same kind, mount, role and (PKI)
// request share it.
type leaseKey struct {
	kind  broker.Kind
	mount string
	role  string
	pki   broker.PKIRequest
}

// leaseKeyOf is the credential a resolved dynamic ref belongs to.
func leaseKeyOf(r broker.Resolved) leaseKey {
	return leaseKey{kind: r.Kind, mount: r.Mount, role: r.Path, pki: r.PKI}
}

func (k leaseKey) name() string {
	return broker.LeaseName(broker.SecretRef{Kind: k.kind, Ref: k.role, PKI: k.pki})
}

// lease is a credential the source issued and holds. Its id and values never leave this memory
// except as the secrets delivered to the volume.
type lease struct {
	key       leaseKey
	id        string // Vault's lease ID ("" if Vault gave none)
	hash      string
	token     string // the Vault token it was issued with (its leases die with it)
	issued    time.Time
	ttl       time.Duration
	renewable bool
	serial    string
	values    map[string][]byte
}

func (l *lease) expires() time.Time { return l.issued.Add(l.ttl) }

func (l *lease) String() string { return "lease(" + l.key.name() + ", sha256:" + l.hash + ")" }

// volumeLeases are a volume's credentials: those in use, and those replaced but not yet ended (their
// values already cleared: they are never delivered again), and the pod they were issued for.
type volumeLeases struct {
	owner   string // pod UID
	cur     map[leaseKey]*lease
	retired []*lease
}

// clearValues zeroes a lease's values (a private key, a password) once nothing will deliver them.
func (l *lease) clearValues() {
	for _, v := range l.values {
		clear(v)
	}
}

// leaseHash is what may be said of a lease ID: a prefix of its SHA-256, hex.
func leaseHash(id string) string {
	if id == "" {
		return ""
	}
	h := sha256.Sum256([]byte(id))
	return hex.EncodeToString(h[:8])
}

var _ broker.LeaseSource = (*Source)(nil)

// Lease implements broker.LeaseSource. As Fetch does, a refusal in pod mode may be a cached token
// revoked behind the broker's back (or a Vault restart): that token is forgotten (revoked only if no
// lease hangs off it) and the request tried once more with a fresh login.
func (s *Source) Lease(ctx context.Context, id broker.Identity, jwt broker.Token, req broker.LeaseRequest) ([]broker.Secret, []broker.Lease, error) {
	if req.Volume == "" {
		return nil, nil, fmt.Errorf("dynamic credentials need a volume: %w", fault.ErrInvalid)
	}
	used := map[string]bool{}
	out, records, err := s.leaseAll(ctx, id, jwt, req, used)
	if err != nil && errors.Is(err, fault.ErrDenied) && s.o.Mode == ModePod {
		if old := s.forget(id, req.Refs, used); len(old) > 0 {
			s.revokeUnleased(ctx, old)
			var more []broker.Lease
			out, more, err = s.leaseAll(ctx, id, jwt, req, used)
			records = append(records, more...)
		}
	}
	return out, records, err
}

// step is what a request does with one credential of the volume, decided before anything is issued.
type step struct {
	r   broker.Resolved
	k   leaseKey
	tok string
	cur *lease
	// action: reused, renewed (tried: a refusal reissues), issued or reissued.
	action broker.LeaseAction
	// charged: the issue is the pod's doing (a first issue, or a reissue in the renewal window),
	// counted against its budget; reissues the driver causes (a restart, a replaced token, a
	// refused renewal) are not.
	charged bool
	// adopted is the lease the volume had before a driver restart, found by its hash: retired (not
	// revoked) once its replacement is in place.
	adopted *lease
}

// leaseAll is Lease, once; it records the Vault tokens it used. It decides every credential's step
// first, takes the issues the pod causes from its budget all at once (none if over budget), then
// issues.
func (s *Source) leaseAll(ctx context.Context, id broker.Identity, jwt broker.Token, req broker.LeaseRequest, used map[string]bool) ([]broker.Secret, []broker.Lease, error) {
	var steps []*step
	byKey := map[leaseKey]*step{}
	for _, r := range req.Refs {
		k := leaseKeyOf(r)
		if byKey[k] == nil {
			byKey[k] = &step{r: r, k: k}
			steps = append(steps, byKey[k])
		}
	}
	charged := 0
	for _, st := range steps {
		if err := s.plan(ctx, id, jwt, req, st, used); err != nil {
			return nil, nil, err
		}
		if st.charged {
			charged++
		}
	}
	if charged > 0 && s.o.Budget != nil {
		if err := s.o.Budget(id, charged, s.o.Now()); err != nil {
			return nil, nil, fmt.Errorf("%d new credentials for volume %s: %w", charged, req.Volume, err)
		}
	}
	var records []broker.Lease
	done := map[leaseKey]*lease{}
	for _, st := range steps {
		l, rec, err := s.act(ctx, id, req.Volume, st)
		if err != nil {
			return nil, records, err
		}
		done[st.k], records = l, append(records, rec)
	}
	out := make([]broker.Secret, len(req.Refs))
	for i, r := range req.Refs {
		l := done[leaseKeyOf(r)]
		v, ok := l.values[r.Key]
		if !ok {
			for j := range out {
				clear(out[j].Value)
			}
			return nil, records, fmt.Errorf("%s: Vault's answer has no %s: %w", r.SecretRef, r.Key, fault.ErrUnavailable)
		}
		out[i] = broker.Secret{Ref: r.SecretRef, Value: append([]byte(nil), v...), Environment: r.Environment, Lease: l.hash}
	}
	return out, records, nil
}

// plan decides a credential's step: the token it is issued with (a fresh login if the cached one
// will die at its max TTL: Vault would revoke its leases with it) and what to do with the volume's
// lease of it.
func (s *Source) plan(ctx context.Context, id broker.Identity, jwt broker.Token, req broker.LeaseRequest, st *step, used map[string]bool) error {
	tok, err := s.token(ctx, id, jwt, st.r)
	if err != nil {
		return err
	}
	if s.doomed(id, st.r, tok) {
		if tok, err = s.freshToken(ctx, id, jwt, st.r, tok); err != nil {
			return err
		}
	}
	used[tok] = true
	st.tok = tok
	s.lmu.Lock()
	if vl := s.volumes[req.Volume]; vl != nil {
		if vl.owner != id.PodUID { // kubelet derives a volume's ID from its pod: never another pod's
			s.lmu.Unlock()
			return fmt.Errorf("volume %s holds another pod's credentials: %w", req.Volume, fault.ErrInvalid)
		}
		st.cur = vl.cur[st.k]
	}
	s.lmu.Unlock()
	now, cur := s.o.Now(), st.cur
	switch {
	case cur == nil && req.Adopt[st.k.name()] != "":
		st.action, st.adopted = broker.LeaseReissued, s.adopt(ctx, tok, st.k, req.Adopt[st.k.name()])
	case cur == nil:
		st.action, st.charged = broker.LeaseIssued, true
	case cur.token != tok:
		// Issued with a Vault token no longer in use (a fresh login replaced it): Vault revokes the
		// lease with that token, so it is not to be relied on.
		st.action = broker.LeaseReissued
	case now.Before(cur.expires().Add(-s.window(cur))):
		st.action = broker.LeaseReused
	case st.k.kind == broker.KindDatabase && cur.renewable && cur.id != "":
		st.action = broker.LeaseRenewed
	default:
		st.action, st.charged = broker.LeaseReissued, true
	}
	return nil
}

// window is the lease's renewal window: the part of its TTL, at its end, in which it is renewed or
// reissued.
func (s *Source) window(l *lease) time.Duration {
	return time.Duration(float64(l.ttl) * s.o.RenewWindow)
}

// act carries out a step.
func (s *Source) act(ctx context.Context, id broker.Identity, volume string, st *step) (*lease, broker.Lease, error) {
	switch st.action {
	case broker.LeaseReused:
		return st.cur, record(st.cur, broker.LeaseReused), nil
	case broker.LeaseRenewed:
		if rl, ok := s.renewLease(ctx, volume, st.cur, s.window(st.cur), s.o.Now()); ok {
			return rl, record(rl, broker.LeaseRenewed), nil
		}
		st.action = broker.LeaseReissued
	}
	l, err := s.issue(ctx, st.tok, st.r, st.k)
	if err != nil {
		return nil, broker.Lease{}, err
	}
	if err := s.keep(volume, id.PodUID, l, st.adopted); err != nil {
		s.revokeLeases(context.WithoutCancel(ctx), []*lease{l})
		return nil, broker.Lease{}, err
	}
	return l, record(l, st.action), nil
}

func record(l *lease, a broker.LeaseAction) broker.Lease {
	return broker.Lease{Name: l.key.name(), Hash: l.hash, TTL: l.ttl, Expires: l.expires(), Serial: l.serial, Action: a}
}

// keep makes l the volume's credential for its key, retiring the one it replaces (and adopted, the
// one found after a restart, if any).
func (s *Source) keep(volume, owner string, l, adopted *lease) error {
	s.lmu.Lock()
	defer s.lmu.Unlock()
	if s.leaseCount >= s.o.MaxLeases {
		return fmt.Errorf("%d leases held, the bound: %w", s.o.MaxLeases, fault.ErrUnavailable)
	}
	vl := s.volumes[volume]
	if vl == nil {
		vl = &volumeLeases{owner: owner, cur: map[leaseKey]*lease{}}
		s.volumes[volume] = vl
	}
	now := s.o.Now()
	kept := vl.retired[:0]
	for _, r := range vl.retired { // retired leases that ended are gone at Vault too
		if now.Before(r.expires()) {
			kept = append(kept, r)
		} else {
			s.leaseCount--
		}
	}
	vl.retired = kept
	if old := vl.cur[l.key]; old != nil {
		old.clearValues()
		vl.retired = append(vl.retired, old)
	}
	if adopted != nil {
		vl.retired = append(vl.retired, adopted)
		s.leaseCount++
	}
	vl.cur[l.key] = l
	s.leaseCount++
	return nil
}

// VolumeLeases lists each volume's credentials in use (retired ones left out), as audit records name
// them: never a lease ID. For the Admin API.
func (s *Source) VolumeLeases() map[string][]broker.Lease {
	s.lmu.Lock()
	defer s.lmu.Unlock()
	out := make(map[string][]broker.Lease, len(s.volumes))
	for id, vl := range s.volumes {
		for _, l := range vl.cur {
			out[id] = append(out[id], record(l, ""))
		}
	}
	return out
}

// Leases is how many leases the source holds (in use and retired): for tests and metrics.
func (s *Source) Leases() int {
	s.lmu.Lock()
	defer s.lmu.Unlock()
	return s.leaseCount
}

// ReleaseVolume implements broker.LeaseSource.
func (s *Source) ReleaseVolume(volume string) func(context.Context) error {
	s.lmu.Lock()
	vl := s.volumes[volume]
	delete(s.volumes, volume)
	var ls []*lease
	if vl != nil {
		for _, l := range vl.cur {
			l.clearValues()
			ls = append(ls, l)
		}
		ls = append(ls, vl.retired...)
		s.leaseCount -= len(ls)
	}
	s.lmu.Unlock()
	if len(ls) == 0 {
		return nil
	}
	return func(ctx context.Context) error { return s.revokeLeases(ctx, ls) }
}

// revokeLeases revokes leases at Vault, each with the token it was issued with. A lease whose token
// Vault no longer accepts went with that token.
func (s *Source) revokeLeases(ctx context.Context, ls []*lease) error {
	var first error
	now := s.o.Now()
	for _, l := range ls {
		if l.id == "" || !now.Before(l.expires()) {
			continue
		}
		start := time.Now()
		// Each its own time, and not the caller's cancellation: a revocation is clean-up that must
		// run even when the request that needed it was cancelled.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		_, err := s.client(l.token).Logical().WriteWithContext(rctx, "sys/leases/revoke/"+l.id, nil)
		cancel()
		if err != nil {
			err = mapErr("revoke "+l.key.name()+" lease sha256:"+l.hash, err)
		}
		s.observe("revoke-lease", start, err)
		switch {
		case err == nil:
			s.o.Log.Debug("revoked a lease", zap.Stringer("lease", l))
		case errors.Is(err, fault.ErrDenied):
			s.o.Log.Info("Vault refused a lease's revocation (its token is gone, and the lease with it, or the policy lacks sys/leases/revoke); it ends at its TTL",
				zap.Stringer("lease", l), zap.Time("expires", l.expires()), zap.Error(err))
		case first == nil:
			first = err
		}
	}
	return first
}

// renewLease renews a lease inside its renewal window. It fails (false) when Vault refuses or the
// renewal would not carry the lease out of the window (its max TTL is near): the caller reissues.
func (s *Source) renewLease(ctx context.Context, volume string, l *lease, window time.Duration, now time.Time) (*lease, bool) {
	start := time.Now()
	// The lease ID in the path, so the Vault policy can scope renewals to the namespace's roles.
	sec, err := s.client(l.token).Logical().WriteWithContext(ctx, "sys/leases/renew/"+l.id, map[string]any{"increment": int64(l.ttl / time.Second)})
	if err != nil {
		err = mapErr("renew "+l.key.name()+" lease sha256:"+l.hash, err)
	}
	s.observe("renew-lease", start, err)
	if err != nil {
		s.o.Log.Info("renewing a lease failed; reissuing", zap.Stringer("lease", l), zap.Error(err))
		return nil, false
	}
	if sec == nil || time.Duration(sec.LeaseDuration)*time.Second <= window {
		return nil, false
	}
	s.lmu.Lock()
	defer s.lmu.Unlock()
	nl := *l // a copy: a revocation running for a released volume may read l
	nl.issued, nl.ttl, nl.renewable = now, time.Duration(sec.LeaseDuration)*time.Second, sec.Renewable
	if vl := s.volumes[volume]; vl != nil && vl.cur[l.key] == l {
		vl.cur[l.key] = &nl
	}
	return &nl, true
}

// issue asks Vault for a new credential.
func (s *Source) issue(ctx context.Context, token string, r broker.Resolved, k leaseKey) (*lease, error) {
	start := time.Now()
	l, err := s.issueOnce(ctx, token, r, k)
	s.observe("issue", start, err)
	return l, err
}

func (s *Source) issueOnce(ctx context.Context, token string, r broker.Resolved, k leaseKey) (*lease, error) {
	c := s.client(token).Logical()
	switch k.kind {
	case broker.KindDatabase:
		sec, err := c.ReadWithContext(ctx, k.mount+"/creds/"+k.role)
		if err != nil {
			return nil, mapErr("database credentials of role "+k.role, err)
		}
		l, err := s.newLease(sec, token, k)
		if err != nil {
			return nil, err
		}
		for _, f := range []string{"username", "password"} {
			v, ok := sec.Data[f].(string)
			if !ok || v == "" {
				return nil, s.abandon(ctx, l, fmt.Errorf("database credentials of role %s: no %s in Vault's answer: %w", k.role, f, fault.ErrUnavailable))
			}
			l.values[f] = []byte(v)
		}
		return l, nil
	case broker.KindPKI:
		body := map[string]any{"common_name": k.pki.CommonName, "format": "pem"}
		if k.pki.AltNames != "" {
			dns, ips := splitNames(k.pki.AltNames)
			body["alt_names"], body["ip_sans"] = strings.Join(dns, ","), strings.Join(ips, ",")
		}
		if k.pki.TTL > 0 {
			body["ttl"] = fmt.Sprintf("%ds", int64(k.pki.TTL/time.Second))
		}
		path, keyPEM := k.mount+"/issue/"+k.role, []byte(nil)
		if k.pki.LocalKey {
			csr, key, err := localKey(k.pki)
			if err != nil {
				return nil, err
			}
			body["csr"], path, keyPEM = string(csr), k.mount+"/sign/"+k.role, key
		} else {
			body["private_key_format"] = "pkcs8"
		}
		sec, err := c.WriteWithContext(ctx, path, body)
		if err != nil {
			clear(keyPEM)
			return nil, mapErr("certificate of role "+k.role, err)
		}
		l, err := s.newLease(sec, token, k)
		if err != nil {
			clear(keyPEM)
			return nil, err
		}
		cert, _ := sec.Data["certificate"].(string)
		if !k.pki.LocalKey {
			pk, _ := sec.Data["private_key"].(string)
			keyPEM = []byte(pk)
		}
		if cert == "" || len(keyPEM) == 0 {
			return nil, s.abandon(ctx, l, fmt.Errorf("certificate of role %s: no certificate or key in Vault's answer: %w", k.role, fault.ErrUnavailable))
		}
		l.values["cert"], l.values["key"], l.values["chain"] = []byte(cert+"\n"), keyPEM, chainOf(sec.Data)
		l.serial, _ = sec.Data["serial_number"].(string)
		if l.id == "" { // a role without generate_lease: the certificate's own lifetime
			if b, _ := pem.Decode([]byte(cert)); b != nil {
				if c, err := x509.ParseCertificate(b.Bytes); err == nil {
					l.ttl = c.NotAfter.Sub(l.issued)
				}
			}
		}
		return l, nil
	}
	return nil, fmt.Errorf("source %q: %w", k.kind, fault.ErrInvalid)
}

// newLease starts a lease from Vault's answer.
func (s *Source) newLease(sec *vaultapi.Secret, token string, k leaseKey) (*lease, error) {
	if sec == nil || sec.Data == nil {
		return nil, fmt.Errorf("%s: empty answer from Vault: %w", k.name(), fault.ErrUnavailable)
	}
	l := &lease{key: k, id: sec.LeaseID, hash: leaseHash(sec.LeaseID), token: token, issued: s.o.Now(),
		ttl: time.Duration(sec.LeaseDuration) * time.Second, renewable: sec.Renewable, values: map[string][]byte{}}
	if l.ttl <= 0 {
		l.ttl = time.Minute
	}
	return l, nil
}

// abandon revokes a lease whose answer could not be used, and returns err.
func (s *Source) abandon(ctx context.Context, l *lease, err error) error {
	if rerr := s.revokeLeases(context.WithoutCancel(ctx), []*lease{l}); rerr != nil {
		s.o.Log.Warn("revoking an unusable lease failed; it ends at its TTL", zap.Stringer("lease", l), zap.Error(rerr))
	}
	return err
}

// chainOf is the issuing chain in Vault's answer, PEM.
func chainOf(data map[string]any) []byte {
	var b strings.Builder
	if chain, ok := data["ca_chain"].([]any); ok && len(chain) > 0 {
		for _, c := range chain {
			if s, ok := c.(string); ok {
				b.WriteString(strings.TrimSpace(s))
				b.WriteByte('\n')
			}
		}
	} else if ca, ok := data["issuing_ca"].(string); ok {
		b.WriteString(strings.TrimSpace(ca))
		b.WriteByte('\n')
	}
	return []byte(b.String())
}

// splitNames splits alt names into DNS names and IP addresses.
func splitNames(names string) (dns, ips []string) {
	for _, n := range strings.Split(names, ",") {
		if net.ParseIP(n) != nil {
			ips = append(ips, n)
		} else {
			dns = append(dns, n)
		}
	}
	return dns, ips
}

// localKey generates a P-256 key in memory and a CSR for the request: the key never leaves the node.
func localKey(p broker.PKIRequest) (csrPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generating a key: %v: %w", err, fault.ErrUnavailable)
	}
	tmpl := &x509.CertificateRequest{Subject: pkix.Name{CommonName: p.CommonName}}
	if p.AltNames != "" {
		dns, ips := splitNames(p.AltNames)
		tmpl.DNSNames = dns
		for _, ip := range ips {
			tmpl.IPAddresses = append(tmpl.IPAddresses, net.ParseIP(ip))
		}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		return nil, nil, fmt.Errorf("making the CSR: %v: %w", err, fault.ErrInvalid)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("encoding the key: %v: %w", err, fault.ErrUnavailable)
	}
	keyPEM = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})
	clear(kder)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), keyPEM, nil
}

// adopt finds, after a driver restart, the lease whose hash the volume's metadata names, among the
// lease IDs under the role, and returns it (nil if not found) with its end as Vault tells it. The
// caller retires it once its replacement is in place (see the top of this file for why it is not
// reused): the app keeps working with it until it has the new one, it is revoked with the volume,
// and it dies with its old token at the latest.
func (s *Source) adopt(ctx context.Context, token string, k leaseKey, hash string) *lease {
	prefix := k.mount + "/creds/" + k.role + "/"
	switch {
	case k.kind == broker.KindPKI && k.pki.LocalKey:
		prefix = k.mount + "/sign/" + k.role + "/"
	case k.kind == broker.KindPKI:
		prefix = k.mount + "/issue/" + k.role + "/"
	}
	start := time.Now()
	sec, err := s.client(token).Logical().ListWithContext(ctx, "sys/leases/lookup/"+prefix)
	if err != nil {
		err = mapErr("list the leases of "+k.name(), err)
	}
	s.observe("list-leases", start, err)
	if err != nil {
		s.o.Log.Info("finding a volume's lease after a restart failed; it lapses at its TTL or with its token", zap.String("lease", k.name()+", sha256:"+hash), zap.Error(err))
		return nil
	}
	var keys []any
	if sec != nil && sec.Data != nil {
		keys, _ = sec.Data["keys"].([]any)
	}
	for _, key := range keys {
		suffix, _ := key.(string)
		id := prefix + suffix
		if leaseHash(id) != hash {
			continue
		}
		found := &lease{key: k, id: id, hash: hash, token: token, issued: s.o.Now(), ttl: time.Hour, values: map[string][]byte{}}
		if look, err := s.client(token).Logical().WriteWithContext(ctx, "sys/leases/lookup", map[string]any{"lease_id": id}); err == nil && look != nil {
			if num, ok := look.Data["ttl"].(json.Number); ok {
				if n, err := num.Int64(); err == nil && n > 0 {
					found.ttl = time.Duration(n) * time.Second
				}
			}
		}
		s.o.Log.Info("found a volume's lease after a restart: replacing it, then retiring it", zap.Stringer("lease", found), zap.Duration("ttl", found.ttl))
		return found
	}
	s.o.Log.Info("a volume's lease was not found after a restart (it ended, or its token was revoked); issuing", zap.String("lease", k.name()+", sha256:"+hash))
	return nil
}
