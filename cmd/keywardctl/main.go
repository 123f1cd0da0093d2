package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/keyward/keyward/internal/version"
)

const usage = `keywardctl: operate Keyward.

Usage:
  keywardctl kms keys list    --config kms.yaml [-o json]
  keywardctl kms keys create  --config kms.yaml            create the first key generation in the HSM
  keywardctl kms keys rotate  --config kms.yaml            add a generation; it encrypts once keyward-kms
                                                          sees it (its keyRefreshInterval, or SIGHUP)
  keywardctl kms keys retire  --config kms.yaml --key-id ID (--etcd-* flags | --force)
                                                          destroy an old generation; refused while etcd
                                                          still holds data under it
  keywardctl kms checkpoint-key create --config kms.yaml
                                                          generate the audit checkpoint signing key
                                                          (ECDSA P-256, pkcs11.auditCheckpointKeyLabel) in the HSM
  keywardctl kms checkpoint-key export --config kms.yaml --out pub.pem
                                                          write its public key (PEM) for audit verify
  keywardctl kms coverage     --etcd-endpoint URL --etcd-ca F --etcd-cert F --etcd-key F [-o json]
                                                          count etcd Secrets per key ID, list unencrypted
  keywardctl policy lint      FILE                         validate a policy file (the broker's own checks)
  keywardctl policy check     --policy F --namespace N --environment E --service-account S --ref R [--key K]
  keywardctl policy check     --policy F --namespace N --environment E --service-account S --secrets FILE
                                                          the broker's decision and reason, offline
                                                          (exit 0 allow, 1 deny)
  keywardctl kms migrate      --kubeconfig K [--state F]   rewrite every Secret so it is re-encrypted under the
                                                          current key; resumable (progress in the state file)
  keywardctl audit verify     FILE --key-file F            check an audit log's hash chain
                              [--node N --stream S --checkpoint SHIPPED.log [--checkpoint-pubkey pub.pem]]
                                                          ... against the newest shipped checkpoint, and
                                                          its HSM signature
  keywardctl audit query      FILE [--decision D] [--namespace N] [--event E] [--since 1h] [-o json]
  keywardctl who-has          REF[#KEY] DIR... [--environment E] [--namespace N] [--since 10m] [--all] [-o json]
                                                          which pods received which Vault version of REF,
                                                          from the broker audit streams (one DIR per node),
                                                          and whether it is the newest any pod received
  keywardctl who-has          REF[#KEY] --live (--all-nodes | --node N | --addr HOST:PORT) API
                                                          the same, from the nodes' live volumes (Admin API)
  keywardctl audit follow     --node N --key-file F (--addr HOST:PORT | --kubeconfig K) API [--stream broker|kms]
                              [--from-seq N [--from-mac M]] [--state FILE] [--until-seq N] [--event E,..] [--decision D,..] [--namespace NS]
                                                          follow a node's audit stream (AuditStream API),
                                                          verifying the chain; exit 1 on a gap or a bad MAC
  keywardctl volumes          (--all-nodes | --node N | --addr HOST:PORT) API [--namespace NS] [-o json]
                                                          live volumes: pod, refs, Vault versions, since
  keywardctl status           (--all-nodes | --node N | --addr HOST:PORT) API [-o json]
                                                          health with reasons, policy generation and hash,
                                                          Vault tokens held (exit 1 if a node is unhealthy)
  keywardctl nodes            [--node N] --kubeconfig K   the nodes' API endpoints, from the EndpointSlices
                                                          of the broker's API Service
  keywardctl version | help

API is --ca CA.pem --cert CLIENT.pem --key CLIENT-key.pem [--server-name N]: Keyward's API takes TLS
client certificates only; nodes are found through the EndpointSlices of the broker's API Service
(--kubeconfig, --keyward-namespace, --service) unless --addr names one daemon.

Exit codes: 0 success, 1 the operation failed or found a problem, 2 bad usage.
`

// errUsage marks a usage error (exit 2).
var errUsage = errors.New("usage")

type streams struct {
	stdout, stderr io.Writer
}

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

func run(args []string, stdout, stderr io.Writer) int {
	e := streams{stdout: stdout, stderr: stderr}
	err := dispatch(e, args)
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errDenied):
		return 1
	case errors.Is(err, errUsage):
		fmt.Fprintf(stderr, "keywardctl: %v\n(see keywardctl help)\n", err)
		return 2
	default:
		fmt.Fprintf(stderr, "keywardctl: %v\n", err)
		return 1
	}
}

func dispatch(e streams, args []string) error {
	if len(args) == 0 {
		fmt.Fprint(e.stderr, usage)
		return fmt.Errorf("no command: %w", errUsage)
	}
	switch args[0] {
	case "version":
		fmt.Fprintln(e.stdout, "keywardctl", version.Version)
		return nil
	case "help", "-h", "--help":
		fmt.Fprint(e.stdout, usage)
		return nil
	case "kms":
		return kmsCommand(e, args[1:])
	case "audit":
		return auditCommand(e, args[1:])
	case "policy":
		return policyCommand(e, args[1:])
	case "who-has":
		return whoHas(e, args[1:])
	case "volumes":
		return volumesCommand(e, args[1:])
	case "status":
		return statusCommand(e, args[1:])
	case "nodes":
		return nodesCommand(e, args[1:])
	default:
		return fmt.Errorf("unknown command %q: %w", args[0], errUsage)
	}
}

func newFlags(name string, e streams) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(e.stderr)
	return fs
}

// parse parses flags, allowing positional arguments before and after them.
func parse(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, fmt.Errorf("%v: %w", err, errUsage)
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}
