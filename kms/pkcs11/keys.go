package pkcs11

import (
	"crypto/rand"
	"errors"
	"fmt"
	"sort"

	p11 "github.com/miekg/pkcs11"
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

// Admin manages key generations for keywardctl: it talks PKCS#11 directly, without the plugin.
type Admin struct {
	p     *p11.Ctx
	s     p11.SessionHandle
	base  string
	owner bool // this Admin initialized the module and finalizes it on Close
}

// OpenAdmin loads the module, opens a session on the configured token and logs in.
func OpenAdmin(cfg Config, pin string) (*Admin, error) {
	p := p11.New(cfg.Module)
	if p == nil {
		return nil, fmt.Errorf("cannot load PKCS#11 module %s", cfg.Module)
	}
	owner := true
	if err := p.Initialize(); err != nil {
		if !isCode(err, p11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
			p.Destroy()
			return nil, fmt.Errorf("C_Initialize: %w", err)
		}
		owner = false
	}
	a := &Admin{p: p, base: cfg.KeyLabel, owner: owner}
	slot, err := findSlot(p, cfg)
	if err == nil {
		a.s, err = p.OpenSession(slot, p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
	}
	if err == nil {
		err = login(p, a.s, pin)
	}
	if err != nil {
		a.Close()
		return nil, err
	}
	return a, nil
}

// List returns the key generations, oldest first.
func (a *Admin) List() ([]Generation, error) { return listGenerations(a.p, a.s, a.base) }

// Create creates the first generation; it refuses when generations exist (use Rotate).
func (a *Admin) Create() (Generation, error) {
	gens, err := a.List()
	if err != nil {
		return Generation{}, err
	}
	if len(gens) > 0 {
		return Generation{}, fmt.Errorf("%s already has %d generation(s); use rotate to add one", a.base, len(gens))
	}
	return createGeneration(a.p, a.s, a.base)
}

// Rotate creates the next generation, which becomes the encrypting key once the plugin sees it.
func (a *Admin) Rotate() (Generation, error) {
	gens, err := a.List()
	if err != nil {
		return Generation{}, err
	}
	if len(gens) == 0 {
		return Generation{}, fmt.Errorf("%s has no generation yet; use create", a.base)
	}
	return createGeneration(a.p, a.s, a.base)
}

// Retire destroys a generation so it can no longer decrypt. The newest generation (the encrypting
// one) cannot be retired. Checking that no data is still encrypted under it is the caller's job.
func (a *Admin) Retire(keyID string) error {
	gens, err := a.List()
	if err != nil {
		return err
	}
	for i, g := range gens {
		if g.KeyID != keyID {
			continue
		}
		if i == len(gens)-1 {
			return fmt.Errorf("%s is the newest generation and encrypts new data; rotate first", keyID)
		}
		return a.p.DestroyObject(a.s, g.handle)
	}
	return fmt.Errorf("no generation with key ID %q", keyID)
}

// Close logs nothing out (the login is shared by the application) and closes the session.
func (a *Admin) Close() {
	if a.s != 0 {
		a.p.CloseSession(a.s)
	}
	if a.owner {
		a.p.Finalize()
	}
	a.p.Destroy()
}

func isCode(err error, code uint) bool {
	var pe p11.Error
	return errors.As(err, &pe) && uint(pe) == code
}

func findSlot(p *p11.Ctx, cfg Config) (uint, error) {
	if cfg.Slot != nil {
		return *cfg.Slot, nil
	}
	slots, err := p.GetSlotList(true)
	if err != nil {
		return 0, fmt.Errorf("C_GetSlotList: %w", err)
	}
	for _, s := range slots {
		ti, err := p.GetTokenInfo(s)
		if err == nil && ti.Label == cfg.TokenLabel {
			return s, nil
		}
	}
	return 0, fmt.Errorf("no token labelled %q: %w", cfg.TokenLabel, p11.Error(p11.CKR_TOKEN_NOT_PRESENT))
}

// login logs the user in; the PIN never appears in an error.
func login(p *p11.Ctx, s p11.SessionHandle, pin string) error {
	err := p.Login(s, p11.CKU_USER, pin)
	if err == nil || isCode(err, p11.CKR_USER_ALREADY_LOGGED_IN) {
		return nil
	}
	var pe p11.Error
	if errors.As(err, &pe) {
		return fmt.Errorf("C_Login: %w", pe)
	}
	return errors.New("C_Login failed")
}
