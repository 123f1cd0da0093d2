package pkcs11

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	p11 "github.com/miekg/pkcs11"
	"go.uber.org/zap"

	"github.com/keyward/keyward/kms"
)

// Config is the PKCS#11 section of keyward-kms's configuration.
type Config = kms.PKCS11Config

// Wrapper is a kms.KeyWrapper whose keys are AES-256 objects in a PKCS#11 token.
//
// It owns the module for the process: one login, a bounded pool of sessions, and recovery. When the
// token, a session or the login is lost, the current "incarnation" (initialized module, sessions, key
// handles) is torn down once its in-flight calls finish, and a new one is built with backoff
// (C_Finalize + C_Initialize: some HSMs, SoftHSM among them, only see a token again after that).
// Meanwhile calls fail fast with kms.ErrUnavailable.
type Wrapper struct {
	cfg Config
	pin string
	log *zap.Logger
	p   *p11.Ctx

	cur        atomic.Pointer[incarnation]
	reason     atomic.Value // string: why cur is nil
	recoveries atomic.Uint64
	refreshMu  sync.Mutex
	stop       chan struct{}
	wg         sync.WaitGroup
	closeOnce  sync.Once
}

var _ kms.KeyWrapper = (*Wrapper)(nil)

// incarnation is one initialized module with its sessions and key handles.
type incarnation struct {
	p       *p11.Ctx
	slot    uint
	mu      sync.RWMutex // read: a call is using it; write: tearing it down
	closed  bool
	closing chan struct{}
	idle    chan p11.SessionHandle
	open    chan struct{} // one token per open pool session, capacity MaxSessions
	inUse   atomic.Int64
	// keySession owns the session-object copies of the keys; used only under Wrapper.refreshMu.
	keySession p11.SessionHandle
	keys       atomic.Pointer[keySet]
	graveyard  []p11.ObjectHandle
}

type key struct {
	id   string
	gen  int
	obj  p11.ObjectHandle // the token object
	work p11.ObjectHandle // what operations use: a session copy, or obj
}

type keySet struct {
	current *key
	byID    map[string]*key
}

// New loads the module, logs in and loads the key generations labelled cfg.KeyLabel.N. pin is the
// user PIN (read from the PIN file by the caller); it is kept in memory for re-login after recovery.
func New(cfg Config, pin string, log *zap.Logger) (*Wrapper, error) {
	cfg.Default()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	p := p11.New(cfg.Module)
	if p == nil {
		return nil, fmt.Errorf("cannot load PKCS#11 module %s", cfg.Module)
	}
	w := &Wrapper{cfg: cfg, pin: pin, log: log.Named("pkcs11"), p: p, stop: make(chan struct{})}
	inc, err := w.open()
	if err != nil {
		p.Finalize()
		p.Destroy()
		return nil, err
	}
	w.cur.Store(inc)
	w.wg.Add(1)
	go w.refreshLoop()
	return w, nil
}

