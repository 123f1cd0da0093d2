package harness

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Etcd is a single-member etcd 3.6 serving TLS with client-certificate authentication on loopback.
type Etcd struct {
	Endpoint string // https://127.0.0.1:PORT
	CA       *CA
	// Client is an etcd client authenticated with ClientCert.
	Client     *clientv3.Client
	ClientCert CertPair
	Dir        string
	proc       *process
}

// StartEtcd starts etcd in dir (which must exist) and waits until it answers.
// (Over 60 lines: the certificates and flags of one etcd, in order.)
func StartEtcd(ctx context.Context, dir string) (*Etcd, error) {
	bin, err := Binary("etcd")
	if err != nil {
		return nil, err
	}
	ca, err := NewCA(dir, "etcd")
	if err != nil {
		return nil, err
	}
	server, err := ca.Issue(dir, "etcd-server")
	if err != nil {
		return nil, err
	}
	client, err := ca.Issue(dir, "etcd-client")
	if err != nil {
		return nil, err
	}
	ports, err := freePorts(2)
	if err != nil {
		return nil, err
	}
	clientURL := "https://" + hostPort(ports[0])
	peerURL := "http://" + hostPort(ports[1])
	args := []string{
		"--name=default",
		"--data-dir=" + filepath.Join(dir, "data"),
		"--listen-client-urls=" + clientURL,
		"--advertise-client-urls=" + clientURL,
		"--listen-peer-urls=" + peerURL,
		"--initial-advertise-peer-urls=" + peerURL,
		"--initial-cluster=default=" + peerURL,
		"--cert-file=" + server.CertFile,
		"--key-file=" + server.KeyFile,
		"--trusted-ca-file=" + ca.CertFile,
		"--client-cert-auth",
		"--log-level=warn",
		"--unsafe-no-fsync", // test data only: saves seconds per test on slow disks
	}
	p, err := startProcess("etcd", dir, bin, args, nil)
	if err != nil {
		return nil, err
	}
	e := &Etcd{Endpoint: clientURL, CA: ca, ClientCert: client, Dir: dir, proc: p}
	tlsConf, err := e.TLSConfig()
	if err != nil {
		p.stop()
		return nil, err
	}
	e.Client, err = clientv3.New(clientv3.Config{
		Endpoints:   []string{clientURL},
		TLS:         tlsConf,
		DialTimeout: 2 * time.Second,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		p.stop()
		return nil, err
	}
	if err := p.waitReady(ctx, func(ctx context.Context) error {
		_, err := e.Client.Status(ctx, clientURL)
		return err
	}); err != nil {
		e.Stop()
		return nil, err
	}
	return e, nil
}

// TLSConfig is a client TLS configuration trusting the etcd CA and presenting the client certificate.
func (e *Etcd) TLSConfig() (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(e.ClientCert.CertFile, e.ClientCert.KeyFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(e.CA.Cert)
	return &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, MinVersion: tls.VersionTLS12}, nil
}

// Stop closes the client and stops etcd. Safe to call twice.
func (e *Etcd) Stop() {
	if e.Client != nil {
		e.Client.Close()
		e.Client = nil
	}
	e.proc.stop()
}

func writeFile(dir, name string, data []byte, mode os.FileMode) (string, error) {
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, mode); err != nil {
		return "", fmt.Errorf("write %s: %w", name, err)
	}
	return p, nil
}

// Pid is etcd's process ID (benchmarks read its CPU time).
func (e *Etcd) Pid() int { return e.proc.pid() }
