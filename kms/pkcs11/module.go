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

var (
	_ kms.KeyVetter = (*Wrapper)(nil)
	_ kms.Liveness  = (*Wrapper)(nil)
)

// Wrapper is a kms.KeyWrapper whose keys are AES-256 objects in a PKCS#11 token.
//
// It owns the module for the process: one login, a bounded pool of sessions, and recovery. When the
// token, a session or the login is lost, the current "incarnation" (initialized module, sessions, key
// handles) is torn down once its in-flight calls finish, and a new one is built with backoff
// (C_Finalize + C_Initialize: some HSMs, SoftHSM among them, only see a token again after that).
// Meanwhile calls fail fast with fault.ErrUnavailable.
//
// A PKCS#11 call cannot be cancelled, so the waits around them on the health and recovery paths are
// bounded by Config.CallTimeout instead: a health round trip that does not return in time starts
// recovery; recovery waits that long for in-flight calls to drain and then rebuilds beside the calls
// still hung, without C_Finalize (PKCS#11 leaves C_Finalize undefined while other calls run; the
// module is finalized again once they have all returned); and a re-initialization that hangs makes
// Live fail, so that keyward-kms's /livez gets the process restarted.
type Wrapper struct {
	cfg Config
	pin string
	log *zap.Logger
	p   *p11.Ctx

	cur        atomic.Pointer[incarnation]
	reason     atomic.Value // string: why cur is nil
	recoveries atomic.Uint64
	stop       chan struct{}
	wg         sync.WaitGroup
	closeOnce  sync.Once

	// finMu orders C_Finalize against closing the sessions of incarnations abandoned with calls still
	// in flight; abandoned counts those incarnations (no C_Finalize while it is above 0).
	finMu     sync.Mutex
	abandoned int
	hung      sync.WaitGroup // one per abandoned incarnation
	finalized bool           // Close finalized and destroyed the module
	// stuckSince is when the recovery attempt now inside the module started (unix nanos), or 0.
	stuckSince atomic.Int64

	refusals atomic.Pointer[[]kms.KeyRefusal]
	warnedMu sync.Mutex
	warned   map[string]bool // refused objects already logged
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
	// keySession owns the session-object copies of the keys; used only under refreshMu.
	refreshMu  sync.Mutex
	keySession p11.SessionHandle
	keys       atomic.Pointer[keySet]
	graveyard  []p11.ObjectHandle
}

type key struct {
	id   string
	gen  int
	obj  p11.ObjectHandle // the token object
	work p11.ObjectHandle // what operations use: a session copy, or obj
	aad  []byte           // the GCM additional data of format v1 under id (read-only, shared)
}

type keySet struct {
	current *key
	byID    map[string]*key
	refused []kms.KeyRefusal
	// checkpoint is the audit checkpoint key (nil when none is configured; see checkpoint.go).
	checkpoint *checkpointKey
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
	inc.refreshMu.Lock()
	err = w.reloadKeys(inc)
	inc.refreshMu.Unlock()
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
	w.drain(old)
	w.finalize()
	backoff := 100 * time.Millisecond
	for attempt := 1; ; attempt++ {
		select {
		case <-w.stop:
			return
		case <-time.After(backoff):
		}
		inc, err := w.openBounded()
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
		w.finalize()
		backoff = min(backoff*2, 5*time.Second)
	}
}

