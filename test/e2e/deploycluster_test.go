package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	"github.com/keyward/keyward/csi"
	"github.com/keyward/keyward/internal/audit"
	"github.com/keyward/keyward/test/harness"
	"github.com/keyward/keyward/test/images"
	"github.com/keyward/keyward/test/realnode"
)

// deploySection is the README section TestDeployToYourClusterAsWritten follows.
const deploySection = "## Deploy to your cluster"

// The README's placeholders, and the files and commands its blocks are recognized by.
const (
	placeholderRegistry = "registry.example.com"
	placeholderKubeHost = "https://kube.example.com:6443"
	placeholderKubeCA   = "/etc/kubernetes/pki/ca.crt"
	placeholderNode     = "NODE"
	shippedAuditKeyFile = "/etc/keyward/audit-key/audit.key" // deploy/base's hostPath, moved here (PatchForThisNode)

	overlayDir    = "my-cluster"
	kustomization = overlayDir + "/kustomization.yaml"
	brokerConfig  = overlayDir + "/broker.yaml"
	policyFile    = overlayDir + "/policy.yaml"
	smokeTest     = "smoke-test.yaml"
	applyOverlay  = "kubectl apply -k " + overlayDir
)

// The section's shell blocks, by the command each starts with, in the order the section has them.
var deployShellBlocks = []string{"make images ", "kubectl create namespace ", "openssl rand ", applyOverlay, "kubectl apply -f " + smokeTest}

// README.md's "Deploy to your cluster" works as written with the images built from this tree: the
// test reads the section's code blocks out of README.md and runs them in order on the harness's real
// node, substituting only the documented placeholders (the registry's host, the apiserver's address
// and CA as Vault reaches them, the node's name). Step 1 builds the images as `make images` does
// (realnode.BuildImages, the README's tag) and pushes them with the README's crane commands to a
// registry on loopback; the node's containerd pulls them from there (imagePullPolicy as shipped), so
// the broker's and the smoke-test pod's image IDs must be the built digests. Step 2 runs
// deploy/vault/setup.sh as the README does; step 3 derives the node's audit key with keywardctl; step
// 4 writes the README's overlay files verbatim and renders them with kubectl's kustomize; step 5
// applies the render after realnode.PatchForThisNode (what this machine forces, and nothing else) and
// runs the README's rollout and CSINode commands; step 6 runs the README's smoke-test pod, whose
// secretcheck verdict must pass. The master key of step 3 then verifies the node's broker audit
// stream, as deploy/README.md says the security team does. Step 7 (prose: deploy/README.md's
// provisioning) runs keyward-kms as the static pod with the image the README names, pulled from the
// registry, and the apiserver stores Secrets through it.
func TestDeployToYourClusterAsWritten(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("the deploy walk-through runs kubelet and containerd and needs root")
	}
	start := time.Now()
	d := newDeployment(t)
	runSteps(t, step{"1. the images, built and pushed with the README's crane commands, keep their digests", d.pushImages})
	d.startCluster(t)
	runSteps(t,
		step{"2. deploy/vault/setup.sh lays Vault out; the namespace and its service account", d.vault},
		step{"3. the node's audit key, derived from the master key", d.auditKey},
		step{"4. the README's overlay renders the prod overlay with its image, config, policy and CA", d.render},
		step{"5. applied: the DaemonSet rolls out with the pulled image, kubelet lists the driver", d.apply},
		step{"6. the smoke-test pod reads its secret from a read-only tmpfs", d.smokeTest},
		step{"the master key verifies the node's broker audit stream", d.verifyAudit},
		step{"7. keyward-kms, the static pod with the pulled image, encrypts the apiserver's Secrets", d.kms},
	)
	t.Logf("the README's walk-through ran in %s", time.Since(start).Round(time.Second))
}

