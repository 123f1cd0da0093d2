package csi

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/csi/render"
	"github.com/keyward/keyward/csi/tmpfs"
	"github.com/keyward/keyward/internal/fault"
)

// Volume attributes kubelet passes (podInfoOnMount, tokenRequests) and the ones users write.
const (
	AttrSecrets      = "secrets"
	AttrSizeLimit    = "sizeLimit"
	AttrTokens       = "csi.storage.k8s.io/serviceAccount.tokens"
	AttrPodName      = "csi.storage.k8s.io/pod.name"
	AttrPodNamespace = "csi.storage.k8s.io/pod.namespace"
	AttrPodUID       = "csi.storage.k8s.io/pod.uid"
	AttrSAName       = "csi.storage.k8s.io/serviceAccount.name"
	AttrEphemeral    = "csi.storage.k8s.io/ephemeral"
)

// Size limits of the tmpfs behind a volume.
const (
	DefaultSizeLimit = 1 << 20
	MaxSizeLimit     = 16 << 20
	MaxEntries       = broker.MaxRefs
	// MaxAttributeBytes bounds each volume attribute (the secrets list, the tokens).
	MaxAttributeBytes = 64 << 10
)

// Entry is one file of a volume, as the user writes it in the "secrets" attribute: one key of one
// ref (Ref, Key, Version), or a Template rendered from keys of the refs Refs names.
type Entry struct {
	Ref     string `json:"ref,omitempty"`
	Key     string `json:"key,omitempty"`
	File    string `json:"file"`
	Mode    string `json:"mode,omitempty"`
	Version int    `json:"version,omitempty"`
	// Template renders the file (csi/render): {{ .NAME.KEY }} is KEY of the ref Refs names NAME.
	Template string `json:"template,omitempty"`
	// Refs names the refs a template reads: NAME -> "ref" or "ref@version".
	Refs map[string]string `json:"refs,omitempty"`
	// Format converts the content, the key's or the template's: "pkcs12" (from PEM) or "pem" (from
	// PKCS#12 or DER).
	Format string `json:"format,omitempty"`
	// Password is a template over Refs rendering the PKCS#12 password (written for pkcs12, read for
	// pem); template entries only; absent, the password is empty.
	Password *string `json:"password,omitempty"`
	// PKI names a certificate the environment's PKI mount issues for the volume, Database credentials
	// its database mount creates: Key then says which part the file holds (cert, key, chain;
	// username, password). The entries of a volume naming the same one share one credential.
	PKI      *PKIEntry      `json:"pki,omitempty"`
	Database *DatabaseEntry `json:"database,omitempty"`
}

// PKIEntry is the certificate a pki entry asks for.
type PKIEntry struct {
	Role       string   `json:"role"`
	CommonName string   `json:"commonName"`
	AltNames   []string `json:"altNames,omitempty"`
	// TTL is a Go duration ("24h"); empty: the role's default.
	TTL string `json:"ttl,omitempty"`
	// Generate says where the private key is made: "vault" (the default: Vault's issue endpoint
	// returns it) or "local" (in the driver's memory; only a CSR goes to Vault's sign endpoint).
	Generate string `json:"generate,omitempty"`
}

// DatabaseEntry is the credential a database entry asks for.
type DatabaseEntry struct {
	Role string `json:"role"`
}

// MaxPasswordBytes bounds a rendered PKCS#12 password (and MaxPasswordTemplateBytes its template).
const (
	MaxPasswordBytes         = 1 << 10
	MaxPasswordTemplateBytes = 1 << 10
)

// FileSpec is one file of a volume, parsed and validated: which secrets go into which file, how,
// with which mode.
type FileSpec struct {
	// Ref is the value a plain entry delivers (or converts).
	Ref  broker.SecretRef
	Name string
	// Mode is the file's mode; Default says the user gave none (then the pod's fsGroup may read it).
	Mode    os.FileMode
	Default bool
	// Template, when set, renders the file from Inputs (and Password the PKCS#12 password).
	Template *render.Template
	Password *render.Template
	Inputs   []Input
	// Format converts the content before delivery.
	Format render.Format
	// reads are the indexes, in the volume's refs (Volume.Refs), of the values the file reads: Ref's,
	// or each of Inputs'.
	reads []int
}

