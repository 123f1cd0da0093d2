package render

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"strings"
	"testing"
	"time"

	pkcs12 "software.sslmate.com/src/go-pkcs12"

	"github.com/keyward/keyward/internal/fault"
)

// bundle is a CA and a leaf it signed, with the leaf's key.
type bundle struct {
	ca, leaf *x509.Certificate
	key      crypto.Signer
}

func newBundle(t *testing.T, rsaLeaf bool) bundle {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, caKey.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	var key crypto.Signer
	if rsaLeaf {
		key, err = rsa.GenerateKey(rand.Reader, 2048)
	} else {
		key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	}
	if err != nil {
		t.Fatal(err)
	}
	lt := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "app.payments.svc"}, DNSNames: []string{"app.payments.svc"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	leafDER, err := x509.CreateCertificate(rand.Reader, lt, ca, key.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(leafDER)
	return bundle{ca: ca, leaf: leaf, key: key}
}

func pemOf(typ string, der []byte) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}))
}

func (b bundle) keyPEM(t *testing.T, typ string) string {
	t.Helper()
	var der []byte
	var err error
	switch typ {
	case "PRIVATE KEY":
		der, err = x509.MarshalPKCS8PrivateKey(b.key)
	case "RSA PRIVATE KEY":
		der = x509.MarshalPKCS1PrivateKey(b.key.(*rsa.PrivateKey))
	case "EC PRIVATE KEY":
		der, err = x509.MarshalECPrivateKey(b.key.(*ecdsa.PrivateKey))
	}
	if err != nil {
		t.Fatal(err)
	}
	return pemOf(typ, der)
}

// PEM in (the chain in any order, the key in any of its PEM forms, openssl's text between blocks),
// PKCS#12 out: decoding the keystore gives back the key, the certificate that matches it and the
// chain; the wrong password does not decode it.
func TestPKCS12RoundTrip(t *testing.T) {
	for _, tc := range []struct {
		rsa     bool
		keyType string
	}{{false, "PRIVATE KEY"}, {false, "EC PRIVATE KEY"}, {true, "RSA PRIVATE KEY"}, {true, "PRIVATE KEY"}} {
		t.Run(tc.keyType, func(t *testing.T) {
			b := newBundle(t, tc.rsa)
			in := "Bag Attributes\n    friendlyName: ca\n" + pemOf("CERTIFICATE", b.ca.Raw) + b.keyPEM(t, tc.keyType) + pemOf("CERTIFICATE", b.leaf.Raw)
			out, err := Convert(PKCS12, []byte(in), "s3cret")
			if err != nil {
				t.Fatal(err)
			}
			key, leaf, chain, err := pkcs12.DecodeChain(out, "s3cret")
			if err != nil {
				t.Fatal(err)
			}
			if !leaf.Equal(b.leaf) || len(chain) != 1 || !chain[0].Equal(b.ca) || !key.(interface{ Equal(crypto.PrivateKey) bool }).Equal(b.key) {
				t.Fatal("the keystore does not hold the key, its certificate and the chain")
			}
			if _, _, _, err := pkcs12.DecodeChain(out, "wrong"); err == nil {
				t.Fatal("the keystore decodes with another password")
			}
			again, err := Convert(PKCS12, []byte(in), "s3cret")
			if err != nil || bytes.Equal(again, out) || !PKCS12.Randomized() {
				t.Fatalf("a second encoding of the same input: %v, same bytes %v (PKCS#12 draws fresh salts: callers compare inputs)", err, bytes.Equal(again, out))
			}
		})
	}
}

// Conversions refuse what they cannot convert, saying why in terms of the input's structure, never
// its bytes.
func TestConvertRefuses(t *testing.T) {
	b, other := newBundle(t, false), newBundle(t, false)
	cert, key := pemOf("CERTIFICATE", b.leaf.Raw), b.keyPEM(t, "PRIVATE KEY")
	p12, err := pkcs12.Modern.Encode(b.key, b.leaf, nil, "pw")
	if err != nil {
		t.Fatal(err)
	}
	slow, err := pkcs12.Modern.WithIterations(MaxPKCS12Iterations+1).Encode(b.key, b.leaf, nil, "pw")
	if err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct {
		f        Format
		in, pass string
		msg      string
	}{
		"pkcs12: no PEM":             {PKCS12, canary, "", "no PEM block"},
		"pkcs12: no key":             {PKCS12, cert, "", "no private key"},
		"pkcs12: no certificate":     {PKCS12, key, "", "no certificate"},
		"pkcs12: two keys":           {PKCS12, cert + key + other.keyPEM(t, "PRIVATE KEY"), "", "second private key"},
		"pkcs12: no matching cert":   {PKCS12, pemOf("CERTIFICATE", other.leaf.Raw) + key, "", "no certificate matches the private key"},
		"pkcs12: another block":      {PKCS12, cert + key + pemOf("CANARY SECRET", []byte(canary)), "", "another type"},
		"pkcs12: encrypted key":      {PKCS12, cert + "-----BEGIN EC PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nAAAA\n-----END EC PRIVATE KEY-----\n", "", "headers"},
		"pkcs12: a broken cert":      {PKCS12, pemOf("CERTIFICATE", []byte(canary)) + key, "", "not a certificate"},
		"pkcs12: a broken key":       {PKCS12, cert + pemOf("PRIVATE KEY", []byte(canary)), "", "not a private key"},
		"pem: PEM already":           {PEM, cert, "", "PEM already"},
		"pem: neither":               {PEM, canary, "", "neither PKCS#12, DER certificates nor a DER private key"},
		"pem: wrong password":        {PEM, string(p12), canary, "password is wrong"},
		"pem: iterations past bound": {PEM, string(slow), "pw", "iterates"},
		"unknown format":             {Format("jks"), cert, "", "unknown format"},
	} {
		t.Run(name, func(t *testing.T) {
			start := time.Now()
			_, err := Convert(tc.f, []byte(tc.in), tc.pass)
			if !errors.Is(err, fault.ErrInvalid) || !strings.Contains(err.Error(), tc.msg) || strings.Contains(err.Error(), "CANARY") {
				t.Fatalf("err = %v, want InvalidArgument mentioning %q and no value", err, tc.msg)
			}
			if d := time.Since(start); d > 2*time.Second {
				t.Fatalf("took %s", d)
			}
		})
	}
}