// deployment is the operator's side of the walk-through: a checkout (deploy/ as in this tree, the
// images and keywardctl in bin/), the tools on PATH, and the cluster it deploys to.
type deployment struct {
	*realnode.Cluster
	section  string            // the section's text
	files    map[string]string // the section's files, by path: what the README says to write
	shell    map[string]string // the section's shell blocks, by their first command (deployShellBlocks)
	dir      string            // the checkout: the blocks run here
	tools    string            // kubectl and vault, first on PATH
	home     string            // HOME for the commands, and the kubeconfig
	env      []string          // the commands' environment (operatorEnv)
	reg      *testRegistry
	tag      string
	built    map[string]images.Result
	objects  []*unstructured.Unstructured // step 4's kubectl kustomize output, patched for this node
	smokeUID string                       // step 6's pod
}

func newDeployment(t *testing.T) *deployment {
	t.Helper()
	root, err := harness.RepoFile(".")
	check(t, err)
	kubectl, err := harness.Binary("kubectl")
	harness.Check(t, err)
	vaultBin, err := harness.Binary("vault")
	harness.Check(t, err)
	d := &deployment{Cluster: &realnode.Cluster{Repo: root, HostDir: harness.Dir(t), Keywardctl: filepath.Join(bin, "keywardctl")},
		dir: harness.Dir(t), tools: harness.Dir(t), home: harness.Dir(t)}
	readme, err := os.ReadFile(filepath.Join(root, "README.md"))
	check(t, err)
	d.section, d.files, d.shell, err = parseDeploySection(string(readme))
	check(t, err)
	for tool, path := range map[string]string{"kubectl": kubectl, "vault": vaultBin} {
		check(t, os.Symlink(path, filepath.Join(d.tools, tool)))
	}
	// The operator's checkout: deploy/ as in this tree (the overlay's ../deploy/overlays/prod), and
	// bin/ where make build and make images put keywardctl and the images.
	check(t, os.CopyFS(filepath.Join(d.dir, "deploy"), os.DirFS(filepath.Join(root, "deploy"))))
	check(t, os.MkdirAll(filepath.Join(d.dir, "bin"), 0o755))
	check(t, os.Symlink(filepath.Join(bin, "keywardctl"), filepath.Join(d.dir, "bin", "keywardctl")))
	d.env = d.operatorEnv(t)
	d.reg = startRegistry(t)
	return d
}

// parseDeploySection reads the section's fenced code blocks: each yaml block starts with a comment
// naming the file it is (`# my-cluster/kustomization.yaml ...`); the shell blocks are exactly
// deployShellBlocks, in that order. Anything else is an error: a block this test does not run would
// be a block nobody checks.
func parseDeploySection(readme string) (section string, files, shell map[string]string, err error) {
	_, section, ok := strings.Cut(readme, "\n"+deploySection+"\n")
	if !ok {
		return "", nil, nil, fmt.Errorf("README.md has no %q section", deploySection)
	}
	if i := strings.Index(section, "\n## "); i >= 0 {
		section = section[:i]
	}
	files, shell = map[string]string{}, map[string]string{}
	var order []string
	var lang string
	var body *strings.Builder
	for _, line := range strings.Split(section, "\n") {
		switch {
		case body == nil && strings.HasPrefix(line, "```"):
			lang, body = strings.TrimPrefix(line, "```"), &strings.Builder{}
		case body != nil && line == "```":
			text := body.String()
			first, _, _ := strings.Cut(text, "\n")
			switch lang {
			case "yaml":
				path, _, _ := strings.Cut(strings.TrimPrefix(first, "# "), " ")
				if !strings.HasPrefix(first, "# ") || !strings.HasSuffix(path, ".yaml") {
					return "", nil, nil, fmt.Errorf("a yaml block of the section does not start with `# FILE.yaml`: %q", first)
				}
				files[path] = text
			case "sh":
				key := ""
				for _, k := range deployShellBlocks {
					if strings.HasPrefix(first, k) {
						key = k
					}
				}
				if key == "" || shell[key] != "" {
					return "", nil, nil, fmt.Errorf("a shell block of the section this test does not know how to run: %q", first)
				}
				shell[key] = text
				order = append(order, key)
			default:
				return "", nil, nil, fmt.Errorf("a %q block in the section: this test runs only yaml files and sh commands", lang)
			}
			body = nil
		case body != nil:
			body.WriteString(line + "\n")
		}
	}
	if body != nil {
		return "", nil, nil, errors.New("the section ends inside a code block")
	}
	if !slices.Equal(order, deployShellBlocks) {
		return "", nil, nil, fmt.Errorf("the section's shell blocks start %q, want %q in that order", order, deployShellBlocks)
	}
	for _, f := range []string{kustomization, brokerConfig, policyFile, smokeTest} {
		if files[f] == "" {
			return "", nil, nil, fmt.Errorf("the section has no %s block (it has %v)", f, slices.Sorted(maps.Keys(files)))
		}
	}
	if len(files) != 4 {
		return "", nil, nil, fmt.Errorf("the section writes %v: this test knows only the overlay's three files and %s", slices.Sorted(maps.Keys(files)), smokeTest)
	}
	return section, files, shell, nil
}

