package harness

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// DefaultIssuer is the service-account token issuer of the harness apiserver.
const DefaultIssuer = "https://kubernetes.default.svc.cluster.local"

// KubeOptions configure StartKubeAPIServer.
type KubeOptions struct {
	Etcd *Etcd
	// EncryptionConfig, if set, is passed as --encryption-provider-config.
	EncryptionConfig string
	// ExtraArgs are appended to the command line.
	ExtraArgs []string
}

// KubeAPIServer is a kube-apiserver on loopback backed by the harness etcd, with RBAC authorization,
// service-account token signing (TokenRequest/TokenReview) and a static admin token.
type KubeAPIServer struct {
	URL string
	// Config authenticates as a cluster admin (group system:masters).
	Config *rest.Config
	Client kubernetes.Interface
	// CAFile/CAData: the CA that signed the serving certificate.
	CAFile string
	CAData []byte
	Issuer string
	Dir    string

	opts       KubeOptions
	args       []string
	bin        string
	adminToken string
	saKey      *rsa.PrivateKey
	ca         *CA
	proc       *process
}

// StartKubeAPIServer starts kube-apiserver in dir (which must exist) and waits until /readyz is ok.
// (Over 60 lines: most of it is the apiserver's flag list, which reads best in one place.)
func StartKubeAPIServer(ctx context.Context, dir string, opts KubeOptions) (*KubeAPIServer, error) {
	if opts.Etcd == nil {
		return nil, fmt.Errorf("harness: kube-apiserver needs an etcd")
	}
	bin, err := Binary("kube-apiserver")
	if err != nil {
		return nil, err
	}
	ca, err := NewCA(dir, "kube")
	if err != nil {
		return nil, err
	}
	serving, err := ca.Issue(dir, "kube-apiserver")
	if err != nil {
		return nil, err
	}
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	saKeyFile, err := writeFile(dir, "sa.key", pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(saKey)}), 0o600)
	if err != nil {
		return nil, err
	}
	pubDER, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return nil, err
	}
	saPubFile, err := writeFile(dir, "sa.pub", pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}), 0o644)
	if err != nil {
		return nil, err
	}
	adminToken := randomHex(24)
	tokenFile, err := writeFile(dir, "tokens.csv", []byte(adminToken+",keyward-admin,keyward-admin-uid,\"system:masters\"\n"), 0o600)
	if err != nil {
		return nil, err
	}
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	certDir := filepath.Join(dir, "certs")
	if err := os.MkdirAll(certDir, 0o700); err != nil {
		return nil, err
	}
	args := []string{
		"--etcd-servers=" + opts.Etcd.Endpoint,
		"--etcd-cafile=" + opts.Etcd.CA.CertFile,
		"--etcd-certfile=" + opts.Etcd.ClientCert.CertFile,
		"--etcd-keyfile=" + opts.Etcd.ClientCert.KeyFile,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		"--endpoint-reconciler-type=none",
		"--cert-dir=" + certDir,
		"--tls-cert-file=" + serving.CertFile,
		"--tls-private-key-file=" + serving.KeyFile,
		"--service-account-issuer=" + DefaultIssuer,
		"--service-account-key-file=" + saPubFile,
		"--service-account-signing-key-file=" + saKeyFile,
		"--api-audiences=" + DefaultIssuer,
		// Node before RBAC, with NodeRestriction below: a kubelet (the harness's real node) gets exactly
		// what a node gets in a real cluster, by its client certificate (CN system:node:NAME).
		"--authorization-mode=Node,RBAC",
		"--client-ca-file=" + ca.CertFile,
		// Reach a kubelet at its InternalIP, never by looking its node name up in DNS.
		"--kubelet-preferred-address-types=InternalIP",
		"--token-auth-file=" + tokenFile,
		"--service-cluster-ip-range=10.96.0.0/24",
		"--allow-privileged=true",
		// On by default since 1.30; named because deploy/base's ValidatingAdmissionPolicy (who may set
		// a namespace's environment label) depends on it.
		"--enable-admission-plugins=ValidatingAdmissionPolicy,NodeRestriction",
	}
	if opts.EncryptionConfig != "" {
		args = append(args, "--encryption-provider-config="+opts.EncryptionConfig)
	}
	args = append(args, opts.ExtraArgs...)
	k := &KubeAPIServer{
		URL:        "https://" + hostPort(port),
		CAFile:     ca.CertFile,
		CAData:     ca.CertPEM,
		Issuer:     DefaultIssuer,
		Dir:        dir,
		opts:       opts,
		args:       args,
		bin:        bin,
		adminToken: adminToken,
		saKey:      saKey,
		ca:         ca,
	}
	k.Config = &rest.Config{
		Host:            k.URL,
		BearerToken:     adminToken,
		TLSClientConfig: rest.TLSClientConfig{CAData: ca.CertPEM},
		QPS:             200,
		Burst:           400,
	}
	if k.Client, err = kubernetes.NewForConfig(k.Config); err != nil {
		return nil, err
	}
	if err := k.start(ctx); err != nil {
		return nil, err
	}
	return k, nil
}

