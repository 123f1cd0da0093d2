package render

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"time"

	pkcs12 "software.sslmate.com/src/go-pkcs12"

	"github.com/keyward/keyward/internal/fault"
)

// Format is a conversion of a file's content.
type Format string

// The formats. The zero Format delivers the content as it is.
const (
	// PKCS12 turns PEM (certificates and one private key) into a PKCS#12 keystore, encoded with
	// go-pkcs12's Modern parameters (PBES2 with PBKDF2-HMAC-SHA-256 and AES-256-CBC, HMAC-SHA-256 MAC;
	// read by OpenSSL 1.1.1+, Java 12+ and Windows Server 2019+).
	PKCS12 Format = "pkcs12"
	// PEM turns a PKCS#12 file, DER certificates or a DER private key into PEM: the private key
	// (PKCS#8 "PRIVATE KEY") first, then the certificate that matches it, then the others in order.
	PEM Format = "pem"
)

// ParseFormat checks a format's name ("" is none).
func ParseFormat(s string) (Format, error) {
	switch f := Format(s); f {
	case "", PKCS12, PEM:
		return f, nil
	}
	return "", fmt.Errorf("format %.32q: want pkcs12 or pem: %w", s, fault.ErrInvalid)
}

// Randomized reports whether the format's output differs at each conversion of the same input
// (PKCS#12 draws fresh salts and IVs): a caller comparing outputs to detect a change must compare
// the inputs instead.
func (f Format) Randomized() bool { return f == PKCS12 }

// MaxPKCS12Iterations bounds the KDF iterations of a PKCS#12 input (OpenSSL writes 2048, Java
// 10000): a tenant's own file with a huge count would otherwise occupy the broker for hours.
const MaxPKCS12Iterations = 100_000

// pkcs12Timeout bounds a PKCS#12 decode whose iteration counts the pre-scan cannot see (a key bag
// inside encrypted content); pkcs12Slot admits one decode at a time, so such a file occupies one core
// at most.
var (
	pkcs12Timeout = 10 * time.Second
	pkcs12Slot    = make(chan struct{}, 1)
	decodeChain   = pkcs12.DecodeChain
)

// Convert converts in to f; password is the PKCS#12 file's (written for PKCS12, read for PEM).
// Errors wrap fault.ErrInvalid (fault.ErrTooLarge for a PKCS#12 that takes too long to decode) and
// say what is wrong with the input's structure, never its bytes. The output is the caller's, to
// clear after use.
func Convert(f Format, in []byte, password string) (out []byte, err error) {
	defer func() {
		if r := recover(); r != nil {
			out, err = nil, fmt.Errorf("converting to %s failed (a panic; nothing of it is reported): %w", f, fault.ErrInvalid)
		}
	}()
	switch f {
	case PKCS12:
		return toPKCS12(in, password)
	case PEM:
		return toPEM(in, password)
	}
	return nil, fmt.Errorf("unknown format %q: %w", f, fault.ErrInvalid)
}

func invalid(format string, args ...any) error {
	return fmt.Errorf("%s: %w", fmt.Sprintf(format, args...), fault.ErrInvalid)
}