// substitute replaces each old with its new in text, every one of which must occur: a placeholder
// the README no longer has is a README this test no longer follows.
func substitute(t *testing.T, what, text string, oldNew ...string) string {
	t.Helper()
	for i := 0; i < len(oldNew); i += 2 {
		if !strings.Contains(text, oldNew[i]) {
			t.Fatalf("the README's %s no longer contains %q:\n%s", what, oldNew[i], text)
		}
		text = strings.ReplaceAll(text, oldNew[i], oldNew[i+1])
	}
	return text
}

// sh runs a script from the README with bash -eu -o pipefail in the checkout, as an operator's shell
// with the tools on PATH and the cluster's kubeconfig, and returns its combined output.
func (d *deployment) sh(t *testing.T, script string, env ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", "-eu", "-o", "pipefail", "-c", script)
	cmd.Dir = d.dir
	cmd.Env = append(slices.Clone(d.env), env...)
	start := time.Now()
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the README's commands failed: %v\n--- commands:\n%s--- output:\n%s", err, script, out)
	}
	t.Logf("ran in %s:\n%s", time.Since(start).Round(100*time.Millisecond), bytes.TrimSpace(out))
	return string(out)
}

// operatorEnv is this process's environment for the README's commands: the tools first on PATH, a
// HOME of their own, the cluster's KUBECONFIG, no VAULT_* of this machine's, and Go's own
// directories and settings kept (HOME moves; go run of crane still uses this machine's caches).
func (d *deployment) operatorEnv(t *testing.T) []string {
	t.Helper()
	out, err := exec.Command("go", "env", "-json", "GOENV", "GOPATH", "GOMODCACHE", "GOCACHE").Output()
	check(t, err)
	var set map[string]string
	check(t, json.Unmarshal(out, &set))
	set["PATH"] = d.tools + ":" + os.Getenv("PATH")
	set["HOME"] = d.home
	set["KUBECONFIG"] = filepath.Join(d.home, "kubeconfig")
	set["GODEBUG"] = "x509negativeserial=1" // the harness's Vault 1.14 CLI needs it under Go >= 1.23 (see harness.StartVault)
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if _, ok := set[k]; !ok && !strings.HasPrefix(k, "VAULT_") {
			env = append(env, kv)
		}
	}
	for k, v := range set {
		env = append(env, k+"="+v)
	}
	return env
}

// kubectl runs the real kubectl as the operator and returns its standard output.
func (d *deployment) kubectl(t *testing.T, args ...string) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(d.tools, "kubectl"), args...)
	cmd.Dir, cmd.Env = d.dir, d.env
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, stderr.Bytes())
	}
	return out
}

