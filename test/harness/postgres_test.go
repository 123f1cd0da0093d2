package harness_test

import (
	"context"
	"errors"
	"syscall"
	"testing"
	"time"

	"github.com/keyward/keyward/test/harness"
)

func TestPostgresLoginAndStop(t *testing.T) {
	t.Parallel()
	start := time.Now()
	pg := harness.PostgresT(t)
	t.Logf("postgres ready in %v on %s", time.Since(start).Round(time.Millisecond), pg.URL)
	ctx := ctxT(t)
	if err := pg.CanLogin(ctx, pg.User, pg.Password); err != nil {
		t.Fatalf("superuser login: %v", err)
	}
	if err := pg.CanLogin(ctx, pg.User, pg.Password+"x"); err == nil {
		t.Fatal("postgres accepted a wrong password")
	}
	if err := pg.CanLogin(ctx, "nobody-here", pg.Password); err == nil {
		t.Fatal("postgres accepted a user that does not exist")
	}
	for name, want := range map[string]bool{pg.User: true, "nobody-here": false} {
		got, err := pg.RoleExists(ctx, name)
		if err != nil || got != want {
			t.Fatalf("RoleExists(%s) = %v, %v; want %v", name, got, err, want)
		}
	}
	// Hold a backend open so Stop has a child to end too.
	conn, err := pg.Connect(ctx, pg.User, pg.Password)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	pgid := pg.Pid()
	pg.Stop()
	if err := syscall.Kill(-pgid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Fatalf("process group %d still has processes after Stop (kill 0: %v)", pgid, err)
	}
	if err := pg.CanLogin(ctx, pg.User, pg.Password); err == nil {
		t.Fatal("postgres answered after Stop")
	}
}
