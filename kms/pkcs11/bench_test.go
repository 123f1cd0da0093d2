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