// pushImages: step 1. The images are built as make images builds them (test/images, the README's
// IMAGE_TAG) into the checkout's bin/images, then the rest of the block runs as written, pushing to
// the loopback registry in place of registry.example.com; each pushed manifest's digest is the built
// one.
func (d *deployment) pushImages(t *testing.T) {
	block := d.shell["make images "]
	makeLine, rest, _ := strings.Cut(block, "\n")
	m := regexp.MustCompile(`^make images IMAGE_TAG=(\S+)$`).FindStringSubmatch(makeLine)
	if m == nil {
		t.Fatalf("the README builds the images with %q, not `make images IMAGE_TAG=TAG`", makeLine)
	}
	d.tag = m[1]
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	start := time.Now()
	var err error
	d.built, err = realnode.BuildImages(ctx, d.Repo, filepath.Join(d.dir, "bin", "images"), d.tag, images.Names()...)
	check(t, err)
	t.Logf("make images IMAGE_TAG=%s: %d images built in %s", d.tag, len(d.built), time.Since(start).Round(100*time.Millisecond))
	d.sh(t, substitute(t, "image push commands", rest, placeholderRegistry, d.reg.host))
	for _, n := range []string{"keyward-broker", "keyward-kms", "secretcheck"} {
		ref := d.ref(n)
		if !strings.Contains(rest, "bin/images/$image $REGISTRY/$image:"+d.tag) || !strings.Contains(rest, n) {
			t.Fatalf("the README no longer pushes %s as this test expects:\n%s", ref, rest)
		}
		if got := d.reg.digest(t, n, d.tag); got != d.built[n].Digest.String() {
			t.Errorf("%s has digest %s in the registry, built %s", ref, got, d.built[n].Digest)
		}
	}
}

// ref is image n's reference in the test's registry, as the README names it.
func (d *deployment) ref(n string) string {
	return d.reg.host + "/keyward/" + n + ":" + d.tag
}

// startCluster starts the harness's etcd, kube-apiserver and Vault, and the node, its containerd
// trusting the loopback registry over plain HTTP: only the pause image (containerd's sandbox image;
// a cluster's nodes pull theirs) is imported, Keyward's images are pulled.
func (d *deployment) startCluster(t *testing.T) {
	t.Helper()
	d.Etcd = harness.EtcdT(t)
	// Step 7 gives the apiserver deploy/control-plane's EncryptionConfiguration: until then, identity.
	d.Encryption = filepath.Join(d.HostDir, "encryption-config.yaml")
	check(t, os.WriteFile(d.Encryption, []byte(realnode.IdentityOnly), 0o600))
	d.Kube = harness.KubeT(t, harness.KubeOptions{Etcd: d.Etcd, EncryptionConfig: d.Encryption,
		ExtraArgs: []string{"--encryption-provider-config-automatic-reload=true"}})
	d.Vault = harness.VaultT(t)
	d.Node = harness.NodeT(t, harness.NodeOptions{Kube: d.Kube, PauseImage: d.built["pause"].Tar,
		KubeletRootDir: "/var/lib/kubelet", InsecureRegistries: []string{d.reg.host}})
	t.Logf("node %s Ready in %s", d.Node.Name, d.Node.StartTime.Round(100*time.Millisecond))
	_, err := d.Kube.WriteKubeconfig(filepath.Join(d.home, "kubeconfig"), "")
	check(t, err)
	t.Cleanup(func() { // before the node stops
		if t.Failed() {
			(&realNode{Cluster: d.Cluster}).dumpLogs(t)
			t.Logf("registry requests: %v", d.reg.requests())
		}
	})
}

// vault: step 2, with the harness Vault's address and root token exported as the README asks, and
// the apiserver's address and CA as Vault reaches them.
func (d *deployment) vault(t *testing.T) {
	d.sh(t, substitute(t, "Vault commands", d.shell["kubectl create namespace "],
		placeholderKubeHost, d.Kube.URL, placeholderKubeCA, d.Kube.CAFile),
		"VAULT_ADDR="+d.Vault.Addr, "VAULT_TOKEN="+d.Vault.RootToken)
}