// Input is a value a template reads, and the ref and key it is read from.
type Input struct {
	render.Input
	Ref broker.SecretRef
}

// Volume is a parsed, validated publish request.
type Volume struct {
	Files     []FileSpec
	Claimed   broker.Identity
	Token     broker.Token
	SizeLimit int64
	// refs are the distinct values the files read, in the order of first use.
	refs []broker.SecretRef
}

// ParseVolume validates volume attributes and publish secrets strictly. Errors wrap fault.ErrInvalid
// (or ErrUnauthenticated for a missing token) and name the entry at fault; they never hold the token.
//
// kubelet passes the pod's service-account tokens (AttrTokens) in the volume attributes, or, when the
// CSIDriver sets serviceAccountTokenInSecrets (as deploy/ does; GA in Kubernetes 1.36), in the publish
// secrets, which CSI tooling never logs. The broker takes them from either, but from exactly one: the
// other place is the pod's own (its volumeAttributes; its nodePublishSecretRef's Secret), so a token
// in both is a pod trying to supply its own and is refused. Publish secrets carry nothing else: a
// nodePublishSecretRef adding other keys is refused too.
func ParseVolume(attrs, secrets map[string]string, audience string) (Volume, error) {
	v := Volume{SizeLimit: DefaultSizeLimit}
	for k, val := range attrs {
		switch k {
		case AttrSecrets, AttrSizeLimit, AttrTokens, AttrPodName, AttrPodNamespace, AttrPodUID, AttrSAName, AttrEphemeral:
		default:
			return Volume{}, fmt.Errorf("unknown volume attribute %.64q: %w", k, fault.ErrInvalid)
		}
		if len(val) > MaxAttributeBytes {
			return Volume{}, fmt.Errorf("volume attribute %q is %d bytes (max %d): %w", k, len(val), MaxAttributeBytes, fault.ErrInvalid)
		}
	}
	if s, ok := attrs[AttrSizeLimit]; ok {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n < 4096 || n > MaxSizeLimit {
			return Volume{}, fmt.Errorf("sizeLimit %q: want bytes between 4096 and %d: %w", s, MaxSizeLimit, fault.ErrInvalid)
		}
		v.SizeLimit = n
	}
	raw, ok := attrs[AttrSecrets]
	if !ok || strings.TrimSpace(raw) == "" {
		return Volume{}, fmt.Errorf("volume attribute %q is required: %w", AttrSecrets, fault.ErrInvalid)
	}
	ps, err := parseSecrets(raw)
	if err != nil {
		return Volume{}, err
	}
	v.Files, v.refs = ps.files, ps.refs
	v.Claimed = broker.Identity{Namespace: attrs[AttrPodNamespace], PodName: attrs[AttrPodName], PodUID: attrs[AttrPodUID], ServiceAccount: attrs[AttrSAName]}
	if v.Claimed.Namespace == "" || v.Claimed.PodName == "" || v.Claimed.PodUID == "" {
		return Volume{}, fmt.Errorf("pod information missing (the CSIDriver needs podInfoOnMount: true): %w", fault.ErrInvalid)
	}
	for k := range secrets {
		if k != AttrTokens {
			return Volume{}, fmt.Errorf("publish secret %.64q: the driver takes no credentials from the pod (remove nodePublishSecretRef): %w", k, fault.ErrInvalid)
		}
	}
	tokens, ok := attrs[AttrTokens]
	if fromSecrets, inSecrets := secrets[AttrTokens]; inSecrets {
		if ok {
			return Volume{}, fmt.Errorf("%s is both a volume attribute and a publish secret: kubelet sets only one, the other is the pod's own: %w", AttrTokens, fault.ErrInvalid)
		}
		tokens, ok = fromSecrets, true
	}
	if !ok || tokens == "" {
		return Volume{}, fmt.Errorf("no service-account token (the CSIDriver needs tokenRequests with audience %q): %w", audience, fault.ErrUnauthenticated)
	}
	var byAudience map[string]struct {
		Token string `json:"token"`
	}
	if err := json.Unmarshal([]byte(tokens), &byAudience); err != nil {
		return Volume{}, fmt.Errorf("attribute %s is not the JSON kubelet writes: %w", AttrTokens, fault.ErrInvalid)
	}
	t, ok := byAudience[audience]
	if !ok || t.Token == "" {
		return Volume{}, fmt.Errorf("no token for audience %q (the CSIDriver's tokenRequests must name it): %w", audience, fault.ErrUnauthenticated)
	}
	v.Token = broker.Token(t.Token)
	return v, nil
}