// toPKCS12 reads PEM: CERTIFICATE blocks and exactly one private key (PRIVATE KEY, RSA PRIVATE KEY or
// EC PRIVATE KEY); text between blocks is ignored. The certificate whose public key matches the key
// is the keystore's certificate, the others its chain, in order.
func toPKCS12(in []byte, password string) ([]byte, error) {
	var (
		certs []*x509.Certificate
		key   crypto.Signer
		n     int
	)
	for rest := in; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		n++
		err := func() error {
			if len(b.Headers) > 0 {
				return invalid("PEM block %d has headers (an encrypted key?), which pkcs12 does not read", n)
			}
			switch b.Type {
			case "CERTIFICATE":
				c, err := x509.ParseCertificate(b.Bytes)
				if err != nil {
					return invalid("PEM block %d (CERTIFICATE) is not a certificate", n)
				}
				certs = append(certs, c)
			case "PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY":
				if key != nil {
					return invalid("PEM block %d is a second private key: a keystore holds one", n)
				}
				k, err := parseKey(b.Bytes)
				clear(b.Bytes) // the key's DER (a parsed certificate keeps its own: Raw)
				if err != nil {
					return invalid("PEM block %d (%s) is not a private key Keyward reads (RSA, ECDSA, Ed25519)", n, b.Type)
				}
				key = k
			default:
				return invalid("PEM block %d is of another type: want CERTIFICATE blocks and one PRIVATE KEY (RSA PRIVATE KEY, EC PRIVATE KEY)", n)
			}
			return nil
		}()
		if err != nil {
			return nil, err
		}
	}
	switch {
	case n == 0:
		return nil, invalid("the input has no PEM block")
	case key == nil:
		return nil, invalid("the input has no private key")
	case len(certs) == 0:
		return nil, invalid("the input has no certificate")
	}
	leaf := -1
	for i, c := range certs {
		if pub, ok := c.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); ok && pub.Equal(key.Public()) {
			leaf = i
			break
		}
	}
	if leaf < 0 {
		return nil, invalid("no certificate matches the private key")
	}
	chain := append(certs[:leaf:leaf], certs[leaf+1:]...)
	out, err := pkcs12.Modern.Encode(key, certs[leaf], chain, password)
	if err != nil {
		return nil, invalid("encoding PKCS#12 failed (a password with characters outside the Basic Multilingual Plane?)")
	}
	return out, nil
}

// parseKey reads a DER private key: PKCS#8, PKCS#1 (RSA) or SEC 1 (EC).
func parseKey(der []byte) (crypto.Signer, error) {
	var k any
	var err error
	if k, err = x509.ParsePKCS8PrivateKey(der); err != nil {
		if k, err = x509.ParsePKCS1PrivateKey(der); err != nil {
			if k, err = x509.ParseECPrivateKey(der); err != nil {
				return nil, errors.New("not a private key")
			}
		}
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, errors.New("not a signing key")
	}
	return s, nil
}

