// Command keyward-broker is the CSI node driver that authenticates each pod by its service-account
// token, scopes its secrets by namespace and environment, fetches them from Vault and delivers them
// into a tmpfs volume, never to a Kubernetes Secret or to disk.
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
	fs := flag.NewFlagSet("keyward-broker", flag.ContinueOnError)
	socket := fs.String("csi-socket", "/var/lib/kubelet/plugins/secrets.keyward.dev/csi.sock", "unix socket kubelet connects to")
	config := fs.String("config", "/etc/keyward/broker.yaml", "YAML config: policy file, Vault settings")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	showVersion := fs.Bool("version", false, "print the version and exit")
	if err := fs.Parse(os.Args[1:]); err != nil {
		os.Exit(2)
	}
	if *showVersion {
		fmt.Println("keyward-broker", version.Version)
		return
	}
	log, err := logging.New(*logLevel)
	if err != nil {
		fmt.Fprintln(os.Stderr, "keyward-broker:", err)
		os.Exit(2)
	}
	defer log.Sync()
	log.Info("keyward-broker: the CSI node service is not part of this build yet; exiting",
		zap.String("socket", *socket), zap.String("config", *config))
}
