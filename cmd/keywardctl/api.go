package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"sort"
	"strconv"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// apiFlags say how keywardctl reaches nodes' Keyward API: one address, or every node of the
// broker DaemonSet through the EndpointSlices of its API Service (deploy/base/api-service.yaml).
type apiFlags struct {
	addr, node, ca, cert, key, serverName string
	kubeconfig, namespace, service        string
	allNodes                              bool
}

func (a *apiFlags) bind(fs *flag.FlagSet, nodes bool) {
	fs.StringVar(&a.addr, "addr", "", "the API address (HOST:PORT) of one daemon; instead of finding --node through the apiserver")
	fs.StringVar(&a.node, "node", "", "the node to ask (found through the EndpointSlices of the broker's API Service)")
	if nodes {
		fs.BoolVar(&a.allNodes, "all-nodes", false, "ask every node of the broker DaemonSet")
	}
	fs.StringVar(&a.ca, "ca", "", "CA (PEM) the API's server certificate chains to")
	fs.StringVar(&a.cert, "cert", "", "client certificate (PEM), on the daemon's --api-audit-readers or --api-admins")
	fs.StringVar(&a.key, "key", "", "the client certificate's key (PEM)")
	fs.StringVar(&a.serverName, "server-name", "keyward-broker-api.keyward-system.svc", "the name the server certificate must be valid for (endpoints are pod IPs)")
	fs.StringVar(&a.kubeconfig, "kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig of a user that may list EndpointSlices in --keyward-namespace (to find the nodes)")
	fs.StringVar(&a.namespace, "keyward-namespace", "keyward-system", "the broker DaemonSet's namespace")
	fs.StringVar(&a.service, "service", "keyward-broker-api", "the broker's API Service (headless) whose EndpointSlices list the nodes")
}

// target is one daemon's API.
type target struct{ node, addr string }

// targets resolves the flags to the daemons to ask, by node name.
func (a *apiFlags) targets(ctx context.Context) ([]target, error) {
	switch {
	case a.addr != "":
		if a.allNodes {
			return nil, fmt.Errorf("--addr names one daemon; --all-nodes needs the apiserver: %w", errUsage)
		}
		return []target{{node: a.node, addr: a.addr}}, nil
	case a.node == "" && !a.allNodes:
		return nil, fmt.Errorf("give --node N (or --all-nodes, or --addr HOST:PORT): %w", errUsage)
	case a.kubeconfig == "":
		return nil, fmt.Errorf("--kubeconfig (or $KUBECONFIG) is needed to find the nodes, or give --addr: %w", errUsage)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", a.kubeconfig)
	if err != nil {
		return nil, err
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	slices, err := client.DiscoveryV1().EndpointSlices(a.namespace).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + a.service})
	if err != nil {
		return nil, fmt.Errorf("listing the EndpointSlices of service %s/%s: %w", a.namespace, a.service, err)
	}
	return endpointTargets(slices.Items, a.node)
}

// endpointTargets picks each node's API endpoint from the Service's EndpointSlices (port "api").
func endpointTargets(slices []discoveryv1.EndpointSlice, node string) ([]target, error) {
	byNode := map[string]string{}
	for _, s := range slices {
		port := int32(0)
		for _, p := range s.Ports {
			if p.Name != nil && *p.Name == "api" && p.Port != nil {
				port = *p.Port
			}
		}
		if port == 0 {
			continue
		}
		for _, ep := range s.Endpoints {
			if ep.NodeName == nil || len(ep.Addresses) == 0 || (ep.Conditions.Ready != nil && !*ep.Conditions.Ready) {
				continue
			}
			if node == "" || *ep.NodeName == node {
				byNode[*ep.NodeName] = net.JoinHostPort(ep.Addresses[0], strconv.Itoa(int(port)))
			}
		}
	}
	if len(byNode) == 0 {
		if node != "" {
			return nil, fmt.Errorf("no ready endpoint of the broker's API on node %q", node)
		}
		return nil, errors.New("no ready endpoint of the broker's API (is --api-address set on the DaemonSet, and its Service applied?)")
	}
	var out []target
	for n, addr := range byNode {
		out = append(out, target{node: n, addr: addr})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].node < out[j].node })
	return out, nil
}

// dial connects to one daemon's API: TLS 1.3, the client certificate, the server certificate
// verified against --ca for --server-name, always: keyward-broker-api.keyward-system.svc unless
// changed, with --addr too (never the address's host), so a keyward-kms certificate, which names
// its node, needs --server-name.
func (a *apiFlags) dial(t target) (*grpc.ClientConn, error) {
	if a.ca == "" || a.cert == "" || a.key == "" {
		return nil, fmt.Errorf("--ca, --cert and --key are required: the API takes TLS client certificates only: %w", errUsage)
	}
	pem, err := os.ReadFile(a.ca)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s holds no PEM certificate", a.ca)
	}
	kp, err := tls.LoadX509KeyPair(a.cert, a.key)
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{kp}, MinVersion: tls.VersionTLS13, ServerName: a.serverName}
	return grpc.NewClient(t.addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
}

// nodesCommand lists the nodes' API endpoints as keywardctl finds them (the EndpointSlices of the
// broker's API Service): where volumes, status, who-has --live and audit follow connect.
func nodesCommand(e streams, args []string) error {
	fs := newFlags("nodes", e)
	var a apiFlags
	a.bind(fs, true)
	if _, err := parse(fs, args); err != nil {
		return err
	}
	if a.node == "" && a.addr == "" {
		a.allNodes = true
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ts, err := a.targets(ctx)
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tAPI")
	for _, t := range ts {
		fmt.Fprintf(tw, "%s\t%s\n", t.node, t.addr)
	}
	return tw.Flush()
}
