package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/keyward/keyward/internal/config"
	"github.com/keyward/keyward/kms/coverage"
	"github.com/keyward/keyward/kms/pkcs11"
)

func kmsCommand(e streams, args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("kms: want keys, checkpoint-key, coverage or migrate: %w", errUsage)
	}
	switch args[0] {
	case "keys":
		return keysCommand(e, args[1:])
	case "checkpoint-key":
		return checkpointKeyCommand(e, args[1:])
	case "coverage":
		return coverageCommand(e, args[1:])
	case "migrate":
		return migrateCommand(e, args[1:])
	default:
		return fmt.Errorf("kms: unknown command %q: %w", args[0], errUsage)
	}
}

type etcdFlags struct{ endpoint, ca, cert, key string }

func (f *etcdFlags) bind(fs *flag.FlagSet) {
	fs.StringVar(&f.endpoint, "etcd-endpoint", "", "etcd URL, e.g. https://127.0.0.1:2379")
	fs.StringVar(&f.ca, "etcd-ca", "", "CA file that signed etcd's serving certificate")
	fs.StringVar(&f.cert, "etcd-cert", "", "client certificate file")
	fs.StringVar(&f.key, "etcd-key", "", "client key file")
}

func (f etcdFlags) set() bool { return f.endpoint != "" }

func (f etcdFlags) scan(ctx context.Context, prefix string) (coverage.Report, error) {
	if f.ca == "" || f.cert == "" || f.key == "" {
		return coverage.Report{}, fmt.Errorf("--etcd-ca, --etcd-cert and --etcd-key are required with --etcd-endpoint: %w", errUsage)
	}
	tlsInfo := transportTLS{ca: f.ca, cert: f.cert, key: f.key}
	tc, err := tlsInfo.config()
	if err != nil {
		return coverage.Report{}, err
	}
	c, err := clientv3.New(clientv3.Config{Endpoints: []string{f.endpoint}, TLS: tc, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return coverage.Report{}, err
	}
	defer c.Close()
	return coverage.Scan(ctx, c, prefix)
}

func keysCommand(e streams, args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("kms keys: want list, create, rotate or retire: %w", errUsage)
	}
	verb := args[0]
	fs := newFlags("kms keys "+verb, e)
	configFile := fs.String("config", "/etc/keyward/kms.yaml", "keyward-kms config file (PKCS#11 module, token, key label, PIN file)")
	output := fs.String("o", "table", "output: table or json")
	keyID := fs.String("key-id", "", "retire: the key ID to destroy")
	force := fs.Bool("force", false, "retire: destroy even without proof that no data uses the key")
	var ef etcdFlags
	ef.bind(fs)
	if _, err := parse(fs, args[1:]); err != nil {
		return err
	}
	a, err := openAdmin(*configFile)
	if err != nil {
		return err
	}
	defer a.Close()
	switch verb {
	case "list":
		gens, err := a.List()
		if err != nil {
			return err
		}
		return printGenerations(e, gens, *output)
	case "create", "rotate":
		return createGeneration(e, a, verb == "rotate")
	case "retire":
		return retireGeneration(e, a, *keyID, *force, ef)
	default:
		return fmt.Errorf("kms keys: unknown command %q: %w", verb, errUsage)
	}
}

// checkpointKeyCommand creates the audit checkpoint signing key in the HSM, or exports its public key
// (PEM) for audit verify --checkpoint-pubkey.
func checkpointKeyCommand(e streams, args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("kms checkpoint-key: want create or export: %w", errUsage)
	}
	verb := args[0]
	fs := newFlags("kms checkpoint-key "+verb, e)
	configFile := fs.String("config", "/etc/keyward/kms.yaml", "keyward-kms config file (PKCS#11 module, token, pkcs11.auditCheckpointKeyLabel, PIN file)")
	out := fs.String("out", "", "export: file to create with the public key (PEM)")
	if _, err := parse(fs, args[1:]); err != nil {
		return err
	}
	if verb != "create" && verb != "export" {
		return fmt.Errorf("kms checkpoint-key: unknown command %q: %w", verb, errUsage)
	}
	if verb == "export" && *out == "" {
		return fmt.Errorf("kms checkpoint-key export needs --out: %w", errUsage)
	}
	a, err := openAdmin(*configFile)
	if err != nil {
		return err
	}
	defer a.Close()
	if verb == "create" {
		pub, err := a.CreateCheckpointKey()
		if err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "created the audit checkpoint key in the HSM (ECDSA P-256, fingerprint %s); export its public key with keywardctl kms checkpoint-key export\n",
			pkcs11.CheckpointKeyFingerprint(pub))
		return nil
	}
	pub, err := a.CheckpointPublicKey()
	if err != nil {
		return err
	}
	pemBytes, err := pkcs11.PublicKeyPEM(pub)
	if err != nil {
		return err
	}
	if err := createFile(*out, pemBytes, 0o644); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "wrote the audit checkpoint public key (fingerprint %s) to %s\n", pkcs11.CheckpointKeyFingerprint(pub), *out)
	return nil
}

// createFile writes a new file (never over an existing one).
func createFile(path string, b []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, mode)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	return f.Close()
}