func (w *Wrapper) open() (*incarnation, error) {
	if err := w.p.Initialize(); err != nil && !isCode(err, p11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
		return nil, fmt.Errorf("C_Initialize: %w", err)
	}
	slot, err := findSlot(w.p, w.cfg)
	if err != nil {
		return nil, err
	}
	ks, err := w.p.OpenSession(slot, p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
	if err != nil {
		return nil, fmt.Errorf("C_OpenSession: %w", err)
	}
	if err := login(w.p, ks, w.pin); err != nil {
		w.p.CloseSession(ks)
		return nil, err
	}
	inc := &incarnation{
		p: w.p, slot: slot, closing: make(chan struct{}), keySession: ks,
		idle: make(chan p11.SessionHandle, w.cfg.MaxSessions),
		open: make(chan struct{}, w.cfg.MaxSessions),
	}
	inc.keys.Store(&keySet{byID: map[string]*key{}})
	w.refreshMu.Lock()
	err = w.reloadKeys(inc)
	w.refreshMu.Unlock()
	if err != nil {
		w.p.CloseSession(ks)
		return nil, err
	}
	return inc, nil
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

// withIncarnation runs f on the current incarnation, failing fast while there is none.
func (w *Wrapper) withIncarnation(op string, f func(*incarnation) error) error {
	inc := w.cur.Load()
	if inc == nil {
		return fmt.Errorf("%s: HSM unavailable (%s): %w", op, w.Reason(), kms.ErrUnavailable)
	}
	inc.mu.RLock()
	defer inc.mu.RUnlock()
	if inc.closed {
		return fmt.Errorf("%s: HSM unavailable (recovering): %w", op, kms.ErrUnavailable)
	}
	err := f(inc)
	if err == nil || errors.Is(err, kms.ErrInvalid) || errors.Is(err, kms.ErrUnavailable) {
		return err
	}
	werr, lost := classify(op, err)
	if lost {
		w.lose(inc, werr)
	}
	return werr
}

// withSession runs f with a pooled session.
func (w *Wrapper) withSession(ctx context.Context, op string, f func(inc *incarnation, s p11.SessionHandle, ks *keySet) error) error {
	return w.withIncarnation(op, func(inc *incarnation) error {
		s, err := inc.acquire(ctx)
		if err != nil {
			return err
		}
		err = f(inc, s, inc.keys.Load())
		if err != nil && !errors.Is(err, kms.ErrInvalid) && !errors.Is(err, kms.ErrUnavailable) {
			if _, lost := classify(op, err); lost {
				inc.discard(s)
				return err
			}
		}
		inc.release(s)
		return err
	})
}

func (inc *incarnation) acquire(ctx context.Context) (p11.SessionHandle, error) {
	select {
	case s := <-inc.idle:
		inc.inUse.Add(1)
		return s, nil
	default:
	}
	select {
	case s := <-inc.idle:
		inc.inUse.Add(1)
		return s, nil
	case inc.open <- struct{}{}:
		s, err := inc.p.OpenSession(inc.slot, p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
		if err != nil {
			<-inc.open
			return 0, err
		}
		inc.inUse.Add(1)
		return s, nil
	case <-inc.closing:
		return 0, fmt.Errorf("HSM session pool closing: %w", kms.ErrUnavailable)
	case <-ctx.Done():
		return 0, fmt.Errorf("waiting for an HSM session: %v: %w", ctx.Err(), kms.ErrUnavailable)
	}
}

func (inc *incarnation) release(s p11.SessionHandle) {
	inc.inUse.Add(-1)
	inc.idle <- s // never blocks: at most cap(open) sessions exist
}

func (inc *incarnation) discard(s p11.SessionHandle) {
	inc.inUse.Add(-1)
	inc.p.CloseSession(s)
	<-inc.open
}

// lose takes inc out of service and starts recovery, once.
func (w *Wrapper) lose(inc *incarnation, cause error) {
	if !w.cur.CompareAndSwap(inc, nil) {
		return
	}
	w.reason.Store(cause.Error())
	w.log.Warn("HSM lost; rebuilding the session pool", zap.Error(cause))
	close(inc.closing)
	w.wg.Add(1)
	go w.recover(inc)
}

func (w *Wrapper) recover(old *incarnation) {
	defer w.wg.Done()
	old.mu.Lock() // waits for in-flight calls to return
	old.closed = true
	old.mu.Unlock()
	w.p.Finalize()
	backoff := 100 * time.Millisecond
	for attempt := 1; ; attempt++ {
		select {
		case <-w.stop:
			return
		case <-time.After(backoff):
		}
		inc, err := w.open()
		if err == nil {
			w.recoveries.Add(1)
			w.cur.Store(inc)
			w.log.Info("HSM recovered", zap.Int("attempts", attempt))
			return
		}
		w.reason.Store(err.Error())
		if attempt == 1 || attempt%10 == 0 {
			w.log.Warn("HSM still unavailable", zap.Int("attempts", attempt), zap.Error(err))
		}
		w.p.Finalize()
		backoff = min(backoff*2, 5*time.Second)
	}
}

// Wrap encrypts plaintext inside the HSM with AES-256-GCM under the newest key generation.
func (w *Wrapper) Wrap(ctx context.Context, plaintext []byte) ([]byte, string, error) {
	if len(plaintext) == 0 || len(plaintext) > kms.MaxPlaintext {
		return nil, "", fmt.Errorf("plaintext of %d bytes (want 1..%d): %w", len(plaintext), kms.MaxPlaintext, kms.ErrInvalid)
	}
	var out []byte
	var keyID string
	err := w.withSession(ctx, "encrypt", func(inc *incarnation, s p11.SessionHandle, ks *keySet) error {
		k := ks.current
		if k == nil {
			return fmt.Errorf("no key generation labelled %s.N on the token (create one with keywardctl kms keys create): %w",
				w.cfg.KeyLabel, kms.ErrUnavailable)
		}
		iv := make([]byte, ivLen)
		if _, err := rand.Read(iv); err != nil {
			return err
		}
		params := p11.NewGCMParams(iv, aad(formatV1, k.id), tagLen*8)
		defer params.Free()
		if err := inc.p.EncryptInit(s, []*p11.Mechanism{p11.NewMechanism(p11.CKM_AES_GCM, params)}, k.work); err != nil {
			return err
		}
		sealed, err := inc.p.Encrypt(s, plaintext)
		if err != nil {
			return err
		}
		out = make([]byte, 0, header+len(sealed))
		out = append(append(append(out, formatV1), iv...), sealed...)
		keyID = k.id
		return nil
	})
	return out, keyID, err
}

// Unwrap decrypts a ciphertext made by Wrap under the generation keyID.
func (w *Wrapper) Unwrap(ctx context.Context, ciphertext []byte, keyID string) ([]byte, error) {
	c, err := parseCiphertext(ciphertext)
	if err != nil {
		return nil, err
	}
	var out []byte
	err = w.withSession(ctx, "decrypt", func(inc *incarnation, s p11.SessionHandle, ks *keySet) error {
		k, ok := ks.byID[keyID]
		if !ok {
			return fmt.Errorf("unknown key ID %q (retired, or never created on this token): %w", truncate(keyID, 128), kms.ErrInvalid)
		}
		params := p11.NewGCMParams(c.iv, aad(c.version, k.id), tagLen*8)
		defer params.Free()
		if err := inc.p.DecryptInit(s, []*p11.Mechanism{p11.NewMechanism(p11.CKM_AES_GCM, params)}, k.work); err != nil {
			return err
		}
		pt, err := inc.p.Decrypt(s, c.sealed)
		if err != nil {
			return inc.decryptFailure(s, keyID, err)
		}
		out = pt
		return nil
	})
	return out, err
}

// Health runs an AES-GCM encrypt and decrypt of a random probe inside the HSM with the current
// generation's token object (not its session copy), so a token that went away is noticed even while
// the copies still answer, and recovery starts.
func (w *Wrapper) Health(ctx context.Context) error {
	probe := make([]byte, 32)
	if _, err := rand.Read(probe); err != nil {
		return err
	}
	return w.withSession(ctx, "health", func(inc *incarnation, s p11.SessionHandle, ks *keySet) error {
		if _, err := inc.p.GetTokenInfo(inc.slot); err != nil {
			return err
		}
		k := ks.current
		if k == nil {
			return fmt.Errorf("no key generation labelled %s.N on the token: %w", w.cfg.KeyLabel, kms.ErrUnavailable)
		}
		iv := make([]byte, ivLen)
		if _, err := rand.Read(iv); err != nil {
			return err
		}
		mech := func() (*p11.GCMParams, []*p11.Mechanism) {
			params := p11.NewGCMParams(iv, aad(formatV1, k.id), tagLen*8)
			return params, []*p11.Mechanism{p11.NewMechanism(p11.CKM_AES_GCM, params)}
		}
		ep, em := mech()
		defer ep.Free()
		if err := inc.p.EncryptInit(s, em, k.obj); err != nil {
			return err
		}
		sealed, err := inc.p.Encrypt(s, probe)
		if err != nil {
			return err
		}
		dp, dm := mech()
		defer dp.Free()
		if err := inc.p.DecryptInit(s, dm, k.obj); err != nil {
			return err
		}
		got, err := inc.p.Decrypt(s, sealed)
		if err != nil {
			return err
		}
		if !bytes.Equal(got, probe) {
			return fmt.Errorf("health probe round trip returned other bytes: %w", kms.ErrUnavailable)
		}
		return nil
	})
}

// decryptFailure tells a ciphertext that does not authenticate from an HSM in trouble. HSMs differ:
// SoftHSM answers a GCM tag mismatch with CKR_GENERAL_ERROR, which elsewhere means the device failed.
// So unless the code says "bad data" outright, the session and token are probed: if they answer, the
// ciphertext was at fault (InvalidArgument, and the plugin stays healthy); if not, the probe's error
// starts recovery.
func (inc *incarnation) decryptFailure(s p11.SessionHandle, keyID string, err error) error {
	invalid := fmt.Errorf("ciphertext does not authenticate under key ID %q: %w", truncate(keyID, 128), kms.ErrInvalid)
	if isCode(err, p11.CKR_ENCRYPTED_DATA_INVALID) || isCode(err, p11.CKR_ENCRYPTED_DATA_LEN_RANGE) {
		return invalid
	}
	if !isCode(err, p11.CKR_GENERAL_ERROR) && !isCode(err, p11.CKR_FUNCTION_FAILED) {
		return err
	}
	if _, perr := inc.p.GetSessionInfo(s); perr != nil {
		return perr
	}
	if _, perr := inc.p.GetTokenInfo(inc.slot); perr != nil {
		return perr
	}
	return invalid
}

// KeyID returns the newest generation's key ID.
func (w *Wrapper) KeyID(context.Context) (string, error) {
	inc := w.cur.Load()
	if inc == nil {
		return "", fmt.Errorf("HSM unavailable (%s): %w", w.Reason(), kms.ErrUnavailable)
	}
	if k := inc.keys.Load().current; k != nil {
		return k.id, nil
	}
	return "", fmt.Errorf("no key generation labelled %s.N on the token: %w", w.cfg.KeyLabel, kms.ErrUnavailable)
}

// Reason says why the HSM is unavailable ("" while it is available).
func (w *Wrapper) Reason() string {
	if w.cur.Load() != nil {
		return ""
	}
	r, _ := w.reason.Load().(string)
	return r
}

// PoolStats reports the sessions in use and idle.
func (w *Wrapper) PoolStats() (inUse, idle int) {
	inc := w.cur.Load()
	if inc == nil {
		return 0, 0
	}
	return int(inc.inUse.Load()), len(inc.idle)
}

// Recoveries counts completed recoveries since start.
func (w *Wrapper) Recoveries() uint64 { return w.recoveries.Load() }

// Close stops the background work, waits for in-flight calls and finalizes the module.
func (w *Wrapper) Close() error {
	w.closeOnce.Do(func() {
		close(w.stop)
		if inc := w.cur.Swap(nil); inc != nil {
			w.reason.Store("closed")
			close(inc.closing)
			inc.mu.Lock()
			inc.closed = true
			inc.mu.Unlock()
		}
		w.wg.Wait()
		w.p.Finalize()
		w.p.Destroy()
	})
	return nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
