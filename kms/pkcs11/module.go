package pkcs11

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	p11 "github.com/miekg/pkcs11"
	"go.uber.org/zap"

	"github.com/keyward/keyward/kms"
)

// Wrapper is a kms.KeyWrapper whose keys are AES-256 objects in a PKCS#11 token.
//
// It owns the module for the process: one login, a bounded pool of sessions, and recovery. When the
// token, a session or the login is lost, the current "incarnation" (initialized module, sessions, key
// handles) is torn down once its in-flight calls finish, and a new one is built with backoff
// (C_Finalize + C_Initialize: some HSMs, SoftHSM among them, only see a token again after that).
// Meanwhile calls fail fast with fault.ErrUnavailable.
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
