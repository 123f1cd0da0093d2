package pkcs11

import (
	"fmt"

	p11 "github.com/miekg/pkcs11"
)

// Admin manages key generations and the audit checkpoint key for keywardctl: it talks PKCS#11 directly, without the plugin.
type Admin struct {
	p       *p11.Ctx
	s       p11.SessionHandle
	base    string
	cpLabel string // the audit checkpoint key's label ("" if none is configured)
	owner   bool   // this Admin initialized the module and finalizes it on Close
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
	a := &Admin{p: p, base: cfg.KeyLabel, cpLabel: cfg.AuditCheckpointKeyLabel, owner: owner}
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

// Retire destroys a generation so it can no longer decrypt. The newest acceptable generation (the
// encrypting one) cannot be retired; a refused object can, whatever its number. Checking that no
// data is still encrypted under it is the caller's job.
func (a *Admin) Retire(keyID string) error {
	gens, err := a.List()
	if err != nil {
		return err
	}
	var match []Generation
	for _, g := range gens {
		if g.KeyID == keyID {
			match = append(match, g)
		}
	}
	switch {
	case len(match) == 0:
		return fmt.Errorf("no generation with key ID %q", keyID)
	case len(match) > 1:
		return fmt.Errorf("%d objects have key ID %s (same label and CKA_ID); remove the one that does not belong with the HSM vendor's tools", len(match), keyID)
	}
	if cur := current(gens); cur != nil && cur.KeyID == keyID {
		return fmt.Errorf("%s is the newest generation and encrypts new data; rotate first", keyID)
	}
	return a.p.DestroyObject(a.s, match[0].handle)
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