// drain takes old out of service once its in-flight calls return, waiting at most CallTimeout. Calls
// still inside the module then are abandoned: recovery goes on beside them, and their sessions are
// closed when they return.
func (w *Wrapper) drain(old *incarnation) {
	drained := make(chan struct{})
	go func() {
		old.mu.Lock() // waits for in-flight calls to return
		old.closed = true
		old.mu.Unlock()
		close(drained)
	}()
	select {
	case <-drained:
		return
	case <-time.After(w.cfg.CallTimeout.Duration):
	}
	w.finMu.Lock()
	w.abandoned++
	w.hung.Add(1)
	w.finMu.Unlock()
	w.log.Warn("HSM calls have not returned within the call timeout; recovering beside them (no C_Finalize until they return)",
		zap.Duration("call_timeout", w.cfg.CallTimeout.Duration), zap.Int64("sessions_in_use", old.inUse.Load()))
	go func() {
		<-drained
		w.finMu.Lock()
		defer w.finMu.Unlock()
		if !w.finalized { // the module was not finalized since: old's handles are still its own
			old.closeSessions()
		}
		w.log.Info("abandoned HSM calls returned")
		w.abandoned--
		w.hung.Done()
	}()
}

// closeSessions closes an abandoned incarnation's sessions (and so its session-object key copies).
func (inc *incarnation) closeSessions() {
	for {
		select {
		case s := <-inc.idle:
			inc.p.CloseSession(s)
		default:
			inc.p.CloseSession(inc.keySession)
			return
		}
	}
}

// finalize calls C_Finalize unless calls of an abandoned incarnation may still be inside the module.
func (w *Wrapper) finalize() {
	w.finMu.Lock()
	defer w.finMu.Unlock()
	if w.abandoned == 0 && !w.finalized {
		w.p.Finalize()
	}
}

// openBounded is open for recovery: while an attempt is inside the module for longer than
// CallTimeout, Reason says so and Live fails. It waits for the attempt (a second one beside a hung
// call would only pile up) unless the wrapper is closed.
func (w *Wrapper) openBounded() (*incarnation, error) {
	type result struct {
		inc *incarnation
		err error
	}
	start := time.Now()
	w.stuckSince.Store(start.UnixNano())
	defer w.stuckSince.Store(0)
	done := make(chan result, 1)
	go func() {
		inc, err := w.open()
		done <- result{inc, err}
	}()
	timeout := time.After(w.cfg.CallTimeout.Duration)
	for {
		select {
		case r := <-done:
			return r.inc, r.err
		case <-timeout: // Live and Reason say so from now on
			w.log.Warn("HSM re-initialization hung", zap.Duration("call_timeout", w.cfg.CallTimeout.Duration))
		case <-w.stop:
			return nil, errors.New("closed")
		}
	}
}

// Live returns an error while recovery is stuck: a re-initialization of the module has been inside a
// PKCS#11 call for longer than CallTimeout (kms.Liveness; keyward-kms's /livez reports it, so that
// the kubelet restarts the process: only a new process gets past such a call).
func (w *Wrapper) Live() error {
	if t := w.stuckSince.Load(); t != 0 {
		if d := time.Since(time.Unix(0, t)); d > w.cfg.CallTimeout.Duration {
			return fmt.Errorf("HSM recovery stuck: a PKCS#11 call has not returned for %s", d.Round(time.Millisecond))
		}
	}
	return nil
}

// Reason says why the HSM is unavailable ("" while it is available).
func (w *Wrapper) Reason() string {
	if w.cur.Load() != nil {
		return ""
	}
	if err := w.Live(); err != nil {
		return err.Error()
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

// Close stops the background work, waits (at most CallTimeout each) for in-flight calls and the
// background work, and finalizes the module unless a call is still inside it.
func (w *Wrapper) Close() error {
	w.closeOnce.Do(func() {
		close(w.stop)
		if inc := w.cur.Swap(nil); inc != nil {
			w.reason.Store("closed")
			close(inc.closing)
			w.drain(inc)
		}
		done := make(chan struct{})
		go func() { w.wg.Wait(); w.hung.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(w.cfg.CallTimeout.Duration):
			w.log.Warn("closing with a PKCS#11 call still hung in the background; the module is left loaded")
			return
		}
		w.finMu.Lock()
		defer w.finMu.Unlock()
		if w.abandoned > 0 {
			w.log.Warn("closing with PKCS#11 calls still hung; the module is left loaded")
			return
		}
		w.finalized = true
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
