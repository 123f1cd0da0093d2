package envelope

import (
	"errors"
	"testing"

	"google.golang.org/protobuf/proto"
	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"

	"github.com/keyward/keyward/internal/fault"
)

// annotationKey is keyward-kms's annotation (kms/plugin); any key does for the codec.
const annotationKey = "kms.keyward.dev"

func stored(t testing.TB, o *kmstypes.EncryptedObject) []byte {
	b, err := proto.Marshal(o)
	if err != nil {
		t.Fatal(err)
	}
	return append([]byte("k8s:enc:kms:v2:keyward:"), b...)
}

func TestParseStoredMatchesApiserverTypes(t *testing.T) {
	raw := stored(t, &kmstypes.EncryptedObject{EncryptedData: []byte("data"), KeyID: "kek.1.ab",
		EncryptedDEKSource: []byte("wrapped"), Annotations: map[string][]byte{annotationKey: []byte("v")}})
	env, err := ParseStored(raw)
	if err != nil || env.Provider != "keyward" || env.KeyID != "kek.1.ab" || string(env.WrappedDEK) != "wrapped" ||
		string(env.Annotations[annotationKey]) != "v" {
		t.Fatalf("ParseStored = %+v, %v", env, err)
	}
	for _, bad := range [][]byte{[]byte("plain"), []byte("k8s:enc:kms:v1:x:yy"), []byte("k8s:enc:identity")} {
		if _, err := ParseStored(bad); !errors.Is(err, ErrNotKMSv2) {
			t.Errorf("%q: %v", bad, err)
		}
	}
	if _, err := ParseStored([]byte("k8s:enc:kms:v2:keyward:\xff\xff")); !errors.Is(err, fault.ErrInvalid) {
		t.Errorf("garbage protobuf: %v", err)
	}
}

// FuzzParseStored: never panics; what it accepts, the apiserver's own protobuf type reads the same.
func FuzzParseStored(f *testing.F) {
	f.Add(stored(f, &kmstypes.EncryptedObject{KeyID: "k", EncryptedDEKSource: []byte("x")}))
	f.Add([]byte("k8s:enc:kms:v2:p:"))
	f.Fuzz(func(t *testing.T, raw []byte) {
		env, err := ParseStored(raw)
		if err != nil {
			return
		}
		var o kmstypes.EncryptedObject
		body := raw[len(StoredPrefix)+len(env.Provider)+1:]
		if proto.Unmarshal(body, &o) == nil && o.KeyID != env.KeyID {
			t.Fatalf("key ID %q, apiserver reads %q", env.KeyID, o.KeyID)
		}
	})
}
