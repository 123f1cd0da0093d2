package envelope

import (
	"bytes"
	"errors"
	"fmt"

	"google.golang.org/protobuf/encoding/protowire"

	"github.com/keyward/keyward/internal/fault"
)

// StoredPrefix starts every value kube-apiserver writes to etcd through a KMS v2 provider:
// "k8s:enc:kms:v2:<provider name>:" followed by an EncryptedObject protobuf.
const StoredPrefix = "k8s:enc:kms:v2:"

// Envelope is the header of a KMS v2 value stored in etcd: which provider and key ID wrapped its DEK.
// The encrypted data itself is not kept.
type Envelope struct {
	Provider    string
	KeyID       string
	Annotations map[string][]byte
	// WrappedDEK is the plugin's ciphertext (what keyward-kms Encrypt returned).
	WrappedDEK []byte
}

// ErrNotKMSv2 means a stored value is not KMS v2 envelope-encrypted (plaintext, identity, or another
// provider type such as aescbc or kms v1).
var ErrNotKMSv2 = errors.New("not a KMS v2 value")

// ParseStored reads the envelope header of a raw etcd value. It decodes the EncryptedObject protobuf
// (k8s.io/apiserver kmsv2/v2) with protowire, so tools need not link the apiserver.
func ParseStored(raw []byte) (Envelope, error) {
	if !bytes.HasPrefix(raw, []byte(StoredPrefix)) {
		return Envelope{}, ErrNotKMSv2
	}
	rest := raw[len(StoredPrefix):]
	i := bytes.IndexByte(rest, ':')
	if i <= 0 {
		return Envelope{}, fmt.Errorf("KMS v2 value without a provider name: %w", fault.ErrInvalid)
	}
	env := Envelope{Provider: string(rest[:i]), Annotations: map[string][]byte{}}
	b := rest[i+1:]
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return Envelope{}, fmt.Errorf("EncryptedObject: %v: %w", protowire.ParseError(n), fault.ErrInvalid)
		}
		b = b[n:]
		if typ != protowire.BytesType {
			n = protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return Envelope{}, fmt.Errorf("EncryptedObject: %v: %w", protowire.ParseError(n), fault.ErrInvalid)
			}
			b = b[n:]
			continue
		}
		v, n := protowire.ConsumeBytes(b)
		if n < 0 {
			return Envelope{}, fmt.Errorf("EncryptedObject: %v: %w", protowire.ParseError(n), fault.ErrInvalid)
		}
		b = b[n:]
		switch num {
		case 2:
			env.KeyID = string(v)
		case 3:
			env.WrappedDEK = v
		case 4:
			k, val, err := mapEntry(v)
			if err != nil {
				return Envelope{}, err
			}
			env.Annotations[k] = val
		}
	}
	if env.KeyID == "" {
		return Envelope{}, fmt.Errorf("EncryptedObject without a key ID: %w", fault.ErrInvalid)
	}
	return env, nil
}

func mapEntry(b []byte) (string, []byte, error) {
	var k string
	var v []byte
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 || typ != protowire.BytesType {
			return "", nil, fmt.Errorf("EncryptedObject annotation: %w", fault.ErrInvalid)
		}
		b = b[n:]
		val, n := protowire.ConsumeBytes(b)
		if n < 0 {
			return "", nil, fmt.Errorf("EncryptedObject annotation: %w", fault.ErrInvalid)
		}
		b = b[n:]
		switch num {
		case 1:
			k = string(val)
		case 2:
			v = val
		}
	}
	return k, v, nil
}
