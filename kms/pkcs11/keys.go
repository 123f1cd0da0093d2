package pkcs11

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	p11 "github.com/miekg/pkcs11"
	"go.uber.org/zap"

	"github.com/keyward/keyward/internal/fault"
	"github.com/keyward/keyward/kms"
)

// Generation is one key-encryption key generation on the token.
type Generation struct {
	Generation int
	KeyID      string
	Label      string
	// Usable reports whether the object is acceptable as a key-encryption key (see vet); Refusal says
	// why not. A refused object is never used to wrap or unwrap, whatever its label.
	Usable  bool
	Refusal string
	handle  p11.ObjectHandle
}

var aesKeyTemplate = []*p11.Attribute{
	p11.NewAttribute(p11.CKA_CLASS, p11.CKO_SECRET_KEY),
	p11.NewAttribute(p11.CKA_KEY_TYPE, p11.CKK_AES),
	p11.NewAttribute(p11.CKA_TOKEN, true),
}

// The attributes listGenerations reads, in this order.
var generationAttrs = []uint{p11.CKA_LABEL, p11.CKA_ID, p11.CKA_VALUE_LEN, p11.CKA_SENSITIVE, p11.CKA_EXTRACTABLE,
	p11.CKA_LOCAL, p11.CKA_ALWAYS_SENSITIVE, p11.CKA_NEVER_EXTRACTABLE}

// listGenerations finds the key generations labelled base.N on the token, oldest first (objects of
// one generation by key ID), each vetted: Usable or with the reason it is refused.
func listGenerations(p *p11.Ctx, s p11.SessionHandle, base string) ([]Generation, error) {
	if err := p.FindObjectsInit(s, aesKeyTemplate); err != nil {
		return nil, err
	}
	var handles []p11.ObjectHandle
	for {
		batch, _, err := p.FindObjects(s, 64)
		if err != nil {
			p.FindObjectsFinal(s)
			return nil, err
		}
		if len(batch) == 0 {
			break
		}
		handles = append(handles, batch...)
	}
	if err := p.FindObjectsFinal(s); err != nil {
		return nil, err
	}
	var gens []Generation
	perLabel := map[string]int{}
	for _, h := range handles {
		tmpl := make([]*p11.Attribute, len(generationAttrs))
		for i, a := range generationAttrs {
			tmpl[i] = p11.NewAttribute(a, nil)
		}
		attrs, err := p.GetAttributeValue(s, h, tmpl)
		if err != nil {
			return nil, err
		}
		label := string(attrs[0].Value)
		n, ok := parseGeneration(base, label)
		if !ok {
			continue
		}
		valueLen, _ := bytesToUint(attrs[2].Value)
		refusal := vet(valueLen, boolAttr(attrs[3].Value), boolAttr(attrs[4].Value), boolAttr(attrs[5].Value),
			boolAttr(attrs[6].Value), boolAttr(attrs[7].Value))
		perLabel[label]++
		gens = append(gens, Generation{Generation: n, KeyID: KeyID(base, n, attrs[1].Value), Label: label,
			Usable: refusal == "", Refusal: refusal, handle: h})
	}
	for i, g := range gens {
		if n := perLabel[g.Label]; n > 1 {
			dup := fmt.Sprintf("duplicate label: %d objects are labelled %s, none is used", n, g.Label)
			gens[i].Usable, gens[i].Refusal = false, strings.TrimSuffix(dup+"; "+g.Refusal, "; ")
		}
	}
	sort.Slice(gens, func(i, j int) bool {
		if gens[i].Generation != gens[j].Generation {
			return gens[i].Generation < gens[j].Generation
		}
		return gens[i].KeyID < gens[j].KeyID
	})
	return gens, nil
}

// vet says why a key object labelled as a generation is not acceptable as a key-encryption key, or
// "" if it is. Only an AES-256 key generated inside the HSM (CKA_LOCAL=true) that has always been
// sensitive and never extractable (CKA_ALWAYS_SENSITIVE=true, CKA_NEVER_EXTRACTABLE=true, and still
// CKA_SENSITIVE=true, CKA_EXTRACTABLE=false) is: anyone with the user PIN can import a key whose
// value they know (C_CreateObject, C_UnwrapKey: CKA_LOCAL=false) and mark it sensitive and
// non-extractable, and every DEK seed wrapped under it would then be decryptable offline from etcd
// or its backups.
func vet(valueLen uint64, sensitive, extractable, local, alwaysSensitive, neverExtractable bool) string {
	why := exposure(sensitive, extractable, local, alwaysSensitive, neverExtractable)
	if valueLen != 32 {
		why = append(why, fmt.Sprintf("not AES-256 (a %d-byte key)", valueLen))
	}
	return strings.Join(why, "; ")
}