func (k *KubeAPIServer) start(ctx context.Context) error {
	p, err := startProcess("kube-apiserver", k.Dir, k.bin, k.args, nil)
	if err != nil {
		return err
	}
	k.proc = p
	if err := p.waitReady(ctx, func(ctx context.Context) error {
		body, err := k.Client.CoreV1().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err != nil {
			return fmt.Errorf("readyz: %w: %s", err, body)
		}
		return nil
	}); err != nil {
		p.stop()
		return err
	}
	return nil
}

// Restart stops and starts the apiserver with the same flags, port and identity.
func (k *KubeAPIServer) Restart(ctx context.Context) error {
	k.proc.stop()
	return k.start(ctx)
}

// Stop stops the apiserver. Safe to call twice.
func (k *KubeAPIServer) Stop() { k.proc.stop() }

// Start starts a stopped apiserver again with the same flags, port and identity.
func (k *KubeAPIServer) Start(ctx context.Context) error { return k.start(ctx) }

// IssueClientCert writes into dir a client certificate of the apiserver's CA for user in groups (its
// --client-ca-file): a kubelet's is system:node:NAME in system:nodes.
func (k *KubeAPIServer) IssueClientCert(dir, user string, groups ...string) (CertPair, error) {
	return k.ca.issue(dir, strings.ReplaceAll(user, ":", "_"), user, groups...)
}

// ConfigForToken returns a client config that authenticates with token instead of the admin token.
func (k *KubeAPIServer) ConfigForToken(token string) *rest.Config {
	c := rest.CopyConfig(k.Config)
	c.BearerToken = token
	return c
}

// CreateNamespace creates a namespace with labels.
func (k *KubeAPIServer) CreateNamespace(ctx context.Context, name string, labels map[string]string) (*corev1.Namespace, error) {
	return k.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
	}, metav1.CreateOptions{})
}

// CreateServiceAccount creates a service account in a namespace.
func (k *KubeAPIServer) CreateServiceAccount(ctx context.Context, namespace, name string) (*corev1.ServiceAccount, error) {
	return k.Client.CoreV1().ServiceAccounts(namespace).Create(ctx, &corev1.ServiceAccount{
		ObjectMeta: metav1.ObjectMeta{Name: name},
	}, metav1.CreateOptions{})
}

// CreatePod creates a pod running as serviceAccount, bound to nodeName. There is no kubelet: the pod
// stays Pending, which is enough for pod-bound tokens.
func (k *KubeAPIServer) CreatePod(ctx context.Context, namespace, name, serviceAccount, nodeName string) (*corev1.Pod, error) {
	return k.Client.CoreV1().Pods(namespace).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PodSpec{
			ServiceAccountName: serviceAccount,
			NodeName:           nodeName,
			Containers:         []corev1.Container{{Name: "app", Image: "registry.invalid/app:1"}},
		},
	}, metav1.CreateOptions{})
}

