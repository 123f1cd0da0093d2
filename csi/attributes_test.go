package csi

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"go.uber.org/zap/zapcore"

	"github.com/keyward/keyward/internal/fault"
)

const canaryToken = "eyJCANARY.token.value"

func attrs(secrets string, mutate ...func(map[string]string)) map[string]string {
	a := map[string]string{
		AttrSecrets: secrets, AttrTokens: `{"keyward":{"token":"` + canaryToken + `","expirationTimestamp":"2030-01-01T00:00:00Z"}}`,
		AttrPodName: "api-0", AttrPodNamespace: "payments", AttrPodUID: "uid-1", AttrSAName: "api", AttrEphemeral: "true",
	}
	for _, m := range mutate {
		m(a)
	}
	return a
}

func TestParseVolume(t *testing.T) {
	v, err := ParseVolume(attrs("- {ref: payments/db, key: password, file: db, mode: \"0440\", version: 3}\n- {ref: shared/ca, key: crt, file: ca}"), nil, "keyward")
	if err != nil {
		t.Fatal(err)
	}
	if len(v.Files) != 2 || v.Files[0].Mode != 0o440 || v.Files[0].Default || v.Files[1].Mode != 0o400 || !v.Files[1].Default ||
		v.Files[0].Name != "db" || v.Token.Reveal() != canaryToken ||
		v.Claimed.PodUID != "uid-1" || v.Refs()[0].Version != 3 || v.SizeLimit != DefaultSizeLimit {
		t.Fatalf("parsed %+v", v)
	}
	for name, tc := range map[string]struct {
		a    map[string]string
		want error
		msg  string
	}{
		"unknown attribute":  {attrs("- {ref: a/b, key: k, file: f}", func(m map[string]string) { m["owner"] = "x" }), fault.ErrInvalid, `"owner"`},
		"no secrets":         {attrs(""), fault.ErrInvalid, "required"},
		"not a list":         {attrs("ref: a"), fault.ErrInvalid, "secrets"},
		"unknown entry key":  {attrs("- {ref: a/b, key: k, file: f, path: /etc}"), fault.ErrInvalid, "unknown field"},
		"slash in file":      {attrs("- {ref: a/b, key: k, file: x/y}"), fault.ErrInvalid, "secrets[0]"},
		"dotdot file":        {attrs("- {ref: a/b, key: k, file: ..data}"), fault.ErrInvalid, "secrets[0]"},
		"second entry bad":   {attrs("- {ref: a/b, key: k, file: f}\n- {ref: ../b, key: k, file: g}"), fault.ErrInvalid, `secrets[1] (file "g")`},
		"duplicate file":     {attrs("- {ref: a/b, key: k, file: f}\n- {ref: a/c, key: k, file: f}"), fault.ErrInvalid, "used twice"},
		"exec mode":          {attrs("- {ref: a/b, key: k, file: f, mode: \"0755\"}"), fault.ErrInvalid, "read-only"},
		"writable mode":      {attrs("- {ref: a/b, key: k, file: f, mode: \"0600\"}"), fault.ErrInvalid, "read-only"},
		"group writable":     {attrs("- {ref: a/b, key: k, file: f, mode: \"0460\"}"), fault.ErrInvalid, "read-only"},
		"world writable":     {attrs("- {ref: a/b, key: k, file: f, mode: \"0446\"}"), fault.ErrInvalid, "read-only"},
		"bad key":            {attrs("- {ref: a/b, key: \"k/1\", file: f}"), fault.ErrInvalid, "key"},
		"no pod info":        {attrs("- {ref: a/b, key: k, file: f}", func(m map[string]string) { delete(m, AttrPodUID) }), fault.ErrInvalid, "podInfoOnMount"},
		"no token":           {attrs("- {ref: a/b, key: k, file: f}", func(m map[string]string) { delete(m, AttrTokens) }), fault.ErrUnauthenticated, "tokenRequests"},
		"other audience":     {attrs("- {ref: a/b, key: k, file: f}", func(m map[string]string) { m[AttrTokens] = `{"vault":{"token":"` + canaryToken + `"}}` }), fault.ErrUnauthenticated, "audience"},
		"garbled tokens":     {attrs("- {ref: a/b, key: k, file: f}", func(m map[string]string) { m[AttrTokens] = canaryToken }), fault.ErrInvalid, "JSON"},
		"oversized secrets":  {attrs("- {ref: a/b, key: k, file: f}\n#" + strings.Repeat("x", MaxAttributeBytes)), fault.ErrInvalid, "max 65536"},
		"size limit too big": {attrs("- {ref: a/b, key: k, file: f}", func(m map[string]string) { m[AttrSizeLimit] = "999999999" }), fault.ErrInvalid, "sizeLimit"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := ParseVolume(tc.a, nil, "keyward")
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("err = %v, want %v mentioning %q", err, tc.want, tc.msg)
			}
			if strings.Contains(err.Error(), "CANARY") {
				t.Fatal("the error contains the token")
			}
		})
	}
}

