package pkcs11

import (
	"context"
	"testing"
)

// BenchmarkWrapUnwrap measures one encrypt+decrypt pair through the session pool (session copies),
// next to BenchmarkWrapUnwrapTokenObject (no copies): the ratio is what the copies buy.
func BenchmarkWrapUnwrap(b *testing.B) { benchPair(b, true) }

func BenchmarkWrapUnwrapTokenObject(b *testing.B) { benchPair(b, false) }

func benchPair(b *testing.B, copies bool) {
	tk := newTokenB(b, copies)
	ctx := context.Background()
	pt := make([]byte, 32)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			ct, id, err := tk.Wrap(ctx, pt)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := tk.Unwrap(ctx, ct, id); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkSignCheckpoint measures one audit checkpoint signature inside the HSM (ECDSA P-256 over
// SHA-256, raw r||s to DER, checked against the public key), one at a time as the audit log signs.
func BenchmarkSignCheckpoint(b *testing.B) {
	w := newTokenB(b, true, func(c *Config, a *Admin) {
		c.AuditCheckpointKeyLabel = "audit-cp"
		a.cpLabel = c.AuditCheckpointKeyLabel
		if _, err := a.CreateCheckpointKey(); err != nil {
			b.Fatal(err)
		}
	})
	msg := []byte(`keyward-audit-checkpoint-v1` + "\n" + `{"node":"node-1","stream":"kms","key_id":"0123456789abcdef","seq":1000,"mac":"00","time":"2026-12-01T00:00:00Z"}`)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := w.SignCheckpoint(ctx, msg); err != nil {
			b.Fatal(err)
		}
	}
}
