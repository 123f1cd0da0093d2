package csi

import (
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"

	"sigs.k8s.io/yaml"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/broker/policy"
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
	for k := range attrs {
		switch k {
		case AttrSecrets, AttrSizeLimit, AttrTokens, AttrPodName, AttrPodNamespace, AttrPodUID, AttrSAName, AttrEphemeral:
		default:
			return Volume{}, fmt.Errorf("unknown volume attribute %q: %w", k, broker.ErrInvalid)
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
	if err := yaml.UnmarshalStrict([]byte(raw), &v.Entries); err != nil {
		return Volume{}, fmt.Errorf("volume attribute %q: %v: %w", AttrSecrets, err, broker.ErrInvalid)
	}
	if len(v.Entries) == 0 || len(v.Entries) > MaxEntries {
		return Volume{}, fmt.Errorf("%d secrets (want 1..%d): %w", len(v.Entries), MaxEntries, broker.ErrInvalid)
	}
	files := map[string]bool{}
	for i, e := range v.Entries {
		bad := func(format string, args ...any) error {
			return fmt.Errorf("secrets[%d] (file %q): %s: %w", i, e.File, fmt.Sprintf(format, args...), broker.ErrInvalid)
		}
		if err := policy.ValidateRef(e.Ref); err != nil {
			return Volume{}, bad("ref %q is not valid", e.Ref)
		}
		if err := policy.ValidateKey(e.Key); err != nil {
			return Volume{}, bad("key %q is not valid", e.Key)
		}
		if e.File == "" || len(e.File) > 255 || strings.ContainsAny(e.File, "/\x00") || strings.HasPrefix(e.File, "..") || e.File == "." {
			return Volume{}, bad("file name must be non-empty, without '/', and not start with '..'")
		}
		if files[e.File] {
			return Volume{}, bad("file name used twice")
		}
		files[e.File] = true
		if e.Version < 0 {
			return Volume{}, bad("version %d", e.Version)
		}
		mode := os.FileMode(0o400)
		if e.Mode != "" {
			m, err := strconv.ParseUint(e.Mode, 8, 32)
			if err != nil || m&^0o666 != 0 {
				return Volume{}, bad("mode %q: want octal permissions without execute bits, such as \"0400\"", e.Mode)
			}
			mode = os.FileMode(m)
		}
		v.Modes = append(v.Modes, mode)
	}
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

// Refs returns the refs of the volume's entries, in order.
func (v Volume) Refs() []broker.SecretRef {
	refs := make([]broker.SecretRef, len(v.Entries))
	for i, e := range v.Entries {
		refs[i] = broker.SecretRef{Ref: e.Ref, Key: e.Key, Version: e.Version}
	}
	return refs
}