// PodToken returns a service-account token bound to pod, for the given audiences, via TokenRequest.
func (k *KubeAPIServer) PodToken(ctx context.Context, pod *corev1.Pod, audiences []string, ttl time.Duration) (string, error) {
	secs := int64(ttl / time.Second)
	tr, err := k.Client.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(ctx, pod.Spec.ServiceAccountName, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{
			Audiences:         audiences,
			ExpirationSeconds: &secs,
			BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", err
	}
	return tr.Status.Token, nil
}

// ServiceAccountToken returns a token for a service account that is not bound to any object.
func (k *KubeAPIServer) ServiceAccountToken(ctx context.Context, namespace, name string, audiences []string, ttl time.Duration) (string, error) {
	secs := int64(ttl / time.Second)
	tr, err := k.Client.CoreV1().ServiceAccounts(namespace).CreateToken(ctx, name, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{Audiences: audiences, ExpirationSeconds: &secs},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", err
	}
	return tr.Status.Token, nil
}

// BindClusterRole binds a cluster role to a service account.
func (k *KubeAPIServer) BindClusterRole(ctx context.Context, bindingName, clusterRole, namespace, serviceAccount string) error {
	_, err := k.Client.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: bindingName},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: clusterRole},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: namespace, Name: serviceAccount}},
	}, metav1.CreateOptions{})
	return err
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return hex.EncodeToString(b)
}

// TokenClaims describe a service-account JWT for SignToken.
type TokenClaims struct {
	Namespace, ServiceAccount, ServiceAccountUID string
	PodName, PodUID                              string
	Audiences                                    []string
	Expiry                                       time.Time
}

// SignToken mints a service-account JWT signed with the apiserver's own signing key (forge=false) or
// with a fresh key it has never seen (forge=true). It lets tests present tokens TokenRequest will not
// issue, such as an already expired one.
func (k *KubeAPIServer) SignToken(c TokenClaims, forge bool) (string, error) {
	key := k.saKey
	if forge {
		var err error
		if key, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			return "", err
		}
	}
	der, err := x509.MarshalPKIXPublicKey(&k.saKey.PublicKey)
	if err != nil {
		return "", err
	}
	kidSum := sha256.Sum256(der)
	header := map[string]string{"alg": "RS256", "kid": base64.RawURLEncoding.EncodeToString(kidSum[:])}
	kc := map[string]any{
		"namespace":      c.Namespace,
		"serviceaccount": map[string]string{"name": c.ServiceAccount, "uid": c.ServiceAccountUID},
	}
	if c.PodName != "" {
		kc["pod"] = map[string]string{"name": c.PodName, "uid": c.PodUID}
	}
	claims := map[string]any{
		"iss": k.Issuer, "sub": "system:serviceaccount:" + c.Namespace + ":" + c.ServiceAccount,
		"aud": c.Audiences, "exp": c.Expiry.Unix(), "iat": c.Expiry.Add(-time.Hour).Unix(),
		"nbf": c.Expiry.Add(-time.Hour).Unix(), "kubernetes.io": kc, "jti": randomHex(8),
	}
	enc := func(v any) (string, error) {
		b, err := json.Marshal(v)
		return base64.RawURLEncoding.EncodeToString(b), err
	}
	h, err := enc(header)
	if err != nil {
		return "", err
	}
	p, err := enc(claims)
	if err != nil {
		return "", err
	}
	digest := sha256.Sum256([]byte(h + "." + p))
	sig, err := rsa.SignPKCS1v15(rand.Reader, key, crypto.SHA256, digest[:])
	if err != nil {
		return "", err
	}
	return h + "." + p + "." + base64.RawURLEncoding.EncodeToString(sig), nil
}

// WriteKubeconfig writes a kubeconfig for this apiserver that authenticates with token (the admin
// token when token is empty), mode 0600, and returns its path.
func (k *KubeAPIServer) WriteKubeconfig(path, token string) (string, error) {
	if token == "" {
		token = k.adminToken
	}
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: harness
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: user
  user:
    token: %s
contexts:
- name: harness
  context: {cluster: harness, user: user}
current-context: harness
`, k.URL, k.CAFile, token)
	return path, os.WriteFile(path, []byte(cfg), 0o600)
}

// Pid is kube-apiserver's process ID (benchmarks read its CPU time).
func (k *KubeAPIServer) Pid() int { return k.proc.pid() }

// WriteEncryptionConfig writes to path an EncryptionConfiguration that envelope-encrypts Secrets with
// the KMS v2 plugin named keyward on socket (identity as the fallback for reading old values).
func WriteEncryptionConfig(path, socket string, timeout time.Duration) error {
	return os.WriteFile(path, []byte(fmt.Sprintf(`apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets]
    providers:
      - kms: {apiVersion: v2, name: keyward, endpoint: "unix://%s", timeout: %s}
      - identity: {}
`, socket, timeout)), 0o600)
}
