package csi

import (
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"

	"sigs.k8s.io/yaml"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/broker/policy"
	"github.com/keyward/keyward/csi/tmpfs"
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

// Volume is a parsed, validated publish request.
type Volume struct {
	Entries   []Entry
	Modes     []os.FileMode
	Claimed   broker.Identity
	Token     broker.Token
	SizeLimit int64
}

// ParseVolume validates volume attributes strictly. Errors wrap broker.ErrInvalid (or
// ErrUnauthenticated for a missing token) and name the entry at fault; they never hold the token.
func ParseVolume(attrs map[string]string, audience string) (Volume, error) {
	v := Volume{SizeLimit: DefaultSizeLimit}
	for k, val := range attrs {
		switch k {
		case AttrSecrets, AttrSizeLimit, AttrTokens, AttrPodName, AttrPodNamespace, AttrPodUID, AttrSAName, AttrEphemeral:
		default:
			return Volume{}, fmt.Errorf("unknown volume attribute %.64q: %w", k, broker.ErrInvalid)
		}
		if len(val) > MaxAttributeBytes {
			return Volume{}, fmt.Errorf("volume attribute %q is %d bytes (max %d): %w", k, len(val), MaxAttributeBytes, broker.ErrInvalid)
		}
	}
	if s, ok := attrs[AttrSizeLimit]; ok {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n < 4096 || n > MaxSizeLimit {
			return Volume{}, fmt.Errorf("sizeLimit %q: want bytes between 4096 and %d: %w", s, MaxSizeLimit, broker.ErrInvalid)
		}
		v.SizeLimit = n
	}
	raw, ok := attrs[AttrSecrets]
	if !ok || strings.TrimSpace(raw) == "" {
		return Volume{}, fmt.Errorf("volume attribute %q is required: %w", AttrSecrets, broker.ErrInvalid)
	}
	entries, modes, err := parseSecrets(raw)
	if err != nil {
		return Volume{}, err
	}
	v.Entries, v.Modes = entries, modes
	v.Claimed = broker.Identity{Namespace: attrs[AttrPodNamespace], PodName: attrs[AttrPodName], PodUID: attrs[AttrPodUID], ServiceAccount: attrs[AttrSAName]}
	if v.Claimed.Namespace == "" || v.Claimed.PodName == "" || v.Claimed.PodUID == "" {
		return Volume{}, fmt.Errorf("pod information missing (the CSIDriver needs podInfoOnMount: true): %w", broker.ErrInvalid)
	}
	tokens, ok := attrs[AttrTokens]
	if !ok || tokens == "" {
		return Volume{}, fmt.Errorf("no service-account token (the CSIDriver needs tokenRequests with audience %q): %w", audience, broker.ErrUnauthenticated)
	}
	var byAudience map[string]struct {
		Token string `json:"token"`
	}
	if err := json.Unmarshal([]byte(tokens), &byAudience); err != nil {
		return Volume{}, fmt.Errorf("attribute %s is not the JSON kubelet writes: %w", AttrTokens, broker.ErrInvalid)
	}
	t, ok := byAudience[audience]
	if !ok || t.Token == "" {
		return Volume{}, fmt.Errorf("no token for audience %q (the CSIDriver's tokenRequests must name it): %w", audience, broker.ErrUnauthenticated)
	}
	v.Token = broker.Token(t.Token)
	return v, nil
}

// parsedSecrets memoizes parseSecrets: kubelet republishes every volume with the same "secrets"
// attribute, and the pods of one workload share it, so each distinct list is parsed and validated once.
// Keyed by the text's SHA-256, so padded attributes cost no memory here. Bounded: cleared when full.
var parsedSecrets = struct {
	sync.Mutex
	m map[[32]byte]parsed
}{m: map[[32]byte]parsed{}}

const maxParsedSecrets = 256

type parsed struct {
	entries []Entry
	modes   []os.FileMode
}

// parseSecrets parses and validates the "secrets" attribute. The slices returned are shared: callers
// must not modify them.
func parseSecrets(raw string) ([]Entry, []os.FileMode, error) {
	key := sha256.Sum256([]byte(raw))
	parsedSecrets.Lock()
	p, ok := parsedSecrets.m[key]
	parsedSecrets.Unlock()
	if ok {
		return p.entries, p.modes, nil
	}
	entries, modes, err := parseSecretsUncached(raw)
	if err != nil {
		return nil, nil, err
	}
	parsedSecrets.Lock()
	if len(parsedSecrets.m) >= maxParsedSecrets {
		clear(parsedSecrets.m)
	}
	parsedSecrets.m[key] = parsed{entries, modes}
	parsedSecrets.Unlock()
	return entries, modes, nil
}

func parseSecretsUncached(raw string) ([]Entry, []os.FileMode, error) {
	var entries []Entry
	if err := yaml.UnmarshalStrict([]byte(raw), &entries); err != nil {
		return nil, nil, fmt.Errorf("volume attribute %q: %v: %w", AttrSecrets, err, broker.ErrInvalid)
	}
	if len(entries) == 0 || len(entries) > MaxEntries {
		return nil, nil, fmt.Errorf("%d secrets (want 1..%d): %w", len(entries), MaxEntries, broker.ErrInvalid)
	}
	files := map[string]bool{}
	modes := make([]os.FileMode, 0, len(entries))
	for i, e := range entries {
		bad := func(format string, args ...any) error {
			return fmt.Errorf("secrets[%d] (file %q): %s: %w", i, e.File, fmt.Sprintf(format, args...), broker.ErrInvalid)
		}
		if err := policy.ValidateRef(e.Ref); err != nil {
			return nil, nil, bad("ref %q is not valid", e.Ref)
		}
		if err := policy.ValidateKey(e.Key); err != nil {
			return nil, nil, bad("key %q is not valid", e.Key)
		}
		if !tmpfs.ValidName(e.File) {
			return nil, nil, bad("file name must be non-empty, without '/', and not start with '..'")
		}
		if files[e.File] {
			return nil, nil, bad("file name used twice")
		}
		files[e.File] = true
		if e.Version < 0 {
			return nil, nil, bad("version %d", e.Version)
		}
		mode := os.FileMode(0o400)
		if e.Mode != "" {
			m, err := strconv.ParseUint(e.Mode, 8, 32)
			if err != nil || m&^0o444 != 0 {
				return nil, nil, bad("mode %q: files are read-only, want read bits only: \"0400\", \"0440\" or \"0444\"", e.Mode)
			}
			mode = os.FileMode(m)
		}
		modes = append(modes, mode)
	}
	return entries, modes, nil
}

// Weight is what a publish of the volume counts against the publish bound (Options.MaxPublishBytes):
// the most bytes of Vault's answers its fetch may hold (broker.AnswerBudget). The fetch holds at most
// about twice that at its peak.
func (v Volume) Weight() int64 { return broker.AnswerBudget(v.SizeLimit, len(v.Entries)) }

// MaxWeight is the weight of the largest volume: the publish bound must hold at least one.
var MaxWeight = broker.AnswerBudget(MaxSizeLimit, MaxEntries)

// Refs returns the refs of the volume's entries, in order.
func (v Volume) Refs() []broker.SecretRef {
	refs := make([]broker.SecretRef, len(v.Entries))
	for i, e := range v.Entries {
		refs[i] = broker.SecretRef{Ref: e.Ref, Key: e.Key, Version: e.Version}
	}
	return refs
}