// openAdmin reads the pkcs11 section of keyward-kms's config file and the PIN file it names, and
// opens the HSM for key administration.
func openAdmin(configFile string) (*pkcs11.Admin, error) {
	var cfg pkcs11.Config
	if err := config.LoadSection(configFile, "pkcs11", &cfg); err != nil {
		return nil, err
	}
	cfg.Default()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("config %s: %w", configFile, err)
	}
	pin, err := os.ReadFile(cfg.PINFile)
	if err != nil {
		return nil, fmt.Errorf("PIN file: %w", err)
	}
	defer clear(pin)
	return pkcs11.OpenAdmin(cfg, strings.TrimRight(string(pin), "\r\n"))
}

func createGeneration(e streams, a *pkcs11.Admin, rotate bool) error {
	create := a.Create
	if rotate {
		create = a.Rotate
	}
	g, err := create()
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "created generation %d: key ID %s\n", g.Generation, g.KeyID)
	if rotate {
		fmt.Fprintln(e.stdout, "keyward-kms encrypts with it after its next key refresh (or SIGHUP); kube-apiserver then starts a new DEK seed.")
	}
	return nil
}

// retireGeneration destroys a generation, only with proof from etcd that nothing is encrypted under
// it (or --force).
func retireGeneration(e streams, a *pkcs11.Admin, keyID string, force bool, ef etcdFlags) error {
	if keyID == "" {
		return fmt.Errorf("retire needs --key-id: %w", errUsage)
	}
	if !force {
		if !ef.set() {
			return fmt.Errorf("refusing to retire %s without proof that etcd holds no data under it: pass --etcd-endpoint/--etcd-ca/--etcd-cert/--etcd-key, or --force", keyID)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		rep, err := ef.scan(ctx, "/registry/")
		if err != nil {
			return err
		}
		if n := rep.CountKeyID(keyID); n > 0 {
			return fmt.Errorf("refusing to retire %s: %d object(s) in etcd are still encrypted under it; re-encrypt them first (kubectl get secrets -A -o json | kubectl replace -f -), or pass --force", keyID, n)
		}
	}
	if err := a.Retire(keyID); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "retired %s: it can no longer decrypt\n", keyID)
	return nil
}

// printGenerations lists the generations; ACCEPTABLE says whether keyward-kms uses each one, and if
// not, why (imported, once extractable or readable, not AES-256, a duplicate label). CURRENT is the
// newest acceptable generation, the one that encrypts.
func printGenerations(e streams, gens []pkcs11.Generation, output string) error {
	type row struct {
		Generation int    `json:"generation"`
		KeyID      string `json:"keyID"`
		Label      string `json:"label"`
		Usable     bool   `json:"usable"`
		Refusal    string `json:"refusal,omitempty"`
		Current    bool   `json:"current"`
	}
	cur := ""
	for _, g := range gens {
		if g.Usable {
			cur = g.KeyID // gens are oldest first
		}
	}
	rows := make([]row, 0, len(gens))
	for _, g := range gens {
		rows = append(rows, row{g.Generation, g.KeyID, g.Label, g.Usable, g.Refusal, g.Usable && g.KeyID == cur})
	}
	if output == "json" {
		return json.NewEncoder(e.stdout).Encode(rows)
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "GENERATION\tKEY ID\tLABEL\tCURRENT\tACCEPTABLE")
	for _, r := range rows {
		acceptable := "yes"
		if !r.Usable {
			acceptable = "no: " + r.Refusal
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%v\t%s\n", r.Generation, r.KeyID, r.Label, r.Current, acceptable)
	}
	return tw.Flush()
}

func coverageCommand(e streams, args []string) error {
	fs := newFlags("kms coverage", e)
	var ef etcdFlags
	ef.bind(fs)
	prefix := fs.String("prefix", "/registry/secrets/", "etcd key prefix to scan")
	output := fs.String("o", "table", "output: table or json")
	if _, err := parse(fs, args); err != nil {
		return err
	}
	if !ef.set() {
		return fmt.Errorf("--etcd-endpoint is required: %w", errUsage)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	rep, err := ef.scan(ctx, *prefix)
	if err != nil {
		return err
	}
	if *output == "json" {
		return json.NewEncoder(e.stdout).Encode(rep)
	}
	fmt.Fprintf(e.stdout, "%d object(s) under %s\n", rep.Total, rep.Prefix)
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PROVIDER/KEY ID\tOBJECTS")
	for k, n := range rep.ByKeyID {
		fmt.Fprintf(tw, "%s\t%d\n", k, n)
	}
	fmt.Fprintf(tw, "(not KMS v2 encrypted)\t%d\n", len(rep.Unencrypted))
	tw.Flush()
	for _, k := range rep.Unencrypted {
		fmt.Fprintln(e.stdout, "  unencrypted:", k)
	}
	for _, k := range rep.Malformed {
		fmt.Fprintln(e.stdout, "  malformed envelope:", k)
	}
	if len(rep.Unencrypted)+len(rep.Malformed) > 0 {
		return fmt.Errorf("%d object(s) not KMS v2 encrypted", len(rep.Unencrypted)+len(rep.Malformed))
	}
	return nil
}