// With serviceAccountTokenInSecrets, kubelet passes the token in the publish secrets instead: the
// broker takes it from there, but from exactly one place. A token in both is the pod supplying its
// own (its volumeAttributes, or its nodePublishSecretRef's Secret) and is refused; so is any other
// publish secret.
func TestParseVolumeTokenInPublishSecrets(t *testing.T) {
	tokens := attrs("")[AttrTokens]
	noToken := func(m map[string]string) { delete(m, AttrTokens) }
	v, err := ParseVolume(attrs("- {ref: a/b, key: k, file: f}", noToken), map[string]string{AttrTokens: tokens}, "keyward")
	if err != nil || v.Token.Reveal() != canaryToken {
		t.Fatalf("token from the publish secrets: %v", err)
	}
	for name, tc := range map[string]struct {
		a       map[string]string
		secrets map[string]string
		want    error
		msg     string
	}{
		"token in both (the pod's volumeAttributes)": {attrs("- {ref: a/b, key: k, file: f}"), map[string]string{AttrTokens: tokens}, fault.ErrInvalid, "both"},
		"token in both (the pod's nodePublishSecretRef)": {attrs("- {ref: a/b, key: k, file: f}"),
			map[string]string{AttrTokens: `{"keyward":{"token":"` + canaryToken + `-forged"}}`}, fault.ErrInvalid, "both"},
		"another publish secret": {attrs("- {ref: a/b, key: k, file: f}", noToken),
			map[string]string{AttrTokens: tokens, "password": "CANARY-pod-secret"}, fault.ErrInvalid, `"password"`},
		"empty token in the secrets":   {attrs("- {ref: a/b, key: k, file: f}", noToken), map[string]string{AttrTokens: ""}, fault.ErrUnauthenticated, "tokenRequests"},
		"garbled token in the secrets": {attrs("- {ref: a/b, key: k, file: f}", noToken), map[string]string{AttrTokens: canaryToken}, fault.ErrInvalid, "JSON"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := ParseVolume(tc.a, tc.secrets, "keyward")
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("err = %v, want %v mentioning %q", err, tc.want, tc.msg)
			}
			if strings.Contains(err.Error(), "CANARY") {
				t.Fatal("the error contains the token or a secret")
			}
		})
	}
}

// The logging interceptor's view of a publish request never holds the token or the secrets list.
func TestDescribeRedacts(t *testing.T) {
	req := &csipb.NodePublishVolumeRequest{VolumeId: "v", TargetPath: "/t", VolumeContext: attrs("- {ref: a/b, key: CANARYKEY, file: f}"),
		Secrets: map[string]string{"x": "CANARY-secret"}}
	enc := zapcore.NewMapObjectEncoder()
	for _, f := range Describe(req) {
		f.AddTo(enc)
	}
	out := fmt.Sprint(enc.Fields)
	if strings.Contains(out, "CANARY") || !strings.Contains(out, "payments/api-0") {
		t.Fatalf("described as %s", out)
	}
}

// Parsed "secrets" lists are memoized (republishes repeat them), bounded, and a cached success never
// answers for another text: an invalid list is still refused after a valid one was cached.
func TestParsedSecretsAreMemoizedAndBounded(t *testing.T) {
	good := "- {ref: payments/db, key: password, file: db}"
	a, err := ParseVolume(attrs(good), nil, "keyward")
	if err != nil {
		t.Fatal(err)
	}
	b, err := ParseVolume(attrs(good), nil, "keyward")
	if err != nil {
		t.Fatal(err)
	}
	if &a.Files[0] != &b.Files[0] {
		t.Fatal("the second parse of the same list did not come from the cache")
	}
	if _, err := ParseVolume(attrs(good+"\n- {ref: payments/db, key: password, file: db}"), nil, "keyward"); !errors.Is(err, fault.ErrInvalid) {
		t.Fatalf("a duplicate-file list after a cached valid one: %v", err)
	}
	for i := range 2 * maxParsedSecrets {
		if _, err := ParseVolume(attrs(fmt.Sprintf("- {ref: payments/s%d, key: k, file: f}", i)), nil, "keyward"); err != nil {
			t.Fatal(err)
		}
	}
	parsedSecrets.Lock()
	n := len(parsedSecrets.m)
	parsedSecrets.Unlock()
	if n > maxParsedSecrets {
		t.Fatalf("%d cached lists, bound %d", n, maxParsedSecrets)
	}
}

