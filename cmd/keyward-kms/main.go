// Command keyward-kms is the Kubernetes KMS v2 plugin that kube-apiserver uses as its encryption
// provider: etcd Secrets are envelope-encrypted under a key that never leaves a PKCS#11 HSM.
package main

import (
	"flag"
	"fmt"
	"os"

	"go.uber.org/zap"

	"github.com/keyward/keyward/internal/logging"
	"github.com/keyward/keyward/internal/version"
)

func main() {
	fs := flag.NewFlagSet("keyward-kms", flag.ContinueOnError)
	socket := fs.String("socket", "/var/run/keyward/kms.sock", "unix socket kube-apiserver connects to")
	config := fs.String("config", "/etc/keyward/kms.yaml", "YAML config: PKCS#11 module, token and key labels, PIN file")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	showVersion := fs.Bool("version", false, "print the version and exit")
	if err := fs.Parse(os.Args[1:]); err != nil {
		os.Exit(2)
	}
	if *showVersion {
		fmt.Println("keyward-kms", version.Version)
		return
	}
	log, err := logging.New(*logLevel)
	if err != nil {
		fmt.Fprintln(os.Stderr, "keyward-kms:", err)
		os.Exit(2)
	}
	defer log.Sync()
	log.Info("keyward-kms: the KMS v2 service is not part of this build yet; exiting",
		zap.String("socket", *socket), zap.String("config", *config))
}