// auditKey: step 3 for the node, its key installed where the patched DaemonSet mounts the audit-key
// directory from (PatchForThisNode: not this machine's /etc/keyward). The key must be the node's
// key derived from the master key.
func (d *deployment) auditKey(t *testing.T) {
	keyDir, _ := d.BrokerDirs()
	d.sh(t, substitute(t, "audit key commands", d.shell["openssl rand "],
		shippedAuditKeyFile, filepath.Join(keyDir, "audit.key"), placeholderNode, d.Node.Name))
	master, err := audit.ReadKey(filepath.Join(d.dir, "audit-master.key"))
	check(t, err)
	path := filepath.Join(keyDir, "audit.key")
	st, err := os.Stat(path)
	check(t, err)
	key, err := audit.ReadKey(path)
	check(t, err)
	if st.Mode().Perm() != 0o400 {
		t.Errorf("the node's audit key file has mode %v, want 0400", st.Mode().Perm())
	}
	if !bytes.Equal(key, audit.NodeKey(master, d.Node.Name)) {
		t.Errorf("the node's audit key file does not hold the key derived from the master key for %s", d.Node.Name)
	}
}

// render: step 4. The overlay's files are written as the README has them (the registry's host
// substituted), the Vault CA is the apiserver's (any CA: the patched config talks plain HTTP to the
// harness Vault), and kubectl kustomize renders them: deploy/overlays/prod's DaemonSet with the
// registry's image, the ConfigMaps holding exactly the README's broker.yaml and policy.yaml, the CA
// ConfigMap mounted, the NetworkPolicy's apiserver endpoint replaced.
// (Over 60 lines: one check per thing the README says the overlay does.)
func (d *deployment) render(t *testing.T) {
	for path, text := range map[string]string{
		kustomization:                substitute(t, kustomization, d.files[kustomization], placeholderRegistry, d.reg.host),
		brokerConfig:                 d.files[brokerConfig],
		policyFile:                   d.files[policyFile],
		overlayDir + "/vault-ca.crt": string(d.Kube.CAData),
	} {
		check(t, os.MkdirAll(filepath.Dir(filepath.Join(d.dir, path)), 0o755))
		check(t, os.WriteFile(filepath.Join(d.dir, path), []byte(text), 0o644))
	}
	objects, err := decodeObjects(d.kubectl(t, "kustomize", overlayDir))
	check(t, err)
	prod, err := realnode.Render(filepath.Join(d.Repo, "deploy/overlays/prod"))
	check(t, err)
	find := func(objs []*unstructured.Unstructured, kind, prefix string) *unstructured.Unstructured {
		for _, o := range objs {
			if o.GetKind() == kind && strings.HasPrefix(o.GetName(), prefix) {
				return o
			}
		}
		t.Fatalf("no %s %s* in the render", kind, prefix)
		return nil
	}
	if len(objects) != len(prod)+1 {
		t.Errorf("the overlay renders %d objects, deploy/overlays/prod %d: want those and the CA's ConfigMap", len(objects), len(prod))
	}
	var ds, prodDS appsv1.DaemonSet
	check(t, runtime.DefaultUnstructuredConverter.FromUnstructured(find(objects, "DaemonSet", "keyward-broker").Object, &ds))
	check(t, runtime.DefaultUnstructuredConverter.FromUnstructured(find(prod, "DaemonSet", "keyward-broker").Object, &prodDS))
	c, pc := ds.Spec.Template.Spec.Containers[0], prodDS.Spec.Template.Spec.Containers[0]
	if c.Image != d.ref("keyward-broker") {
		t.Errorf("the DaemonSet runs %s, want the pushed %s", c.Image, d.ref("keyward-broker"))
	}
	if !slices.Equal(c.Args, pc.Args) || !c.Resources.Limits.Memory().Equal(*pc.Resources.Limits.Memory()) {
		t.Errorf("the overlay lost deploy/overlays/prod's arguments or limits: %v %v, want %v %v", c.Args, c.Resources.Limits, pc.Args, pc.Resources.Limits)
	}
	ca := find(objects, "ConfigMap", "keyward-vault-ca")
	if got, _, _ := unstructured.NestedString(ca.Object, "data", "ca.crt"); got != string(d.Kube.CAData) {
		t.Errorf("the keyward-vault-ca ConfigMap holds %q, not my-cluster/vault-ca.crt", got)
	}
	for _, v := range ds.Spec.Template.Spec.Volumes {
		if v.Name == "vault-ca" && (v.ConfigMap == nil || v.ConfigMap.Name != ca.GetName()) {
			t.Errorf("the DaemonSet mounts %+v as the Vault CA, not the generated %s", v.VolumeSource, ca.GetName())
		}
	}
	for cm, f := range map[string]string{"keyward-broker": brokerConfig, "keyward-policy": policyFile} {
		data, _, _ := unstructured.NestedStringMap(find(objects, "ConfigMap", cm).Object, "data")
		key := filepath.Base(f)
		if len(data) != 1 || data[key] != d.files[f] {
			t.Errorf("ConfigMap %s holds %v, want exactly %s as written:\n%s", cm, data, f, d.files[f])
		}
	}
	cidr := func(o *unstructured.Unstructured) string { // the apiserver endpoint rule's (no deep copy: Render's numbers are int)
		var np struct {
			Spec struct {
				Egress []struct {
					To []struct {
						IPBlock *struct{ CIDR string } `json:"ipBlock"`
					} `json:"to"`
				} `json:"egress"`
			} `json:"spec"`
		}
		b, err := json.Marshal(o.Object)
		check(t, err)
		check(t, json.Unmarshal(b, &np))
		if len(np.Spec.Egress) < 2 || len(np.Spec.Egress[1].To) == 0 || np.Spec.Egress[1].To[0].IPBlock == nil {
			t.Fatalf("NetworkPolicy %s has no apiserver endpoint rule as its second egress rule", o.GetName())
		}
		return np.Spec.Egress[1].To[0].IPBlock.CIDR
	}
	if got, shipped := cidr(find(objects, "NetworkPolicy", "keyward-broker")), cidr(find(prod, "NetworkPolicy", "keyward-broker")); got == shipped ||
		!strings.Contains(d.files[kustomization], "value: "+got) {
		t.Errorf("the NetworkPolicy's apiserver endpoint is %s (shipped %s), not the overlay's", got, shipped)
	}
	// The policy stays the README's: PatchForThisNode is given the one the overlay rendered.
	check(t, d.PatchForThisNode(objects, d.files[policyFile]))
	d.objects = objects
}