// parsedSecrets memoizes parseSecrets: kubelet republishes every volume with the same "secrets"
// attribute, and the pods of one workload share it, so each distinct list is parsed and validated once
// (templates included). Keyed by the text's SHA-256, so padded attributes cost no memory here.
// Bounded: cleared when full.
var parsedSecrets = struct {
	sync.Mutex
	m map[[32]byte]parsed
}{m: map[[32]byte]parsed{}}

const maxParsedSecrets = 256

// parsed is a parsed "secrets" attribute: the files and the distinct values they read.
type parsed struct {
	files []FileSpec
	refs  []broker.SecretRef
}

// parseSecrets parses and validates the "secrets" attribute. What it returns is shared: callers
// must not modify it.
func parseSecrets(raw string) (parsed, error) {
	key := sha256.Sum256([]byte(raw))
	parsedSecrets.Lock()
	p, ok := parsedSecrets.m[key]
	parsedSecrets.Unlock()
	if ok {
		return p, nil
	}
	p, err := parseSecretsUncached(raw)
	if err != nil {
		return parsed{}, err
	}
	parsedSecrets.Lock()
	if len(parsedSecrets.m) >= maxParsedSecrets {
		clear(parsedSecrets.m)
	}
	parsedSecrets.m[key] = p
	parsedSecrets.Unlock()
	return p, nil
}

func parseSecretsUncached(raw string) (parsed, error) {
	var entries []Entry
	if err := yaml.UnmarshalStrict([]byte(raw), &entries); err != nil {
		return parsed{}, fmt.Errorf("volume attribute %q: %v: %w", AttrSecrets, err, fault.ErrInvalid)
	}
	if len(entries) == 0 || len(entries) > MaxEntries {
		return parsed{}, fmt.Errorf("%d secrets (want 1..%d): %w", len(entries), MaxEntries, fault.ErrInvalid)
	}
	names := map[string]bool{}
	p := parsed{files: make([]FileSpec, 0, len(entries))}
	index := map[broker.SecretRef]int{}
	credentials := map[string]broker.PKIRequest{} // lease name -> the certificate asked for
	read := func(r broker.SecretRef) int {
		i, ok := index[r]
		if !ok {
			i = len(p.refs)
			index[r] = i
			p.refs = append(p.refs, r)
		}
		return i
	}
	for i, e := range entries {
		f, err := e.spec()
		if err == nil && names[e.File] {
			err = errors.New("file name used twice")
		}
		switch {
		case errors.Is(err, fault.ErrInvalid):
			return parsed{}, fmt.Errorf("secrets[%d] (file %q): %w", i, e.File, err)
		case err != nil:
			return parsed{}, fmt.Errorf("secrets[%d] (file %q): %v: %w", i, e.File, err, fault.ErrInvalid)
		}
		names[e.File] = true
		if f.Template == nil {
			f.reads = []int{read(f.Ref)}
		}
		for _, in := range f.Inputs {
			f.reads = append(f.reads, read(in.Ref))
		}
		if len(p.refs) > broker.MaxRefs {
			return parsed{}, fmt.Errorf("secrets[%d] (file %q): with this entry the volume reads %d keys (max %d): %w", i, e.File, len(p.refs), broker.MaxRefs, fault.ErrInvalid)
		}
		if f.Ref.Dynamic() {
			name := broker.LeaseName(f.Ref)
			if other, ok := credentials[name]; ok && other != f.Ref.PKI {
				return parsed{}, fmt.Errorf("secrets[%d] (file %q): a second certificate %s that differs in altNames, ttl or generate: one volume has one certificate per role and common name: %w", i, e.File, name, fault.ErrInvalid)
			}
			credentials[name] = f.Ref.PKI
		}
		p.files = append(p.files, f)
	}
	return p, nil
}