// PKCS#12 in (Modern and Legacy encodings, with a chain), PEM out: the key as PKCS#8 first, then the
// certificate that matches it, then the chain.
func TestPEMFromPKCS12(t *testing.T) {
	b := newBundle(t, true)
	for name, enc := range map[string]*pkcs12.Encoder{"modern": pkcs12.Modern, "legacy": pkcs12.Legacy, "modern2026": pkcs12.Modern2026} {
		t.Run(name, func(t *testing.T) {
			p12, err := enc.Encode(b.key, b.leaf, []*x509.Certificate{b.ca}, "changeit")
			if err != nil {
				t.Fatal(err)
			}
			out, err := Convert(PEM, p12, "changeit")
			if err != nil {
				t.Fatal(err)
			}
			blocks := decodeAll(t, out)
			if len(blocks) != 3 || blocks[0].Type != "PRIVATE KEY" || blocks[1].Type != "CERTIFICATE" || blocks[2].Type != "CERTIFICATE" ||
				!bytes.Equal(blocks[1].Bytes, b.leaf.Raw) || !bytes.Equal(blocks[2].Bytes, b.ca.Raw) {
				t.Fatalf("blocks %v", blocks)
			}
			k, err := x509.ParsePKCS8PrivateKey(blocks[0].Bytes)
			if err != nil || !k.(*rsa.PrivateKey).Equal(b.key) {
				t.Fatalf("the key: %v", err)
			}
		})
	}
}

// DER in: one or more certificates, or a private key (PKCS#1, SEC 1 or PKCS#8), each as PEM.
func TestPEMFromDER(t *testing.T) {
	b := newBundle(t, true)
	out, err := Convert(PEM, append(bytes.Clone(b.leaf.Raw), b.ca.Raw...), "")
	if err != nil {
		t.Fatal(err)
	}
	if blocks := decodeAll(t, out); len(blocks) != 2 || !bytes.Equal(blocks[0].Bytes, b.leaf.Raw) || !bytes.Equal(blocks[1].Bytes, b.ca.Raw) {
		t.Fatalf("certificates: %q", out)
	}
	out, err = Convert(PEM, x509.MarshalPKCS1PrivateKey(b.key.(*rsa.PrivateKey)), "")
	if err != nil {
		t.Fatal(err)
	}
	blocks := decodeAll(t, out)
	if len(blocks) != 1 || blocks[0].Type != "PRIVATE KEY" {
		t.Fatalf("key: %v", blocks)
	}
	if k, err := x509.ParsePKCS8PrivateKey(blocks[0].Bytes); err != nil || !k.(*rsa.PrivateKey).Equal(b.key) {
		t.Fatalf("the key: %v", err)
	}
}

func decodeAll(t *testing.T, b []byte) []*pem.Block {
	t.Helper()
	var out []*pem.Block
	for {
		var blk *pem.Block
		if blk, b = pem.Decode(b); blk == nil {
			break
		}
		out = append(out, blk)
	}
	if len(bytes.TrimSpace(b)) != 0 {
		t.Fatalf("trailing bytes after the PEM blocks")
	}
	return out
}

// A PKCS#12 decode the pre-scan cannot bound (a key bag inside encrypted content) runs one at a
// time and is abandoned after pkcs12Timeout: the publish fails with ResourceExhausted, the next
// decode waits for the slot (Unavailable if it stays held), and the slot comes back when the slow
// decode ends.
func TestPKCS12DecodeIsBoundedInTimeAndConcurrency(t *testing.T) {
	b := newBundle(t, false)
	p12, err := pkcs12.Modern.Encode(b.key, b.leaf, nil, "pw")
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	defer func(f func([]byte, string) (any, *x509.Certificate, []*x509.Certificate, error), d time.Duration) {
		decodeChain, pkcs12Timeout = f, d
	}(decodeChain, pkcs12Timeout)
	real := decodeChain
	decodeChain = func(in []byte, pw string) (any, *x509.Certificate, []*x509.Certificate, error) {
		<-release
		return real(in, pw)
	}
	pkcs12Timeout = 100 * time.Millisecond
	if _, err := Convert(PEM, p12, "pw"); !errors.Is(err, fault.ErrTooLarge) {
		t.Fatalf("a slow decode: %v", err)
	}
	if _, err := Convert(PEM, p12, "pw"); !errors.Is(err, fault.ErrUnavailable) {
		t.Fatalf("a decode while the slow one holds the slot: %v", err)
	}
	close(release)
	pkcs12Timeout = 10 * time.Second
	if out, err := Convert(PEM, p12, "pw"); err != nil || !bytes.Contains(out, []byte("PRIVATE KEY")) {
		t.Fatalf("after the slow decode ended: %v", err)
	}
}
