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
	"time"

	p11 "github.com/miekg/pkcs11"
	"go.uber.org/zap"

	"github.com/keyward/keyward/internal/fault"
)

// Generation is one key-encryption key generation on the token.
type Generation struct {
	Generation int
	KeyID      string
	Label      string
	// Usable is false when the object is extractable, not sensitive or not AES-256: such an object is
	// never used, whatever its label.
	Usable bool
	handle p11.ObjectHandle
}

var aesKeyTemplate = []*p11.Attribute{
	p11.NewAttribute(p11.CKA_CLASS, p11.CKO_SECRET_KEY),
	p11.NewAttribute(p11.CKA_KEY_TYPE, p11.CKK_AES),
	p11.NewAttribute(p11.CKA_TOKEN, true),
}

// listGenerations finds the key generations labelled base.N on the token, oldest first.
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
	for _, h := range handles {
		attrs, err := p.GetAttributeValue(s, h, []*p11.Attribute{
			p11.NewAttribute(p11.CKA_LABEL, nil),
			p11.NewAttribute(p11.CKA_ID, nil),
			p11.NewAttribute(p11.CKA_SENSITIVE, nil),
			p11.NewAttribute(p11.CKA_EXTRACTABLE, nil),
			p11.NewAttribute(p11.CKA_VALUE_LEN, nil),
		})
		if err != nil {
			return nil, err
		}
		label := string(attrs[0].Value)
		n, ok := parseGeneration(base, label)
		if !ok {
			continue
		}
		valueLen, _ := bytesToUint(attrs[4].Value)
		gens = append(gens, Generation{
			Generation: n,
			KeyID:      KeyID(base, n, attrs[1].Value),
			Label:      label,
			Usable:     boolAttr(attrs[2].Value) && !boolAttr(attrs[3].Value) && valueLen == 32,
			handle:     h,
		})
	}
	sort.Slice(gens, func(i, j int) bool { return gens[i].Generation < gens[j].Generation })
	return gens, nil
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

// reloadKeys lists the generations and swaps in a new key set. Callers hold refreshMu.
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
	for _, g := range gens {
		if !g.Usable {
			w.log.Warn("ignoring a key object that is extractable, not sensitive or not AES-256", zap.String("label", g.Label))
			continue
		}
		k, ok := old.byID[g.KeyID]
		if !ok {
			k = &key{id: g.KeyID, gen: g.Generation, obj: g.handle, work: g.handle}
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
			w.log.Info("key generation retired", zap.String("key_id", id))
			if k.work != k.obj {
				inc.graveyard = append(inc.graveyard, k.work)
			}
		}
	}
	inc.keys.Store(next)
	return nil
}

// Refresh looks for new or retired key generations now (the plugin calls it on SIGHUP).
func (w *Wrapper) Refresh(ctx context.Context) error {
	return w.withIncarnation("refresh", func(inc *incarnation) error {
		w.refreshMu.Lock()
		defer w.refreshMu.Unlock()
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