// spec validates one entry (refs with the domain's own rules, a template with csi/render's) and
// turns it into a FileSpec.
func (e Entry) spec() (FileSpec, error) {
	if !tmpfs.ValidName(e.File) {
		return FileSpec{}, errors.New("file name must be non-empty, without '/', and not start with '..'")
	}
	f := FileSpec{Name: e.File, Mode: 0o400, Default: e.Mode == ""}
	if e.Mode != "" {
		m, err := strconv.ParseUint(e.Mode, 8, 32)
		if err != nil || m&^0o444 != 0 {
			return FileSpec{}, fmt.Errorf("mode %q: files are read-only, want read bits only: \"0400\", \"0440\" or \"0444\"", e.Mode)
		}
		f.Mode = os.FileMode(m)
	}
	format, err := render.ParseFormat(e.Format)
	if err != nil {
		return FileSpec{}, err
	}
	f.Format = format
	if e.PKI != nil || e.Database != nil {
		return f, e.dynamic(&f)
	}
	if e.Template == "" {
		switch {
		case e.Refs != nil:
			return FileSpec{}, errors.New("refs is for a template: a plain entry names one ref and key")
		case e.Password != nil:
			return FileSpec{}, errors.New("password is a template over refs: write the entry as a template")
		}
		ref := broker.SecretRef{Ref: e.Ref, Key: e.Key, Version: e.Version}
		if err := ref.Validate(); err != nil {
			return FileSpec{}, fmt.Errorf("ref %q, key %q, version %d is not valid", e.Ref, e.Key, e.Version)
		}
		f.Ref = ref
		return f, nil
	}
	return f, e.template(&f)
}

// dynamic validates an entry naming a dynamic credential (pki or database).
func (e Entry) dynamic(f *FileSpec) error {
	switch {
	case e.PKI != nil && e.Database != nil:
		return errors.New("an entry names pki or database, not both")
	case e.Ref != "" || e.Version != 0 || e.Template != "" || e.Refs != nil || e.Password != nil:
		return errors.New("a pki or database entry names its credential and the part in key: ref, version, template, refs and password are for stored secrets")
	case e.Format != "":
		return errors.New("format is for stored secrets: a pki entry's files are PEM")
	}
	ref := broker.SecretRef{Key: e.Key}
	if e.Database != nil {
		ref.Kind, ref.Ref = broker.KindDatabase, e.Database.Role
	} else {
		p := e.PKI
		ref.Kind, ref.Ref = broker.KindPKI, p.Role
		ref.PKI = broker.PKIRequest{CommonName: p.CommonName, AltNames: strings.Join(p.AltNames, ",")}
		if len(p.AltNames) > broker.MaxAltNames {
			return fmt.Errorf("pki: %d altNames (max %d)", len(p.AltNames), broker.MaxAltNames)
		}
		if p.TTL != "" {
			d, err := time.ParseDuration(p.TTL)
			if err != nil {
				return fmt.Errorf("pki: ttl %.40q: want a duration like \"24h\"", p.TTL)
			}
			ref.PKI.TTL = d
		}
		switch p.Generate {
		case "", "vault":
		case "local":
			ref.PKI.LocalKey = true
		default:
			return fmt.Errorf("pki: generate %.40q: want vault or local", p.Generate)
		}
	}
	if err := ref.Validate(); err != nil {
		return err
	}
	f.Ref = ref
	return nil
}

