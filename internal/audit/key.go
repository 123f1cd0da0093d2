package audit

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
)

// MinKeyBytes is the shortest HMAC key accepted.
const MinKeyBytes = 32

// ReadKey reads an HMAC key file (surrounding white space is not part of the key).
func ReadKey(path string) ([]byte, error) {
	key, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("audit key: %w", err)
	}
	key = bytes.TrimSpace(key)
	if len(key) < MinKeyBytes {
		return nil, fmt.Errorf("audit key %s: %d bytes after trimming surrounding whitespace, need at least %d (write keys as hex: openssl rand -hex 32)", path, len(key), MinKeyBytes)
	}
	return key, nil
}

// KeyID names a key without revealing it: the first 8 bytes of an HMAC of a fixed label, in hex.
func KeyID(key []byte) string {
	m := hmac.New(sha256.New, key)
	m.Write([]byte("keyward audit key id"))
	return hex.EncodeToString(m.Sum(nil)[:8])
}

// NodeKey derives one node's audit key from a master key that stays with the security team: the
// node is given only its own key (hex text, as a key file holds it), so root on one node cannot
// compute another node's key and forge its records, while a verifier holding the master can check
// every node's stream.
func NodeKey(master []byte, node string) []byte {
	m := hmac.New(sha256.New, master)
	m.Write([]byte("keyward audit node key v1\x00"))
	m.Write([]byte(node))
	return hex.AppendEncode(nil, m.Sum(nil))
}

// genesisMAC is the chain value before a stream's first record. It binds the stream's node and name,
// so a record from another node's or stream's file never verifies in this one's place, even under
// the same key.
func genesisMAC(key []byte, node, stream string) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte("keyward audit genesis v1\x00"))
	m.Write([]byte(node))
	m.Write([]byte{0})
	m.Write([]byte(stream))
	return m.Sum(nil)
}
