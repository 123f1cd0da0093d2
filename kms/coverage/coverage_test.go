package coverage

import (
	"context"
	"fmt"
	"sort"
	"testing"

	"google.golang.org/protobuf/proto"
	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"

	"github.com/keyward/keyward/test/harness"
)

func kmsValue(t *testing.T, provider, keyID string) []byte {
	b, err := proto.Marshal(&kmstypes.EncryptedObject{EncryptedData: []byte("sealed"), KeyID: keyID, EncryptedDEKSource: []byte("wrapped")})
	if err != nil {
		t.Fatal(err)
	}
	return append([]byte("k8s:enc:kms:v2:"+provider+":"), b...)
}

// Scan against a real etcd: counts per provider/key ID across several pages (500 keys each), lists
// every unencrypted and malformed key, and stays inside its prefix.
func TestScanCountsEveryValueUnderThePrefix(t *testing.T) {
	e := harness.EtcdT(t)
	ctx := context.Background()
	put := func(k string, v []byte) {
		if _, err := e.Client.Put(ctx, k, string(v)); err != nil {
			t.Fatal(err)
		}
	}
	var wantPlain, wantBad []string
	for i := range 600 {
		put(fmt.Sprintf("/registry/secrets/a/s%04d", i), kmsValue(t, "keyward", "kek.1.aa"))
	}
	for i := range 400 {
		put(fmt.Sprintf("/registry/secrets/b/s%04d", i), kmsValue(t, "keyward", "kek.2.bb"))
	}
	put("/registry/secrets/c/old-provider", kmsValue(t, "legacy", "kek.2.bb"))
	for i := range 200 {
		k := fmt.Sprintf("/registry/secrets/c/plain%04d", i)
		put(k, []byte("k8s\x00\n\x0c\n\x02v1\x12\x06Secret"))
		wantPlain = append(wantPlain, k)
	}
	for i := range 3 {
		k := fmt.Sprintf("/registry/secrets/d/bad%d", i)
		put(k, []byte("k8s:enc:kms:v2:keyward:\xff\xff"))
		wantBad = append(wantBad, k)
	}
	put("/registry/configmaps/a/c", []byte("plain, outside the prefix"))
	put("/registry/secretsx/a/c", []byte("plain, a sibling prefix"))

	r, err := Scan(ctx, e.Client, "")
	if err != nil {
		t.Fatal(err)
	}
	if r.Total != 1204 || r.ByKeyID["keyward/kek.1.aa"] != 600 || r.ByKeyID["keyward/kek.2.bb"] != 400 || r.ByKeyID["legacy/kek.2.bb"] != 1 {
		t.Fatalf("report: total %d, by key ID %v", r.Total, r.ByKeyID)
	}
	if r.CountKeyID("kek.2.bb") != 401 || r.CountKeyID("kek.9.zz") != 0 {
		t.Fatalf("CountKeyID: %d, %d", r.CountKeyID("kek.2.bb"), r.CountKeyID("kek.9.zz"))
	}
	sort.Strings(wantPlain)
	if fmt.Sprint(r.Unencrypted) != fmt.Sprint(wantPlain) || fmt.Sprint(r.Malformed) != fmt.Sprint(wantBad) {
		t.Fatalf("unencrypted %d %v..., malformed %v", len(r.Unencrypted), r.Unencrypted[:min(3, len(r.Unencrypted))], r.Malformed)
	}
	other, err := Scan(ctx, e.Client, "/registry/configmaps/")
	if err != nil || other.Total != 1 || len(other.Unencrypted) != 1 {
		t.Fatalf("configmaps prefix: %+v, %v", other, err)
	}
}