// template validates a template entry: its refs, its template and password (csi/render), and that
// each ref it names is read.
func (e Entry) template(f *FileSpec) error {
	switch {
	case e.Ref != "" || e.Key != "" || e.Version != 0:
		return errors.New("a template reads the refs it names in refs: ref, key and version are for plain entries")
	case len(e.Refs) == 0:
		return errors.New("a template needs refs: NAME: ref, for {{ .NAME.KEY }}")
	case e.Password != nil && e.Format == "":
		return errors.New("password is for format pkcs12 or pem")
	}
	names := map[string]bool{}
	refs := map[string]broker.SecretRef{}
	for name, r := range e.Refs {
		if !render.ValidName(name) {
			return fmt.Errorf("refs: name %.64q: want an identifier ([A-Za-z_][A-Za-z0-9_]*, at most 64 bytes)", name)
		}
		ref, version, err := refAtVersion(r)
		if err != nil {
			return fmt.Errorf("refs.%s: %q: want ref or ref@version: %w", name, fault.Truncate(r, 300), err)
		}
		names[name], refs[name] = true, broker.SecretRef{Ref: ref, Version: version}
	}
	t, err := render.Parse(e.Template, names)
	if err != nil {
		return fmt.Errorf("template: %w", err)
	}
	f.Template = t
	inputs := t.Inputs()
	if e.Password != nil {
		if len(*e.Password) > MaxPasswordTemplateBytes {
			return fmt.Errorf("password: the template is %d bytes (max %d): %w", len(*e.Password), MaxPasswordTemplateBytes, fault.ErrInvalid)
		}
		pt, err := render.Parse(*e.Password, names)
		if err != nil {
			return fmt.Errorf("password: %w", err)
		}
		f.Password = pt
		inputs = append(inputs, pt.Inputs()...)
	}
	seen := map[render.Input]bool{}
	for _, in := range inputs {
		if seen[in] {
			continue
		}
		seen[in] = true
		ref := refs[in.Name]
		ref.Key = in.Key
		if err := broker.ValidateKey(in.Key); err != nil {
			return fmt.Errorf("%s: key %.140q is not a valid key: %w", in, in.Key, fault.ErrInvalid)
		}
		f.Inputs = append(f.Inputs, Input{Input: in, Ref: ref})
		delete(names, in.Name)
	}
	if len(names) > 0 {
		unread := slices.Sorted(maps.Keys(names))
		return fmt.Errorf("refs.%s: the template reads none of its keys: %w", unread[0], fault.ErrInvalid)
	}
	return nil
}

// refAtVersion splits "ref@version" (the version a KV v2 version, > 0) and validates the ref.
func refAtVersion(s string) (string, int, error) {
	ref, v, pinned := strings.Cut(s, "@")
	version := 0
	if pinned {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			return "", 0, fmt.Errorf("version %.20q is not a positive number: %w", v, fault.ErrInvalid)
		}
		version = n
	}
	if err := broker.ValidateRef(ref); err != nil {
		return "", 0, err
	}
	return ref, version, nil
}

// payload is what a publish delivers: the files, and what stands for each file's content in the
// change digest.
type payload struct {
	files []tmpfs.File
	// ident[i], when set, stands for files[i].Data in the digest (Server.digest): a digest of the
	// inputs of a randomized conversion (pkcs12), so that the same inputs are no change.
	ident [][]byte
	// owned are the buffers rendering allocated (plain files' Data are the secrets' own values).
	owned [][]byte
}

// clear zeroes what rendering allocated.
func (p *payload) clear() {
	for _, b := range p.owned {
		clear(b)
	}
	for _, b := range p.ident {
		clear(b)
	}
}