// toPEM reads a PKCS#12 file (with password), DER certificates (one or more, concatenated) or one
// DER private key.
func toPEM(in []byte, password string) ([]byte, error) {
	if bytes.HasPrefix(bytes.TrimSpace(in), []byte("-----BEGIN ")) {
		return nil, invalid("the input is PEM already (format pem reads PKCS#12 or DER)")
	}
	var (
		key   any
		certs []*x509.Certificate
	)
	if p, ok := parsePFX(in); ok {
		if err := p.check(); err != nil {
			return nil, err
		}
		k, leaf, chain, err := decodeBounded(in, password)
		if err != nil {
			return nil, err
		}
		key, certs = k, append([]*x509.Certificate{leaf}, chain...)
	} else if cs, err := x509.ParseCertificates(in); err == nil && len(cs) > 0 {
		certs = cs
	} else if k, err := parseKey(in); err == nil {
		key = k
	} else {
		return nil, invalid("the input is neither PKCS#12, DER certificates nor a DER private key")
	}
	var out bytes.Buffer
	if key != nil {
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return nil, invalid("the private key cannot be written as PKCS#8")
		}
		pem.Encode(&out, &pem.Block{Type: "PRIVATE KEY", Bytes: der})
		clear(der)
	}
	for _, c := range certs {
		pem.Encode(&out, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return out.Bytes(), nil
}

// decodeBounded decodes a PKCS#12 file, one at a time and within pkcs12Timeout. Past the timeout the
// decode goes on in the background, on its own copy of the input (cleared when it ends), holding the
// one slot: no other PKCS#12 decode starts meanwhile, so a crafted file costs one core at most.
func decodeBounded(in []byte, password string) (key any, leaf *x509.Certificate, chain []*x509.Certificate, err error) {
	timer := time.NewTimer(pkcs12Timeout)
	defer timer.Stop()
	select {
	case pkcs12Slot <- struct{}{}:
	case <-timer.C:
		return nil, nil, nil, fmt.Errorf("another PKCS#12 decode is still running: %w", fault.ErrUnavailable)
	}
	type result struct {
		key   any
		leaf  *x509.Certificate
		chain []*x509.Certificate
		err   error
	}
	done := make(chan result, 1)
	own := bytes.Clone(in)
	go func() {
		var r result
		defer func() {
			if p := recover(); p != nil {
				r = result{err: errors.New("panic")}
			}
			clear(own)
			<-pkcs12Slot
			done <- r
		}()
		r.key, r.leaf, r.chain, r.err = decodeChain(own, password)
	}()
	select {
	case r := <-done:
		switch {
		case errors.Is(r.err, pkcs12.ErrIncorrectPassword):
			return nil, nil, nil, invalid("the PKCS#12 password is wrong")
		case r.err != nil:
			return nil, nil, nil, invalid("the PKCS#12 file does not decode to one private key and its certificates")
		}
		return r.key, r.leaf, r.chain, nil
	case <-timer.C:
		return nil, nil, nil, fmt.Errorf("decoding the PKCS#12 input takes longer than %s (its KDF iteration counts): %w", pkcs12Timeout, fault.ErrTooLarge)
	}
}

// The PKCS#12 structures the pre-scan reads (RFC 7292), as far as they hold KDF parameters.
type (
	pfxPDU struct {
		Version  int
		AuthSafe contentInfo
		MacData  macData `asn1:"optional"`
	}
	contentInfo struct {
		ContentType asn1.ObjectIdentifier
		Content     asn1.RawValue `asn1:"tag:0,explicit,optional"`
	}
	macData struct {
		Mac struct {
			Algorithm pkix.AlgorithmIdentifier
			Digest    []byte
		}
		MacSalt    []byte
		Iterations int `asn1:"optional,default:1"`
	}
	encryptedData struct {
		Version int
		Info    struct {
			ContentType asn1.ObjectIdentifier
			Algorithm   pkix.AlgorithmIdentifier
			Content     []byte `asn1:"tag:0,optional"`
		}
	}
	safeBag struct {
		ID         asn1.ObjectIdentifier
		Value      asn1.RawValue `asn1:"tag:0,explicit"`
		Attributes asn1.RawValue `asn1:"optional"`
	}
	encryptedPrivateKeyInfo struct {
		Algorithm pkix.AlgorithmIdentifier
		Data      []byte
	}
	pbeParams struct {
		Salt       []byte
		Iterations int
	}
	pbes2Params struct {
		KDF    pkix.AlgorithmIdentifier
		Scheme pkix.AlgorithmIdentifier
	}
	pbkdf2Params struct {
		Salt       asn1.RawValue
		Iterations int
		Rest       asn1.RawContent `asn1:"optional"`
	}
)

var (
	oidData             = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 7, 1}
	oidEncryptedData    = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 7, 6}
	oidShroudedKeyBag   = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 12, 10, 1, 2}
	oidPKCS12PBEPrefix  = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 12, 1}
	oidPBES2            = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 5, 13}
	oidPBMAC1           = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 5, 14}
	oidPBKDF2           = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 5, 12}
	errNotPKCS12        = invalid("the input does not decode as PKCS#12")
	maxAuthSafeContents = 2  // what go-pkcs12's DecodeChain accepts
	maxSafeBags         = 64 // certificates and keys in one file
)

// parsePFX reads in as a PFX (version 3, data content), or says it is none.
func parsePFX(in []byte) (*pfxPDU, bool) {
	p := &pfxPDU{}
	rest, err := asn1.Unmarshal(in, p)
	if err != nil || len(rest) != 0 || p.Version != 3 || !p.AuthSafe.ContentType.Equal(oidData) {
		return nil, false
	}
	return p, true
}

