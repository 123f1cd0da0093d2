package csi

import (
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"

	"sigs.k8s.io/yaml"

	"github.com/keyward/keyward/broker"
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

// Entry is one file of a volume, as the user writes it in the "secrets" attribute.
type Entry struct {
	Ref     string `json:"ref"`
	Key     string `json:"key"`
	File    string `json:"file"`
	Mode    string `json:"mode,omitempty"`
	Version int    `json:"version,omitempty"`
}

// FileSpec is one file of a volume, parsed and validated: which secret goes into which file, with
// which mode.
type FileSpec struct {
	Ref  broker.SecretRef
	Name string
	// Mode is the file's mode; Default says the user gave none (then the pod's fsGroup may read it).
	Mode    os.FileMode
	Default bool
}

// Volume is a parsed, validated publish request.
type Volume struct {
	Files     []FileSpec
	Claimed   broker.Identity
	Token     broker.Token
	SizeLimit int64
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
	files, err := parseSecrets(raw)
	if err != nil {
		return Volume{}, err
	}
	v.Files = files
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
// attribute, and the pods of one workload share it, so each distinct list is parsed and validated once.
// Keyed by the text's SHA-256, so padded attributes cost no memory here. Bounded: cleared when full.
var parsedSecrets = struct {
	sync.Mutex
	m map[[32]byte][]FileSpec
}{m: map[[32]byte][]FileSpec{}}

const maxParsedSecrets = 256

// parseSecrets parses and validates the "secrets" attribute. The slice returned is shared: callers
// must not modify it.
func parseSecrets(raw string) ([]FileSpec, error) {
	key := sha256.Sum256([]byte(raw))
	parsedSecrets.Lock()
	files, ok := parsedSecrets.m[key]
	parsedSecrets.Unlock()
	if ok {
		return files, nil
	}
	files, err := parseSecretsUncached(raw)
	if err != nil {
		return nil, err
	}
	parsedSecrets.Lock()
	if len(parsedSecrets.m) >= maxParsedSecrets {
		clear(parsedSecrets.m)
	}
	parsedSecrets.m[key] = files
	parsedSecrets.Unlock()
	return files, nil
}

func parseSecretsUncached(raw string) ([]FileSpec, error) {
	var entries []Entry
	if err := yaml.UnmarshalStrict([]byte(raw), &entries); err != nil {
		return nil, fmt.Errorf("volume attribute %q: %v: %w", AttrSecrets, err, fault.ErrInvalid)
	}
	if len(entries) == 0 || len(entries) > MaxEntries {
		return nil, fmt.Errorf("%d secrets (want 1..%d): %w", len(entries), MaxEntries, fault.ErrInvalid)
	}
	names := map[string]bool{}
	files := make([]FileSpec, 0, len(entries))
	for i, e := range entries {
		f, err := e.spec()
		if err == nil && names[e.File] {
			err = errors.New("file name used twice")
		}
		if err != nil {
			return nil, fmt.Errorf("secrets[%d] (file %q): %v: %w", i, e.File, err, fault.ErrInvalid)
		}
		names[e.File] = true
		files = append(files, f)
	}
	return files, nil
}

// spec validates one entry (the ref with the domain's own rules) and turns it into a FileSpec.
func (e Entry) spec() (FileSpec, error) {
	ref := broker.SecretRef{Ref: e.Ref, Key: e.Key, Version: e.Version}
	if err := ref.Validate(); err != nil {
		return FileSpec{}, fmt.Errorf("ref %q, key %q, version %d is not valid", e.Ref, e.Key, e.Version)
	}
	if !tmpfs.ValidName(e.File) {
		return FileSpec{}, errors.New("file name must be non-empty, without '/', and not start with '..'")
	}
	f := FileSpec{Ref: ref, Name: e.File, Mode: 0o400, Default: e.Mode == ""}
	if e.Mode != "" {
		m, err := strconv.ParseUint(e.Mode, 8, 32)
		if err != nil || m&^0o444 != 0 {
			return FileSpec{}, fmt.Errorf("mode %q: files are read-only, want read bits only: \"0400\", \"0440\" or \"0444\"", e.Mode)
		}
		f.Mode = os.FileMode(m)
	}
	return f, nil
}

// files zips the volume's file specs with the secrets fetched for them (one per ref, in order): the
// pod's fsGroup (gid >= 0) also reads the files whose mode the user did not set.
func (v Volume) files(secrets []broker.Secret, gid int) []tmpfs.File {
	out := make([]tmpfs.File, len(v.Files))
	for i, f := range v.Files {
		mode := f.Mode
		if gid >= 0 && f.Default {
			mode |= 0o040
		}
		out[i] = tmpfs.File{Name: f.Name, Mode: mode, Data: secrets[i].Value}
	}
	return out
}

// Weight is what a publish of the volume counts against the publish bound (Options.MaxPublishBytes):
// the most bytes of Vault's answers its fetch may hold (broker.AnswerBudget). The fetch holds at most
// about twice that at its peak.
func (v Volume) Weight() int64 { return broker.AnswerBudget(v.SizeLimit, len(v.Files)) }

// MaxWeight is the weight of the largest volume: the publish bound must hold at least one.
var MaxWeight = broker.AnswerBudget(MaxSizeLimit, MaxEntries)

// Refs returns the refs of the volume's files, in order.
func (v Volume) Refs() []broker.SecretRef {
	refs := make([]broker.SecretRef, len(v.Files))
	for i, f := range v.Files {
		refs[i] = f.Ref
	}
	return refs
}