// exposure lists why a key's value may have existed outside the HSM, or may still leave it: not
// generated inside it, once readable or extractable, or so now. Empty for a key of proven origin.
func exposure(sensitive, extractable, local, alwaysSensitive, neverExtractable bool) []string {
	var why []string
	if !local {
		why = append(why, "not generated inside the HSM (CKA_LOCAL=false: imported, so its value existed outside the HSM)")
	}
	if !alwaysSensitive {
		why = append(why, "CKA_ALWAYS_SENSITIVE=false (its value was once readable)")
	}
	if !neverExtractable {
		why = append(why, "CKA_NEVER_EXTRACTABLE=false (it was once extractable)")
	}
	if !sensitive {
		why = append(why, "CKA_SENSITIVE=false")
	}
	if extractable {
		why = append(why, "CKA_EXTRACTABLE=true")
	}
	return why
}

// current is the newest acceptable generation (the one that encrypts), or nil.
func current(gens []Generation) *Generation {
	for i := len(gens) - 1; i >= 0; i-- {
		if gens[i].Usable {
			return &gens[i]
		}
	}
	return nil
}

// createGeneration generates the next AES-256 key generation inside the HSM: a token object that is
// sensitive and never extractable, with a random CKA_ID.
func createGeneration(p *p11.Ctx, s p11.SessionHandle, base string) (Generation, error) {
	gens, err := listGenerations(p, s, base)
	if err != nil {
		return Generation{}, err
	}
	next := 1
	if len(gens) > 0 {
		next = gens[len(gens)-1].Generation + 1
	}
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return Generation{}, err
	}
	label := generationLabel(base, next)
	h, err := p.GenerateKey(s, []*p11.Mechanism{p11.NewMechanism(p11.CKM_AES_KEY_GEN, nil)}, []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_SECRET_KEY),
		p11.NewAttribute(p11.CKA_KEY_TYPE, p11.CKK_AES),
		p11.NewAttribute(p11.CKA_VALUE_LEN, 32),
		p11.NewAttribute(p11.CKA_TOKEN, true),
		p11.NewAttribute(p11.CKA_PRIVATE, true),
		p11.NewAttribute(p11.CKA_SENSITIVE, true),
		p11.NewAttribute(p11.CKA_EXTRACTABLE, false),
		p11.NewAttribute(p11.CKA_ENCRYPT, true),
		p11.NewAttribute(p11.CKA_DECRYPT, true),
		p11.NewAttribute(p11.CKA_WRAP, false),
		p11.NewAttribute(p11.CKA_UNWRAP, false),
		p11.NewAttribute(p11.CKA_LABEL, label),
		p11.NewAttribute(p11.CKA_ID, id),
	})
	if err != nil {
		return Generation{}, err
	}
	return Generation{Generation: next, KeyID: KeyID(base, next, id), Label: label, Usable: true, handle: h}, nil
}

func boolAttr(v []byte) bool { return len(v) == 1 && v[0] != 0 }

func bytesToUint(v []byte) (uint64, error) {
	if len(v) == 0 || len(v) > 8 {
		return 0, errors.New("bad CK_ULONG")
	}
	var n uint64
	for i := len(v) - 1; i >= 0; i-- { // CK_ULONG in host (little-endian) order
		n = n<<8 | uint64(v[i])
	}
	return n, nil
}