// decodeObjects reads a multi-document YAML stream, as kubectl kustomize prints it, as the API
// machinery decodes it (numbers as int64).
func decodeObjects(b []byte) ([]*unstructured.Unstructured, error) {
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(b)))
	var out []*unstructured.Unstructured
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return out, nil
		} else if err != nil {
			return nil, err
		}
		j, err := yaml.YAMLToJSON(doc)
		if err != nil {
			return nil, err
		}
		if string(bytes.TrimSpace(j)) == "null" {
			continue
		}
		o := &unstructured.Unstructured{}
		if err := o.UnmarshalJSON(j); err != nil {
			return nil, err
		}
		out = append(out, o)
	}
}

// apply: step 5. The README's kubectl apply -k applies the overlay's render patched for this node
// (written out and applied with kubectl apply -f); the block's other commands run as written. The
// broker's pod runs the image pulled from the registry: its image ID is the built digest, and the
// registry served its manifest.
func (d *deployment) apply(t *testing.T) {
	var docs []string
	for _, o := range d.objects {
		b, err := yaml.Marshal(o.Object)
		check(t, err)
		docs = append(docs, string(b))
	}
	check(t, os.WriteFile(filepath.Join(d.dir, "this-node.yaml"), []byte(strings.Join(docs, "---\n")), 0o644))
	out := d.sh(t, substitute(t, "apply commands", d.shell[applyOverlay], applyOverlay, "kubectl apply -f this-node.yaml"))
	listed := false
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		listed = listed || len(f) == 2 && f[0] == d.Node.Name && slices.Contains(strings.Split(f[1], ","), csi.DriverName)
	}
	if !listed {
		t.Errorf("kubectl get csinode does not list %s on %s", csi.DriverName, d.Node.Name)
	}
	pod, err := d.WaitBroker(context.Background(), "")
	check(t, err)
	d.wantPulled(t, pod, "broker", "keyward-broker")
}

