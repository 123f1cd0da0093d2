package apitest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// PKI is a CA and the files of the certificates it issued.
type PKI struct {
	Dir string
	// CAFile is the CA's certificate (PEM): the server's --api-client-ca and the clients' trust.
	CAFile string
	// ServerCert and ServerKey are the server's files, valid for 127.0.0.1, ::1 and localhost.
	ServerCert, ServerKey string

	t    testing.TB
	ca   *x509.Certificate
	key  *ecdsa.PrivateKey
	next int64
}

// New makes a CA and a server certificate in dir.
func New(t testing.TB, dir string) *PKI {
	t.Helper()
	p := &PKI{Dir: dir, t: t, next: 2}
	p.key = newKey(t)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "keyward-api-test-ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour), IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &p.key.PublicKey, p.key)
	if err != nil {
		t.Fatal(err)
	}
	if p.ca, err = x509.ParseCertificate(der); err != nil {
		t.Fatal(err)
	}
	p.CAFile = filepath.Join(dir, "ca.pem")
	writePEM(t, p.CAFile, "CERTIFICATE", der)
	p.ServerCert, p.ServerKey = p.issue("keyward-api", true)
	return p
}

// Server issues another server certificate for the loopback addresses (a rotation) under name.
func (p *PKI) Server(name string) (certFile, keyFile string) { return p.issue(name, true) }

// Client issues a client certificate with common name cn and returns its files.
func (p *PKI) Client(cn string) (certFile, keyFile string) { return p.issue(cn, false) }

// ClientWithSANs issues a client certificate with common name cn and these SAN URIs (e.g. SPIFFE
// IDs) and DNS names; name names its files.
func (p *PKI) ClientWithSANs(name, cn string, uris, dnsNames []string) (certFile, keyFile string) {
	p.t.Helper()
	var us []*url.URL
	for _, u := range uris {
		pu, err := url.Parse(u)
		if err != nil {
			p.t.Fatal(err)
		}
		us = append(us, pu)
	}
	return p.issueAs(name, cn, false, func(c *x509.Certificate) { c.URIs, c.DNSNames = us, dnsNames })
}

func (p *PKI) issue(cn string, server bool) (string, string) {
	return p.issueAs(cn, cn, server, nil)
}

func (p *PKI) issueAs(name, cn string, server bool, edit func(*x509.Certificate)) (string, string) {
	t := p.t
	t.Helper()
	key := newKey(t)
	p.next++
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(p.next), Subject: pkix.Name{CommonName: cn, Organization: []string{"keyward-test"}},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
		tmpl.DNSNames = []string{"localhost"}
	}
	if edit != nil {
		edit(tmpl)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, &key.PublicKey, p.key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	cert, keyFile := filepath.Join(p.Dir, name+".pem"), filepath.Join(p.Dir, name+"-key.pem")
	writePEM(t, cert, "CERTIFICATE", der)
	writePEM(t, keyFile, "PRIVATE KEY", kb)
	return cert, keyFile
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func writePEM(t testing.TB, path, typ string, der []byte) {
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}