// reloadKeys lists the generations and swaps in a new key set. Callers hold inc.refreshMu.
func (w *Wrapper) reloadKeys(inc *incarnation) error {
	p, s := inc.p, inc.keySession
	// Copies of keys that vanished in the previous round: no call can still hold them now.
	for _, h := range inc.graveyard {
		p.DestroyObject(s, h)
	}
	inc.graveyard = nil
	gens, err := listGenerations(p, s, w.cfg.KeyLabel)
	if err != nil {
		return err
	}
	old := inc.keys.Load()
	next := &keySet{byID: map[string]*key{}}
	var refusals []kms.KeyRefusal
	for _, g := range gens {
		if !g.Usable {
			refusals = append(refusals, kms.KeyRefusal{KeyID: g.KeyID, Label: g.Label, Reason: g.Refusal})
			w.warnRefused(g)
			continue
		}
		k, ok := old.byID[g.KeyID]
		if !ok {
			k = &key{id: g.KeyID, gen: g.Generation, obj: g.handle, work: g.handle, aad: aad(formatV1, g.KeyID)}
			if *w.cfg.SessionKeyCopies {
				// A session object inside the HSM, still sensitive and non-extractable: operations on it
				// avoid the token-object overhead (about 2.5x in SoftHSM).
				c, err := p.CopyObject(s, g.handle, []*p11.Attribute{p11.NewAttribute(p11.CKA_TOKEN, false)})
				if err != nil {
					return fmt.Errorf("C_CopyObject %s: %w", g.Label, err)
				}
				k.work = c
			}
			if old.current != nil {
				w.log.Info("key generation found", zap.String("key_id", k.id), zap.Int("generation", k.gen))
			}
		}
		next.byID[k.id] = k
		if next.current == nil || k.gen > next.current.gen {
			next.current = k
		}
	}
	for id, k := range old.byID {
		if _, ok := next.byID[id]; !ok {
			w.log.Info("key generation retired or refused", zap.String("key_id", id))
			if k.work != k.obj {
				inc.graveyard = append(inc.graveyard, k.work)
			}
		}
	}
	next.refused = refusals
	if err := w.loadCheckpointKey(p, s, old, next); err != nil {
		return err
	}
	inc.keys.Store(next)
	w.refusals.Store(&refusals)
	return nil
}

// warnRefused logs a refused key object, once per object and reason in the process's life.
func (w *Wrapper) warnRefused(g Generation) {
	w.warnOnce(g.KeyID+"\x00"+g.Refusal, func() {
		w.log.Warn("key object refused: never used to wrap or unwrap", zap.String("label", g.Label),
			zap.String("key_id", g.KeyID), zap.String("reason", g.Refusal))
	})
}

// warnOnce runs warn the first time key is seen in the process's life.
func (w *Wrapper) warnOnce(key string, warn func()) {
	w.warnedMu.Lock()
	defer w.warnedMu.Unlock()
	if w.warned[key] {
		return
	}
	if w.warned == nil {
		w.warned = map[string]bool{}
	}
	w.warned[key] = true
	warn()
}

// Refusals lists the key objects labelled as generations that the last key refresh refused, and why
// (kms.KeyVetter: the plugin audits them).
func (w *Wrapper) Refusals() []kms.KeyRefusal {
	if r := w.refusals.Load(); r != nil {
		return append([]kms.KeyRefusal(nil), (*r)...)
	}
	return nil
}

// Refresh looks for new or retired key generations now (the plugin calls it on SIGHUP).
func (w *Wrapper) Refresh(ctx context.Context) error {
	return w.withIncarnation("refresh", func(inc *incarnation) error {
		inc.refreshMu.Lock()
		defer inc.refreshMu.Unlock()
		return w.reloadKeys(inc)
	})
}

func (w *Wrapper) refreshLoop() {
	defer w.wg.Done()
	t := time.NewTicker(w.cfg.KeyRefreshInterval.Duration)
	defer t.Stop()
	for {
		select {
		case <-w.stop:
			return
		case <-t.C:
			if err := w.Refresh(context.Background()); err != nil && w.cur.Load() != nil {
				w.log.Warn("key refresh failed", zap.Error(err))
			}
		}
	}
}

// KeyID returns the newest generation's key ID.
func (w *Wrapper) KeyID(context.Context) (string, error) {
	inc := w.cur.Load()
	if inc == nil {
		return "", fmt.Errorf("HSM unavailable (%s): %w", w.Reason(), fault.ErrUnavailable)
	}
	if k := inc.keys.Load().current; k != nil {
		return k.id, nil
	}
	return "", fmt.Errorf("no key generation labelled %s.N on the token: %w", w.cfg.KeyLabel, fault.ErrUnavailable)
}

// KeyID derives a key generation's ID from the HSM object's identity: the base label, the generation
// and a fingerprint of the object's CKA_ID (random per object), so an ID is never reused, even when a
// retired generation number is created again, and it is the same after a restart.
func KeyID(label string, generation int, ckaID []byte) string {
	sum := sha256.Sum256(ckaID)
	return label + "." + strconv.Itoa(generation) + "." + hex.EncodeToString(sum[:8])
}

// generationLabel is the CKA_LABEL of one key generation.
func generationLabel(label string, generation int) string {
	return label + "." + strconv.Itoa(generation)
}

// parseGeneration returns the generation of an object labelled label.N, or false.
func parseGeneration(base, objLabel string) (int, bool) {
	m := regexp.MustCompile(`^` + regexp.QuoteMeta(base) + `\.([1-9][0-9]{0,8})$`).FindStringSubmatch(objLabel)
	if m == nil {
		return 0, false
	}
	n, err := strconv.Atoi(m[1])
	return n, err == nil
}
