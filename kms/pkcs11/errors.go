package pkcs11

import (
	"errors"
	"fmt"

	p11 "github.com/miekg/pkcs11"

	"github.com/keyward/keyward/internal/fault"
)

// classify maps a PKCS#11 return value onto the kms error vocabulary, in this one place.
// lost reports whether the session pool must be rebuilt (the token, the session or the login is gone).
func classify(op string, err error) (wrapped error, lost bool) {
	var pe p11.Error
	if !errors.As(err, &pe) {
		return fmt.Errorf("%s: %v: %w", op, err, fault.ErrUnavailable), false
	}
	switch uint(pe) {
	case p11.CKR_ENCRYPTED_DATA_INVALID, p11.CKR_ENCRYPTED_DATA_LEN_RANGE, p11.CKR_DATA_LEN_RANGE,
		p11.CKR_DATA_INVALID:
		// Bad input: the HSM is fine.
		return fmt.Errorf("%s: %v: %w", op, pe, fault.ErrInvalid), false
	case p11.CKR_SESSION_HANDLE_INVALID, p11.CKR_SESSION_CLOSED, p11.CKR_DEVICE_REMOVED,
		p11.CKR_TOKEN_NOT_PRESENT, p11.CKR_TOKEN_NOT_RECOGNIZED, p11.CKR_USER_NOT_LOGGED_IN,
		p11.CKR_DEVICE_ERROR, p11.CKR_CRYPTOKI_NOT_INITIALIZED, p11.CKR_SLOT_ID_INVALID,
		p11.CKR_KEY_HANDLE_INVALID, p11.CKR_OBJECT_HANDLE_INVALID, p11.CKR_GENERAL_ERROR,
		p11.CKR_DEVICE_MEMORY, p11.CKR_PIN_EXPIRED:
		return fmt.Errorf("%s: %v: %w", op, pe, fault.ErrUnavailable), true
	default:
		return fmt.Errorf("%s: %v: %w", op, pe, fault.ErrUnavailable), false
	}
}

func isCode(err error, code uint) bool {
	var pe p11.Error
	return errors.As(err, &pe) && uint(pe) == code
}