// wantPulled checks that the pod's container runs image n as pushed to the registry, and that
// containerd fetched its manifest from there (nothing imported it).
func (d *deployment) wantPulled(t *testing.T, pod *corev1.Pod, container, n string) {
	t.Helper()
	st := realnode.ContainerStatus(pod, container)
	if pod.Spec.Containers[0].Image != d.ref(n) || st == nil || !strings.HasSuffix(st.ImageID, "@"+d.built[n].Digest.String()) {
		t.Fatalf("pod %s runs %s with image ID %v, want %s at the built digest %s", pod.Name, pod.Spec.Containers[0].Image, st, d.ref(n), d.built[n].Digest)
	}
	if !slices.ContainsFunc(d.reg.requests(), func(r string) bool { return strings.HasPrefix(r, "GET /v2/keyward/"+n+"/manifests/") }) {
		t.Fatalf("the registry never served %s's manifest: %v", n, d.reg.requests())
	}
	t.Logf("pod %s runs %s, pulled from the registry: %s", pod.Name, d.ref(n), st.ImageID)
}

// smokeTest: step 6, the README's pod manifest written as it is (the registry's host substituted)
// and its commands run as written; the termination message they print is secretcheck's passing
// verdict, and the pod ran the pushed secretcheck image. The block's last command deletes the pod:
// it runs after those checks.
func (d *deployment) smokeTest(t *testing.T) {
	check(t, os.WriteFile(filepath.Join(d.dir, smokeTest), []byte(substitute(t, smokeTest, d.files[smokeTest], placeholderRegistry, d.reg.host)), 0o644))
	var p corev1.Pod
	check(t, yaml.UnmarshalStrict([]byte(d.files[smokeTest]), &p))
	run, del, ok := strings.Cut(d.shell["kubectl apply -f "+smokeTest], "kubectl -n "+p.Namespace+" delete pod "+p.Name+"\n")
	if !ok || strings.TrimSpace(del) != "" {
		t.Fatalf("the README's smoke test no longer ends by deleting pod %s:\n%s", p.Name, d.shell["kubectl apply -f "+smokeTest])
	}
	out := d.sh(t, run)
	i := strings.LastIndex(out, `{"verdict"`)
	if i < 0 {
		t.Fatalf("the README's commands printed no verdict:\n%s", out)
	}
	var v realnode.Verdict
	check(t, json.Unmarshal([]byte(strings.TrimSpace(out[i:])), &v))
	if !v.Passed() || len(v.Files) != 1 || v.Files[0].Name != "db-password" {
		t.Fatalf("secretcheck's verdict from inside the pod: %+v", v)
	}
	pod, err := d.Kube.Client.CoreV1().Pods(p.Namespace).Get(context.Background(), p.Name, metav1.GetOptions{})
	check(t, err)
	d.wantPulled(t, pod, "check", "secretcheck")
	d.smokeUID = string(pod.UID)
	d.sh(t, "kubectl -n "+p.Namespace+" delete pod "+p.Name+"\n")
}

