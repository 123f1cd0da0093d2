package pkcs11

import (
	"context"
	"errors"
	"fmt"

	p11 "github.com/miekg/pkcs11"

	"github.com/keyward/keyward/internal/fault"
)

// withIncarnation runs f on the current incarnation, failing fast while there is none.
func (w *Wrapper) withIncarnation(op string, f func(*incarnation) error) error {
	inc := w.cur.Load()
	if inc == nil {
		return fmt.Errorf("%s: HSM unavailable (%s): %w", op, w.Reason(), fault.ErrUnavailable)
	}
	// TryRLock: while inc is being torn down (a writer waits for in-flight calls, possibly hung ones),
	// a late caller fails fast instead of queueing behind the writer.
	if !inc.mu.TryRLock() {
		return fmt.Errorf("%s: HSM unavailable (recovering): %w", op, fault.ErrUnavailable)
	}
	defer inc.mu.RUnlock()
	if inc.closed {
		return fmt.Errorf("%s: HSM unavailable (recovering): %w", op, fault.ErrUnavailable)
	}
	err := f(inc)
	if err == nil || errors.Is(err, fault.ErrInvalid) || errors.Is(err, fault.ErrUnavailable) {
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
		if err != nil && !errors.Is(err, fault.ErrInvalid) && !errors.Is(err, fault.ErrUnavailable) {
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
		return 0, fmt.Errorf("HSM session pool closing: %w", fault.ErrUnavailable)
	case <-ctx.Done():
		return 0, fmt.Errorf("waiting for an HSM session: %v: %w", ctx.Err(), fault.ErrUnavailable)
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
