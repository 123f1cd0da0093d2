package fault

import (
	"context"
	"errors"
	"fmt"
	"testing"
)

func TestClassOf(t *testing.T) {
	for err, want := range map[error]Class{
		nil: OK, fmt.Errorf("x: %w", ErrUnauthenticated): Unauthenticated, fmt.Errorf("x: %w", ErrDenied): Denied,
		fmt.Errorf("x: %w", ErrInvalid): Invalid, fmt.Errorf("x: %w", ErrNotFound): NotFound,
		fmt.Errorf("x: %w", ErrTooLarge): TooLarge, fmt.Errorf("x: %w", ErrUnavailable): Unavailable,
		context.DeadlineExceeded: DeadlineExceeded, context.Canceled: Canceled, errors.New("?"): Internal,
		Withdrawn(fmt.Errorf("no grant: %w", ErrDenied)): Denied,
	} {
		if got := ClassOf(err); got != want {
			t.Errorf("ClassOf(%v) = %v, want %v", err, got, want)
		}
	}
	if Denied.String() != "PermissionDenied" || TooLarge.String() != "ResourceExhausted" || Class(99).String() != "Internal" {
		t.Fatal("class names")
	}
}

func TestWithdrawn(t *testing.T) {
	base := fmt.Errorf("no grant: %w", ErrDenied)
	w := Withdrawn(base)
	if !errors.Is(w, ErrWithdrawn) || !errors.Is(w, ErrDenied) || w.Error() != base.Error() || Withdrawn(nil) != nil {
		t.Fatal(w)
	}
	if errors.Is(base, ErrWithdrawn) {
		t.Fatal("the mark leaked into the wrapped error")
	}
}

func TestTruncate(t *testing.T) {
	if Truncate("abc", 3) != "abc" || Truncate("abcd", 3) != "abc..." || Truncate("aé", 2) != "a..." {
		t.Fatal(Truncate("aé", 2))
	}
}