// check is the pre-scan: every KDF the decode will run whose parameters are visible before any
// decryption (the MAC, each encrypted content, each key bag outside encrypted content) iterates at
// most MaxPKCS12Iterations times, and the file holds few parts.
func (p *pfxPDU) check() error {
	if p.MacData.Mac.Algorithm.Algorithm != nil {
		if p.MacData.Iterations > MaxPKCS12Iterations {
			return invalid("the PKCS#12 MAC iterates %d times (max %d)", p.MacData.Iterations, MaxPKCS12Iterations)
		}
		if err := checkKDF(p.MacData.Mac.Algorithm, "MAC"); err != nil {
			return err
		}
	}
	var octets []byte
	if _, err := asn1.Unmarshal(p.AuthSafe.Content.Bytes, &octets); err != nil {
		return errNotPKCS12
	}
	var safe []contentInfo
	if rest, err := asn1.Unmarshal(octets, &safe); err != nil || len(rest) != 0 {
		return errNotPKCS12
	}
	if len(safe) == 0 || len(safe) > maxAuthSafeContents {
		return invalid("the PKCS#12 file has %d contents (want 1 to %d)", len(safe), maxAuthSafeContents)
	}
	bags := 0
	for i, ci := range safe {
		switch {
		case ci.ContentType.Equal(oidEncryptedData):
			var ed encryptedData
			if _, err := asn1.Unmarshal(ci.Content.Bytes, &ed); err != nil {
				return errNotPKCS12
			}
			if err := checkKDF(ed.Info.Algorithm, fmt.Sprintf("content %d", i+1)); err != nil {
				return err
			}
		case ci.ContentType.Equal(oidData):
			var data []byte
			if _, err := asn1.Unmarshal(ci.Content.Bytes, &data); err != nil {
				return errNotPKCS12
			}
			var sb []safeBag
			if _, err := asn1.Unmarshal(data, &sb); err != nil {
				return errNotPKCS12
			}
			bags += len(sb)
			for j, b := range sb {
				if !b.ID.Equal(oidShroudedKeyBag) {
					continue
				}
				var k encryptedPrivateKeyInfo
				if _, err := asn1.Unmarshal(b.Value.Bytes, &k); err != nil {
					return errNotPKCS12
				}
				if err := checkKDF(k.Algorithm, fmt.Sprintf("key bag %d", j+1)); err != nil {
					return err
				}
			}
		default:
			return invalid("the PKCS#12 file has a content that is neither data nor encrypted data")
		}
	}
	if bags > maxSafeBags {
		return invalid("the PKCS#12 file has %d bags (max %d)", bags, maxSafeBags)
	}
	return nil
}

// checkKDF bounds the iterations of a password-based algorithm: PKCS#12 PBE, PBES2 or PBMAC1 with
// PBKDF2. Other algorithms run no KDF of theirs (a MAC's digest) or are refused by the decoder.
func checkKDF(alg pkix.AlgorithmIdentifier, what string) error {
	iter := 0
	switch {
	case len(alg.Algorithm) == len(oidPKCS12PBEPrefix)+1 && alg.Algorithm[:len(oidPKCS12PBEPrefix)].Equal(oidPKCS12PBEPrefix):
		var pp pbeParams
		if _, err := asn1.Unmarshal(alg.Parameters.FullBytes, &pp); err != nil {
			return errNotPKCS12
		}
		iter = pp.Iterations
	case alg.Algorithm.Equal(oidPBES2), alg.Algorithm.Equal(oidPBMAC1):
		var p2 pbes2Params
		if _, err := asn1.Unmarshal(alg.Parameters.FullBytes, &p2); err != nil {
			return errNotPKCS12
		}
		if !p2.KDF.Algorithm.Equal(oidPBKDF2) {
			return invalid("the PKCS#12 %s derives its key with something other than PBKDF2", what)
		}
		var kp pbkdf2Params
		if _, err := asn1.Unmarshal(p2.KDF.Parameters.FullBytes, &kp); err != nil {
			return errNotPKCS12
		}
		iter = kp.Iterations
	}
	if iter > MaxPKCS12Iterations {
		return invalid("the PKCS#12 %s iterates its KDF %d times (max %d)", what, iter, MaxPKCS12Iterations)
	}
	return nil
}