// verifyAudit: deploy/README.md's verification of a node's stream by the security team, with the
// master key of step 3: the broker's records of this walk-through verify, bound to the node, and
// record the smoke-test pod's mount.
func (d *deployment) verifyAudit(t *testing.T) {
	_, logDir := d.BrokerDirs()
	dir := filepath.Join(logDir, "broker-audit")
	out := d.sh(t, fmt.Sprintf("bin/keywardctl audit verify %s --master-key-file audit-master.key --node %s --stream broker\n", dir, d.Node.Name))
	if !strings.Contains(out, "hash chain intact") {
		t.Fatalf("keywardctl audit verify: %s", out)
	}
	recs, err := audit.QueryPath(dir, audit.Filter{})
	check(t, err)
	if !slices.ContainsFunc(recs, func(r audit.Record) bool {
		return r.Type == audit.EventMount && r.Subject.PodUID == d.smokeUID && r.Decision == audit.Allowed
	}) {
		t.Fatalf("the broker's audit stream (%d records) has no allowed mount of the smoke-test pod", len(recs))
	}
}

// kms: step 7 on the node as its control-plane node. realnode.ProvisionKMSNode does what deploy/README.md
// asks (under the test's directory; the KEK made by keywardctl kms keys create), with the node's audit
// key of step 3; deploy/control-plane/keyward-kms.yaml runs as a static pod with the image the README
// names in the registry (realnode.StartKMSPod, its hostPaths moved to those files); then the
// apiserver gets deploy/control-plane/encryption-config.yaml and stores Secrets through it.
func (d *deployment) kms(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	image := d.ref("keyward-kms")
	if readme := placeholderRegistry + "/keyward/keyward-kms:" + d.tag; !strings.Contains(d.section, "`"+readme+"`") {
		t.Fatalf("the README no longer runs keyward-kms's static pod with `%s`", readme)
	}
	keyDir, _ := d.BrokerDirs()
	nodeKey, err := os.ReadFile(filepath.Join(keyDir, "audit.key"))
	check(t, err)
	k, err := d.ProvisionKMSNode(ctx, nodeKey)
	check(t, err)
	start := time.Now()
	check(t, d.StartKMSPod(ctx, k, image))
	mirror := k.Pod
	t.Logf("the keyward-kms static pod was Ready %s after its manifest was written", time.Since(start).Round(100*time.Millisecond))
	d.wantPulled(t, mirror, "kms", "keyward-kms")
	const value = "CANARY-deploy-kms-3b9e"
	secrets := d.Kube.Client.CoreV1().Secrets("payments-prod")
	name, err := d.UseKMS(ctx, k.Socket, "payments-prod", func(name string) error {
		_, err := secrets.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name}, StringData: map[string]string{"password": value}}, metav1.CreateOptions{})
		return err
	})
	check(t, err)
	raw, err := d.RawSecret(ctx, "payments-prod", name)
	check(t, err)
	got, err := secrets.Get(ctx, name, metav1.GetOptions{})
	check(t, err)
	if strings.Contains(raw, value) || string(got.Data["password"]) != value {
		t.Fatal("the Secret written through keyward-kms is in etcd in plaintext or does not read back")
	}
}

// testRegistry is an OCI registry (go-containerregistry's, in memory) on loopback, which records the
// requests it served.
type testRegistry struct {
	host string // 127.0.0.1:PORT
	mu   sync.Mutex
	seen []string
}

func startRegistry(t *testing.T) *testRegistry {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	check(t, err)
	r := &testRegistry{host: l.Addr().String()}
	h := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.mu.Lock()
		r.seen = append(r.seen, req.Method+" "+req.URL.Path)
		r.mu.Unlock()
		h.ServeHTTP(w, req)
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return r
}

// digest is the manifest digest the registry holds for keyward/n:tag (Docker-Content-Digest).
func (r *testRegistry) digest(t *testing.T, n, tag string) string {
	t.Helper()
	req, err := http.NewRequest(http.MethodHead, "http://"+r.host+"/v2/keyward/"+n+"/manifests/"+tag, nil)
	check(t, err)
	req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json")
	resp, err := http.DefaultClient.Do(req)
	check(t, err)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("HEAD %s: %s", req.URL, resp.Status)
	}
	return resp.Header.Get("Docker-Content-Digest")
}

func (r *testRegistry) requests() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.seen)
}