// render turns the secrets fetched for the volume's refs (one per ref, in order) into its files:
// plain values as they are, templates rendered, formats converted, all within the volume's size.
// The pod's fsGroup (gid >= 0) also reads the files whose mode the user did not set. Errors name the
// entry and never hold a value.
func (v Volume) render(secrets []broker.Secret, gid int) (p payload, err error) {
	defer func() {
		if err != nil {
			p.clear()
			p = payload{}
		}
	}()
	left := v.SizeLimit
	p.files = make([]tmpfs.File, len(v.Files))
	p.ident = make([][]byte, len(v.Files))
	for i, f := range v.Files {
		data, err := f.content(secrets, left, &p, i)
		if err != nil {
			return p, fmt.Errorf("secrets[%d] (file %q): %w", i, f.Name, err)
		}
		left -= int64(len(data))
		mode := f.Mode
		if gid >= 0 && f.Default {
			mode |= 0o040
		}
		p.files[i] = tmpfs.File{Name: f.Name, Mode: mode, Data: data}
	}
	return p, nil
}

// content is the file's bytes: its value, or its template rendered, then converted; at most left
// bytes. What it allocates is recorded in p.
func (f FileSpec) content(secrets []broker.Secret, left int64, p *payload, i int) ([]byte, error) {
	var data []byte
	password := ""
	if f.Template == nil {
		data = secrets[f.reads[0]].Value
	} else {
		values := map[string]map[string]string{}
		for j, in := range f.Inputs {
			if values[in.Name] == nil {
				values[in.Name] = map[string]string{}
			}
			values[in.Name][in.Key] = string(secrets[f.reads[j]].Value)
		}
		out, err := f.Template.Execute(values, left) // what the volume's sizeLimit has left
		if err != nil {
			return nil, fmt.Errorf("template: %w", err)
		}
		p.owned = append(p.owned, out)
		data = out
		if f.Password != nil {
			pw, err := f.Password.Execute(values, MaxPasswordBytes)
			if err != nil {
				return nil, fmt.Errorf("password: %w", err)
			}
			password = string(pw)
			clear(pw)
		}
	}
	if f.Format != "" {
		out, err := render.Convert(f.Format, data, password)
		if err != nil {
			return nil, fmt.Errorf("format %s: %w", f.Format, err)
		}
		p.owned = append(p.owned, out)
		if f.Format.Randomized() {
			h := sha256.New()
			for _, b := range [][]byte{[]byte(f.Format), data, []byte(password)} {
				h.Write(binary.BigEndian.AppendUint64(nil, uint64(len(b))))
				h.Write(b)
			}
			p.ident[i] = h.Sum(nil)
		}
		data = out
	}
	if int64(len(data)) > left {
		return nil, fmt.Errorf("the file is %d bytes: with the files before it, more than the volume's sizeLimit (%d bytes left): %w", len(data), left, fault.ErrTooLarge)
	}
	return data, nil
}

// Weight is what a publish of the volume counts against the publish bound (Options.MaxPublishBytes):
// the most bytes of Vault's answers its fetch may hold (broker.AnswerBudget). The fetch holds at most
// about twice that at its peak.
func (v Volume) Weight() int64 { return broker.AnswerBudget(v.SizeLimit, len(v.refs)) }

// MaxWeight is the weight of the largest volume: the publish bound must hold at least one.
var MaxWeight = broker.AnswerBudget(MaxSizeLimit, MaxEntries)

// Dynamic reports whether the volume names dynamic credentials (pki or database entries).
func (v Volume) Dynamic() bool {
	for _, r := range v.refs {
		if r.Dynamic() {
			return true
		}
	}
	return false
}

// Refs returns the distinct refs (with their keys) the volume's files read, in the order of first
// use: what the broker authorizes, fetches and audits, a template's like a plain entry's.
func (v Volume) Refs() []broker.SecretRef { return slices.Clone(v.refs) }

// SecretsRefs parses a "secrets" attribute as a publish does and returns the refs (with their keys)
// its files read, templates included: what the broker would authorize, for a dry run
// (keywardctl policy check --secrets).
func SecretsRefs(raw string) ([]broker.SecretRef, error) {
	if len(raw) > MaxAttributeBytes {
		return nil, fmt.Errorf("the secrets list is %d bytes (max %d): %w", len(raw), MaxAttributeBytes, fault.ErrInvalid)
	}
	p, err := parseSecretsUncached(raw)
	if err != nil {
		return nil, err
	}
	return p.refs, nil
}