// Dynamic entries: the parts of one certificate (or one database credential) share one ref apart from
// the key, so they share one lease; anything that mixes a dynamic entry with a stored secret's fields,
// names an unknown part, or asks for a malformed certificate is refused before anything is issued.
func TestParseDynamicEntries(t *testing.T) {
	const pki = `{role: payments-web, commonName: api.payments.svc, altNames: [api.local, 10.0.0.1], ttl: 2h, generate: local}`
	v, err := ParseVolume(attrs("- {file: tls.crt, key: cert, pki: "+pki+"}\n- {file: tls.key, key: key, pki: "+pki+"}\n"+
		"- {file: user, key: username, database: {role: payments-ro}}\n- {file: pw, key: password, database: {role: payments-ro}}\n"+
		"- {file: kv, ref: payments/db, key: password}"), nil, "keyward")
	if err != nil {
		t.Fatal(err)
	}
	refs := v.Refs()
	if len(refs) != 5 || !v.Dynamic() {
		t.Fatalf("refs %+v", refs)
	}
	c, k, u := refs[0], refs[1], refs[2]
	if c.Kind != "pki" || c.Ref != "payments-web" || c.Key != "cert" || k.Key != "key" || c.PKI != k.PKI ||
		c.PKI.CommonName != "api.payments.svc" || c.PKI.AltNames != "api.local,10.0.0.1" || c.PKI.TTL.String() != "2h0m0s" || !c.PKI.LocalKey {
		t.Fatalf("pki refs %+v %+v", c, k)
	}
	if u.Kind != "database" || u.Ref != "payments-ro" || u.Key != "username" || refs[3].Key != "password" || refs[4].Dynamic() {
		t.Fatalf("database refs %+v %+v; kv %+v", u, refs[3], refs[4])
	}
	if kv, _ := ParseVolume(attrs("- {file: kv, ref: payments/db, key: password}"), nil, "keyward"); kv.Dynamic() {
		t.Fatal("a KV-only volume is dynamic")
	}
	for name, tc := range map[string]struct{ entry, msg string }{
		"both sources":       {"{file: f, key: cert, pki: " + pki + ", database: {role: payments-ro}}", "not both"},
		"pki with ref":       {"{file: f, key: cert, ref: payments/db, pki: " + pki + "}", "ref, version"},
		"database template":  {"{file: f, key: password, template: x, database: {role: payments-ro}}", "ref, version"},
		"pki format":         {"{file: f, key: cert, format: pkcs12, pki: " + pki + "}", "format"},
		"unknown part":       {"{file: f, key: password, pki: " + pki + "}", "cert, key, chain"},
		"database part":      {"{file: f, key: cert, database: {role: payments-ro}}", "username, password"},
		"no role":            {"{file: f, key: username, database: {role: \"\"}}", "role"},
		"role with slash":    {"{file: f, key: username, database: {role: a/b}}", "role"},
		"no common name":     {"{file: f, key: cert, pki: {role: payments-web}}", "commonName"},
		"bad common name":    {"{file: f, key: cert, pki: {role: payments-web, commonName: \"a b\"}}", "commonName"},
		"bad alt name":       {"{file: f, key: cert, pki: {role: payments-web, commonName: a.b, altNames: [\"x/y\"]}}", "altName"},
		"ttl too short":      {"{file: f, key: cert, pki: {role: payments-web, commonName: a.b, ttl: 1s}}", "ttl"},
		"ttl not a duration": {"{file: f, key: cert, pki: {role: payments-web, commonName: a.b, ttl: soon}}", "ttl"},
		"generate elsewhere": {"{file: f, key: cert, pki: {role: payments-web, commonName: a.b, generate: hsm}}", "generate"},
		"unknown pki field":  {"{file: f, key: cert, pki: {role: payments-web, commonName: a.b, keyType: rsa}}", "unknown field"},
		"two certificates, one name": {"{file: f, key: cert, pki: {role: payments-web, commonName: a.b}}\n- {file: g, key: key, pki: {role: payments-web, commonName: a.b, ttl: 2h}}",
			"one certificate per role and common name"},
	} {
		_, err := ParseVolume(attrs("- "+tc.entry), nil, "keyward")
		if !errors.Is(err, fault.ErrInvalid) || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%s: %v, want InvalidArgument mentioning %q", name, err, tc.msg)
		}
	}
}
