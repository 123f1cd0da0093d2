package main

import (
	"fmt"

	"github.com/keyward/keyward/broker/audit"
)

func auditCommand(e env, args []string) error {
	if len(args) == 0 || args[0] != "verify" {
		return fmt.Errorf("audit: want verify: %w", errUsage)
	}
	fs := newFlags("audit verify", e)
	keyFile := fs.String("key-file", "/etc/keyward/audit.key", "file holding the audit HMAC key")
	pos, err := parse(fs, args[1:])
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return fmt.Errorf("audit verify takes one FILE: %w", errUsage)
	}
	rep, err := audit.VerifyFile(pos[0], *keyFile)
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "%s: %d record(s), hash chain intact\n", pos[0], rep.Records)
	return nil
}
